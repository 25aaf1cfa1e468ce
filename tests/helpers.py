"""Shared test helpers: tiny configs and data files written into tmp dirs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from jaxtune import config as config_lib
from jaxtune import validation

WORDS = "red blue green cat dog sun moon tree book lamp".split()


def write_sft_jsonl(path: Path, n: int = 64) -> Path:
    """Deterministic prompt/response records (reverse a few words)."""
    with path.open("w") as f:
        for i in range(n):
            words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 3)]
            f.write(json.dumps({"prompt": "reverse: " + " ".join(words), "response": " ".join(reversed(words))}) + "\n")
    return path


def tiny_base_config(train_path: str):
    """An unlocked tiny SFT config (2-layer d32 Llama, seq 32, batch 8) on `train_path`."""
    c = config_lib.base_config()
    c.data.train_path = str(train_path)
    c.data.templates = (("{prompt} =", " {response}"),)
    c.data.seq_len = 32
    c.data.tokenizer_vocab_size = 280
    c.model.variant = "tiny"
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.train.steps = 6
    c.train.global_batch_size = 8
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.train.progress_bar = False
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.mesh.rules = "dp"
    return c


def tiny_config(tmp_path: Path, **overrides):
    """A locked, validated tiny SFT config on a generated JSONL file; overrides use dotted keys."""
    c = tiny_base_config(write_sft_jsonl(tmp_path / "train.jsonl"))
    c.lock()
    validation.apply_overrides(c, [f"{key}={value}" for key, value in overrides.items()])
    validation.validate(c)
    return c


def write_mixture_files(directory: Path) -> dict[str, Path]:
    """A FLAN-style NLI JSONL file (renamed columns, answer options) and a chat JSONL file."""
    nli, chat = directory / "nli.jsonl", directory / "chat.jsonl"
    with nli.open("w") as f:
        for i in range(40):
            a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
            f.write(json.dumps({"s1": f"the {a} is here", "s2": f"the {b} is here",
                                "label": "yes" if a == b else "no", "choices": ["yes", "no"]}) + "\n")
    with chat.open("w") as f:
        for i in range(30):
            words = [WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 2)]
            messages = [{"role": "user", "content": "reverse " + " ".join(words)},
                        {"role": "assistant", "content": " ".join(reversed(words))}]
            if i % 3 == 0:
                messages = [{"role": "system", "content": "be brief"}, *messages,
                            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return {"nli": nli, "chat": chat}


def tiny_mixture_config(tmp_path: Path, **overrides):
    """A locked tiny config mixing a FLAN-templated NLI task and a chat task (capped examples-proportional)."""
    files = write_mixture_files(tmp_path)
    c = tiny_base_config("")
    c.data.seq_len = 48
    c.data.tokenizer_vocab_size = 400
    c.data.tasks.nli = config_lib.task_config(
        path=str(files["nli"]), templates="nli", fields={"premise": "s1", "hypothesis": "s2", "answer": "label",
                                                         "options": "choices"}, options_style="random")
    c.data.tasks.chat = config_lib.task_config(path=str(files["chat"]), format="chat", chat_template="chatml")
    c.data.mixture.cap = 35
    c.lock()
    validation.apply_overrides(c, [f"{key}={value}" for key, value in overrides.items()])
    validation.validate(c)
    return c


def reverse_pair(i: int) -> dict:
    """A synthetic preference: chosen reverses the prompt's words (the rule), rejected copies them."""
    words = [WORDS[(i * 7 + j * 3 + i // 10) % len(WORDS)] for j in range(3)]
    return {"prompt": "reverse: " + " ".join(words) + " =", "chosen": " " + " ".join(reversed(words)),
            "rejected": " " + " ".join(words)}


def chat_pair(pair: dict, conversations: bool) -> dict:
    """`pair` as chat messages: two whole conversations, or prompt messages with text replies."""
    prompt = [{"role": "user", "content": pair["prompt"]}]
    if not conversations:
        return {**pair, "prompt": prompt}
    return {k: prompt + [{"role": "assistant", "content": pair[k]}] for k in ("chosen", "rejected")}


def write_preference_jsonl(path: Path, n: int = 64, start: int = 0, unpaired: bool = False, chat: bool = False) -> Path:
    """Pairs from `reverse_pair`; unpaired (KTO) records alternate the chosen / rejected completion.
    With `chat`, odd records are chat messages (alternating the two pair shapes), even ones text."""
    with path.open("w") as f:
        for i in range(start, start + n):
            pair = reverse_pair(i)
            if unpaired:
                good = i % 2 == 0
                pair = {"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good}
            if chat and i % 2:
                pair = chat_pair(pair, conversations=i % 4 == 1 and not unpaired)
            f.write(json.dumps(pair) + "\n")
    return path


def with_eval_tasks(c, directory: Path, n: int = 6):
    """`c` plus two held-out eval tasks written into `directory`: `heldout_qa` (generative, renamed
    columns) and `heldout_mc` (multiple choice over a `choices` column;
    the answer is option 0, given as its text or its index)."""
    qa, mc = Path(directory) / "heldout_qa.jsonl", Path(directory) / "heldout_mc.jsonl"
    with qa.open("w") as f, mc.open("w") as g:
        for i in range(n):
            words = [WORDS[(i * 5 + j) % len(WORDS)] for j in range(2)]
            f.write(json.dumps({"q": "reverse: " + " ".join(words), "a": " ".join(reversed(words))}) + "\n")
            options = [" ".join(reversed(words)), " ".join(words), WORDS[i % len(WORDS)]]
            g.write(json.dumps({"text": "reverse: " + " ".join(words), "choices": options, "label": options[0] if i % 2 else 0}) + "\n")
    c.eval.tasks.heldout_qa = config_lib.eval_task_config(
        path=str(qa), fields={"question": "q", "answer": "a"}, templates=(("{question} =", " {answer}"),))
    c.eval.tasks.heldout_mc = config_lib.eval_task_config(
        "multiple_choice", path=str(mc), fields={"text": "text", "options": "choices", "answer": "label"},
        templates=(("{text} =", " {answer}"),))
    return c


def write_config_file(path: Path, train_path: Path, settings: str, *, preamble: str = "") -> Path:
    """A config file for the CLI: `tiny_base_config(train_path)`, then `settings` (lines of Python
    on `c`, e.g. "c.train.steps = 4"); `preamble` goes at module level (a docstring, constants)."""
    body = textwrap.indent(textwrap.dedent(settings).strip(), "    ")
    path.write_text(
        f"{preamble.strip()}\nfrom tests.helpers import tiny_base_config\n\n\n"
        f"def get_config(arg=None):\n    c = tiny_base_config({str(train_path)!r})\n{body}\n    return c\n"
    )
    return path
