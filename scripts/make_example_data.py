"""Writes the small data set configs/mixture_example.py trains on (nothing is downloaded).

    python scripts/make_example_data.py [--out data/example]

- nli.jsonl: premise/hypothesis pairs with columns named like GLUE's (sentence1, sentence2, label)
- chat.jsonl: `messages` conversations (system prompts, multi-turn)
- tfds/: a TFDS dataset `jaxtune_example_qa` (closed-book QA) in ArrayRecord format, read back with
  `tfds.data_source` (no TensorFlow needed)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = "red blue green yellow black white".split()
THINGS = "car house bird cat boat kite".split()


def nli_rows(n: int, rng: random.Random):
    for _ in range(n):
        colour, thing = rng.choice(COLOURS), rng.choice(THINGS)
        other = rng.choice(COLOURS)
        yield {"sentence1": f"The {thing} is {colour}.", "sentence2": f"The {thing} is {other}.",
               "label": "yes" if other == colour else "no", "choices": ["yes", "no"]}


def chat_rows(n: int, rng: random.Random):
    for i in range(n):
        words = rng.sample(THINGS, 3)
        messages = [{"role": "user", "content": "Sort these words: " + ", ".join(words)},
                    {"role": "assistant", "content": ", ".join(sorted(words))}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer with the words only."})
        if i % 4 == 0:
            messages += [{"role": "user", "content": "And reversed?"},
                         {"role": "assistant", "content": ", ".join(sorted(words, reverse=True))}]
        yield {"messages": messages}


def qa_rows(n: int, rng: random.Random):
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        yield {"question": f"What is {a} plus {b}?", "answer": str(a + b)}


def write_tfds(data_dir: Path, rows: list[dict]) -> None:
    import numpy as np  # noqa: F401  (tfds feature dtypes)
    import tensorflow_datasets as tfds

    class JaxtuneExampleQa(tfds.core.GeneratorBasedBuilder):
        """Closed-book arithmetic QA for the mixture example."""

        __module__ = "jaxtune_example_qa"  # a single-part module name: tfds needs no package resources
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"question": tfds.features.Text(), "answer": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from enumerate(rows)

    JaxtuneExampleQa(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/example"))
    args = parser.parse_args()
    rng = random.Random(0)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("nli.jsonl", nli_rows(2000, rng)), ("chat.jsonl", chat_rows(500, rng))):
        with (args.out / name).open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    write_tfds(args.out / "tfds", list(qa_rows(1000, rng)))
    print(f"wrote {args.out}/nli.jsonl, {args.out}/chat.jsonl and the TFDS dataset jaxtune_example_qa in {args.out}/tfds")


if __name__ == "__main__":
    main()
