"""Preference tuning (DPO family, SimPO, ORPO, KTO) of a Llama-family model, from an SFT run or an HF model.

    jaxtune train --config configs/dpo.py:loss=sigmoid,variant=llama3.2-1b \\
        --config.model.hf_dir=/models/llama-3.2-1b-sft --config.data.train_path=pairs.jsonl --workdir runs/dpo
    jaxtune train --config configs/dpo.py:loss=simpo --config.model.init_from=runs/sft \\
        --config.data.train_path=pairs.jsonl --workdir runs/simpo

Arguments (after ':'): `loss` = sigmoid (DPO) | robust | hinge | ipo | dpo_norm | simpo | orpo |
kto_pair (KTO loss on pairs) | kto (unpaired {"prompt", "completion", "label"} records), and
`variant` as in configs/sft_llama.py (tiny, llama3.2-1b, llama3.1-8b, llama3.1-70b). Pair records
are {"prompt", "chosen", "rejected"} or {"chosen", "rejected"} sharing their prompt as a common
prefix. Start from an SFT run's workdir (model.init_from) or an HF directory (model.hf_dir).
Hyperparameters left at None take each paper's default (objective.dpo.beta, objective.dpo.gamma;
KTO: objective.kto.beta). The reference model is a frozen copy of the starting weights
(objective.dpo.reference=copy), or one pass of log-probs stored in the workdir
(objective.dpo.reference=precomputed); SimPO and ORPO need none.
`method=lora` (or dora) trains adapters on a bf16 frozen base, which is also the reference (no
extra weights). Real-size variants use seq 2048 (a pair is two rows) and half the SFT batch in pairs.
`model=t5` trains an encoder-decoder (T5 v1.1 / Flan-T5 shape at variant=tiny; a real one from
`model.hf_dir`, whose config.json picks the family): the prompt feeds the encoder and each
completion the decoder, as TRL trained encoder-decoders (docs/guides/t5.md):
    jaxtune train --config configs/dpo.py:loss=sigmoid,model=t5 --config.model.hf_dir=/models/flan-t5-base \
        --config.data.train_path=pairs.jsonl --workdir runs/dpo-t5
Planned with `jaxtune plan` (per-device memory; benchmarks/RESULTS.md):
    jaxtune plan --config configs/dpo.py:variant=llama3.1-8b,method=lora --topology v5p-8   # 11.40 of 95.74 GiB, 8 pairs
"""

import importlib.util
from pathlib import Path

from jaxtune.config import parse_arg

LOSSES = ("sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo", "orpo", "kto_pair", "kto")  # kto: unpaired
# Learning rates per loss type at real scale (papers / TRL examples); the tiny variant uses its own.
_LR = {"simpo": 5e-7, "orpo": 5e-6, "ipo": 5e-7, "kto": 5e-7, "dpo_norm": 5e-7}


def _sft_config(variant):
    """configs/sft_llama.py's variant: model shape, sharding, precision and batch come from there."""
    spec = importlib.util.spec_from_file_location("jaxtune_config_sft_llama", Path(__file__).with_name("sft_llama.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def get_config(arg=None):
    args = parse_arg(arg, loss="sigmoid", variant="tiny", method="none", model="llama")
    loss, variant, method = args["loss"], args["variant"], args["method"]
    if args["model"] not in ("llama", "t5"):
        raise ValueError(f"configs/dpo.py: model={args['model']!r}; expected llama or t5")
    if method not in ("none", "lora", "dora"):
        raise ValueError(f"configs/dpo.py: unknown method {method!r}; expected none, lora or dora")
    if loss not in LOSSES:
        raise ValueError(f"configs/dpo.py: unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    c = _sft_config(variant)
    if loss == "kto":  # unpaired KTO
        c.objective.type = "kto"
    else:  # the paired losses
        c.objective.type = "dpo"
        c.objective.dpo = dict(loss_type=loss)
    if args["model"] == "t5":
        _t5(c)
    c.data.templates = (("{prompt}", "{response}"),)
    # Pairs padded to [B, 2, T] (TRL's layout; B = pairs per step). True packs whole pairs into rows of
    # 2 * seq_len tokens (padding-free DPO): still B pairs per step, in the rows they need
    # (data.pair_batching="rows": B rows of up to data.max_pairs_per_row pairs each instead).
    c.data.packing = False
    c.data.shuffle = True
    c.train.steps = 1000
    c.train.checkpoint_every = 250
    c.optim.warmup_steps = 100  # TRL examples: 10% warmup
    c.optim.schedule = "linear"
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    if method != "none":  # LoRA/DoRA-DPO: the base without adapters is the reference (no extra weights)
        c.peft.method = method
        c.peft.rank, c.peft.alpha, c.peft.targets = 16, 32.0, "all-linear"
        c.optim.weight_decay = 0.0
        if variant != "tiny":
            c.peft.base_dtype = "bfloat16"
    if variant != "tiny":
        c.optim.lr = _LR.get(loss, 5e-7) * (10 if method != "none" else 1)
        c.data.seq_len = 2048  # prompt + the longer completion; a pair is two rows
        c.train.global_batch_size = max(c.train.global_batch_size // 2, 8)  # pairs: two rows each
    return c


def _t5(c):
    """An encoder-decoder: the tiny T5 v1.1 / Flan-T5 shape (a real model comes from model.hf_dir).
    Its pairs are padded (packing preference pairs is decoder-only so far)."""
    c.model.family = "t5"
    c.model.variant = "tiny-v1.1"
