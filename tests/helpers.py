"""Shared test helpers: tiny configs and data files written into tmp dirs."""

from __future__ import annotations

import json
from pathlib import Path

from jaxtune import config as config_lib

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
    for key, value in overrides.items():
        config_lib.set_value(c, key, str(value))
    config_lib.validate(c)
    return c


def reverse_pair(i: int) -> dict:
    """A synthetic preference: chosen reverses the prompt's words (the rule), rejected copies them."""
    words = [WORDS[(i * 7 + j * 3 + i // 10) % len(WORDS)] for j in range(3)]
    return {"prompt": "reverse: " + " ".join(words) + " =", "chosen": " " + " ".join(reversed(words)),
            "rejected": " " + " ".join(words)}


def write_preference_jsonl(path: Path, n: int = 64, start: int = 0, unpaired: bool = False) -> Path:
    """Pairs from `reverse_pair`; unpaired (KTO) records alternate the chosen / rejected completion."""
    with path.open("w") as f:
        for i in range(start, start + n):
            pair = reverse_pair(i)
            if unpaired:
                good = i % 2 == 0
                pair = {"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good}
            f.write(json.dumps(pair) + "\n")
    return path
