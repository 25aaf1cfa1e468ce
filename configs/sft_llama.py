"""Supervised fine-tuning of a Llama-family model on a JSONL file of prompt/response records.

    jaxtune train --config configs/sft_llama.py:tiny --config.data.train_path=data/train.jsonl --workdir runs/sft

The argument picks the model variant (tiny, llama3.2-1b, llama3.1-8b, llama3.1-70b); each record
is rendered through data.templates, e.g. {"prompt": "...", "response": "..."} with the default
("{prompt}", "{response}") template. Real-size variants use bf16 compute with fp32 master
weights, FSDP over every device (weights and Adam state sharded), and full rematerialisation.

Planned with `jaxtune plan` (per-device memory, XLA's compiled figure; benchmarks/RESULTS.md):
    jaxtune plan --config configs/sft_llama.py:llama3.2-1b --topology v5e-8   # 7.90 of 15.75 GiB, seq 4096, batch 32
    jaxtune plan --config configs/sft_llama.py:llama3.1-8b --topology v5p-8   # 47.60 of 95.74 GiB, seq 4096, batch 16
"""

from jaxtune.config import base_config, parse_arg

# Per-variant settings that differ from the base config; everything else is shared.
_VARIANTS = {
    "tiny": dict(global_batch_size=16, seq_len=128, rules="dp", dtype="float32", remat="none", lr=1e-3),
    "llama3.2-1b": dict(global_batch_size=32, seq_len=4096, rules="fsdp", dtype="bfloat16", remat="full", lr=2e-5),
    "llama3.1-8b": dict(global_batch_size=16, seq_len=4096, rules="fsdp", dtype="bfloat16", remat="full", lr=1e-5),
    "llama3.1-70b": dict(global_batch_size=256, seq_len=4096, rules="fsdp_tp", dtype="bfloat16", remat="full", lr=1e-5),
}


def get_config(arg=None):
    variant = parse_arg(arg, variant="tiny")["variant"]
    if variant not in _VARIANTS:
        raise ValueError(f"configs/sft_llama.py: unknown variant {variant!r}; expected one of {', '.join(_VARIANTS)}")
    v = _VARIANTS[variant]
    c = base_config()
    c.model.family = "llama"
    c.model.variant = variant
    c.model.dtype = v["dtype"]
    c.model.remat_policy = v["remat"]
    c.data.seq_len = v["seq_len"]
    c.train.global_batch_size = v["global_batch_size"]
    c.mesh.rules = v["rules"]
    if variant != "tiny":  # 1B and up: weights and optimizer state sharded over every device
        c.mesh.fsdp, c.mesh.data = -1, 1
    c.optim.lr = v["lr"]
    c.optim.weight_decay = 0.0 if variant != "tiny" else 0.1
    return c
