"""A stand-in for the model sampler: canned, prompt- and seed-determined completions (no JAX)."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

from jaxtune.datatools.sampling import Completion
from jaxtune.generate import truncate_at_stop_strings

TOPICS = "apples rivers taxes poems chess sleep rockets tea bridges volcanoes jazz glaciers".split()
VERBS = "Explain Summarize Compare Describe List Rewrite Critique Outline Translate Evaluate".split()
AUDIENCES = "a child|a lawyer|a chef|a pilot|a farmer|a student|a tourist|a robot".split("|")
# Instructions the filters must drop, one reason each.
BAD = ["Draw a map of the town", "Hi there", ". Start with a dot and keep going", "Écris un poème sur la mer",
       "Plot the prices over time please"]
SEED_TASKS = [
    {"instruction": "Give three tips for staying healthy.", "instances": [{"input": "", "output": "Eat, sleep, move."}],
     "is_classification": False},
    {"instruction": "Classify the sentiment of the review as positive or negative.",
     "instances": [{"input": "I loved it", "output": "positive"}, {"input": "Awful", "output": "negative"}],
     "is_classification": True},
    {"instruction": "Translate the sentence into French.", "instances": [{"input": "Good morning", "output": "Bonjour"}],
     "is_classification": False},
    {"instruction": "Decide whether the number is even or odd.", "instances": [{"input": "7", "output": "odd"}],
     "is_classification": True},
]


def write_seed_file(path: Path, tasks=SEED_TASKS) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return path


class FakeSampler:
    """Answers each kind of prompt like a cooperative model would; `fail_after` raises (a killed run)."""

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after
        self.seen: list[str] = []

    def complete(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop=()):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.seen += prompts
        out = [self._one(p, seed) for p in prompts]
        return [Completion(truncate_at_stop_strings(c.text, stop), c.num_tokens, c.truncated) for c in out]

    def _one(self, prompt: str, seed: int) -> Completion:
        rng = random.Random(zlib.crc32(prompt.encode()) ^ seed)
        last = prompt.rsplit("Task:", 1)[-1]
        if prompt.endswith(("Rewritten task:\n", "New task:\n")):
            return self._evolved(prompt, rng)
        if prompt.endswith("Response:\n"):
            text = rng.choice(["Here is a careful answer with three numbered points and one example each.", "",
                               "First, mix flour and water. Second, knead. Third, bake for forty minutes.",
                               "Tides follow the moon's pull on the oceans.",
                               "Sorry, I cannot help with that.", "it is the , .", "A full, specific answer follows."])
            return Completion(text, len(text.split()) + 1, truncated=False)
        if prompt.endswith("Answer:"):
            return Completion(" Different", 1, truncated=False)
        if prompt.endswith("Classification:"):
            text = " Yes" if "Classify" in last or "Decide" in last else " No"
        elif prompt.endswith("Class label:"):
            text = " positive\nInput: a great day\nClass label: negative\nInput: a sad day\nClass label: positive\nInput: a great day"
        elif prompt.endswith("Input:"):
            text = f" {rng.choice(TOPICS)}\nOutput: an answer\nExample 2\nInput: same\nOutput: same\n\nTask: next"
            if rng.random() < 0.25:
                text = " rambling without any output"
        else:  # a numbered task list to continue
            n = int(prompt.rsplit("\n", 1)[-1].rstrip("."))
            items = [self._instruction(rng) for _ in range(3)] + [rng.choice(BAD)]
            if rng.random() < 0.3:
                items.append(f"Classify each {rng.choice(TOPICS)} headline by its tone.")
            text = " " + "\n".join(f"{n + i}. {item}" if i else item for i, item in enumerate(items))
            return Completion(text + f"\n{n + len(items)}. Unfinished task about", 40, truncated=True)
        return Completion(text, len(text.split()), truncated=False)

    def _evolved(self, prompt: str, rng: random.Random) -> Completion:
        parent = prompt.split("\nTask:\n", 1)[1].rsplit("\n\n", 1)[0]
        if prompt.endswith("New task:\n"):
            text = self._instruction(rng)
        else:
            text = rng.choice([f"{parent} Use exactly {rng.randint(3, 9)} bullet points, each citing a {rng.choice(TOPICS)} "
                               f"source, and finish with a one-line summary for {rng.choice(AUDIENCES)}.",
                               f"{parent} Explain each step for {rng.choice(AUDIENCES)} and give {rng.randint(2, 5)} "
                               f"examples about {rng.choice(TOPICS)}.",
                               parent, f"Rewritten task: {parent} but as the given prompt says, longer."])
        return Completion(f" {text}\n\n\nTask: more", 30, truncated=False)

    @staticmethod
    def _instruction(rng: random.Random) -> str:
        return f"{rng.choice(VERBS)} {rng.choice(TOPICS)} for {rng.choice(AUDIENCES)} in {rng.randint(2, 9)} sentences."
