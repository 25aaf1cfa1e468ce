"""Reward model (Bradley-Terry on preference pairs) of a Llama-family model: a scalar head on the
last token, exported as Hugging Face `*ForSequenceClassification`.

    jaxtune train --config configs/reward.py:variant=llama3.2-1b \\
        --config.model.hf_dir=/models/llama-3.2-1b-sft --config.data.train_path=pairs.jsonl \\
        --config.data.eval_path=held_out_pairs.jsonl --workdir runs/rm
    jaxtune eval --workdir runs/rm                                  # pairwise accuracy on data.eval_path
    jaxtune convert --workdir runs/rm --hf_out exported/rm          # AutoModelForSequenceClassification

Arguments (after ':'): `variant` as in configs/sft_llama.py (tiny, llama3.2-1b, llama3.1-8b,
llama3.1-70b) and `method` = none (full fine-tuning) | lora | dora (the score head is trained in
full either way; export LoRA runs with `jaxtune export --workdir runs/rm --merged OUT`). Records
are configs/dpo.py's pairs, plus an optional numeric "margin" per pair (the reward difference the
chosen completion should win by). objective.reward.center_rewards_coefficient (TRL's, e.g. 0.01) pulls
rewards towards zero mean. Starting from a causal LM (model.hf_dir or init_from), the decoder
weights are read and the score head starts from a random init.
Planned with `jaxtune plan` (per-device memory):
    jaxtune plan --config configs/reward.py:variant=llama3.2-1b --topology v5p-8   # 9.26 of 95.74 GiB
"""

import importlib.util
from pathlib import Path

from jaxtune.config import parse_arg


def _dpo_config(arg):
    """configs/dpo.py's config (model, data, schedule, LoRA settings) for the same arguments."""
    spec = importlib.util.spec_from_file_location("jaxtune_config_dpo", Path(__file__).with_name("dpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    args = parse_arg(arg)
    variant, method = args.get("variant", "tiny"), args.get("method", "none")
    unknown = sorted(set(args) - {"variant", "method"})
    if unknown:
        raise ValueError(f"configs/reward.py: unknown arguments {unknown} (expected variant=..., method=...)")
    c = _dpo_config(f"variant={variant},method={method}")
    c.objective.type = "reward"
    c.train.steps = 1000
    if variant != "tiny":
        c.optim.lr = 1e-4 if method != "none" else 1e-5  # full fine-tuning: as TRL's reward examples
    return c
