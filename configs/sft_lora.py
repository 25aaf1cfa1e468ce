"""LoRA / DoRA / QLoRA fine-tuning of any model family, from an HF directory or a named variant.

    jaxtune train --config configs/sft_lora.py:hf_dir=/path/to/hf_model --config.data.train_path=data/train.jsonl --workdir runs/lora
    jaxtune train --config configs/sft_lora.py:family=qwen2,variant=tiny,method=dora --config.data.train_path=data/train.jsonl --workdir runs/dora
    jaxtune train --config configs/sft_lora.py:hf_dir=/path/to/hf_model,quantize=nf4 --config.data.train_path=data/train.jsonl --workdir runs/qlora
    jaxtune export --workdir runs/lora --peft out/adapter --merged out/merged

Arguments (comma separated k=v): hf_dir, family, variant, method (lora|dora), quantize
(none|nf4|int8), rank, targets ("+"-separated here, e.g. q+v, or all-linear). Everything else is a --config override,
e.g. --config.peft.alpha=32 --config.peft.rslora=true --config.peft.dropout=0.05.

Real-size models (an HF dir or a named variant) train with bf16 compute, a bf16 frozen base
(peft.base_dtype), fp32 adapters, full rematerialisation, seq 4096, global batch 32 and the base
sharded over every device. Planned with `jaxtune plan` (per-device memory; benchmarks/RESULTS.md):
    jaxtune plan --config configs/sft_lora.py:variant=llama3.1-8b --topology v5p-8         # 28.34 of 95.74 GiB
    jaxtune plan --config configs/sft_lora.py:variant=llama3.1-70b --topology v5p:4x4x2    # 17.17 of 95.74 GiB (v5p-64)

Encoder-decoders (family=t5, e.g. Flan-T5-XXL, docs/guides/t5.md): `all-linear` adapts T5's q, k, v,
o, wi_0, wi_1 and wo in the encoder, the decoder and its cross-attention; both streams are
data.seq_len=512 tokens (T5's pre-training length; its biased attention holds [B, heads, T, S] scores):
    jaxtune plan --config configs/sft_lora.py:family=t5,variant=flan-t5-xxl --topology v5e-8   # 7.42 of 15.75 GiB
"""

from jaxtune.config import base_config, parse_arg

def get_config(arg=None):
    args = parse_arg(arg, hf_dir="", family="llama", variant="tiny", method="lora", quantize="none", rank=16,
                     targets="all-linear")
    c = base_config()
    c.model.hf_dir = args["hf_dir"]
    c.model.family = args["family"]
    c.model.variant = args["variant"]
    c.peft.method = args["method"]
    c.peft.quantize = args["quantize"]
    c.peft.rank = args["rank"]
    c.peft.alpha = 2.0 * c.peft.rank
    c.peft.targets = args["targets"].replace("+", ",")
    # Adapter learning rates are ~10x full fine-tuning's; no weight decay on the small adapters.
    c.optim.lr = 2e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 20
    if c.model.hf_dir or c.model.variant != "tiny":  # real models: bf16 compute, fp32 adapters
        c.model.dtype = "bfloat16"
        c.model.remat_policy = "full"  # saves no attention scores (README "Memory")
        c.peft.base_dtype = "bfloat16"  # the frozen base in half the memory; adapters stay fp32
        c.data.seq_len = 4096
        c.train.global_batch_size = 32
        c.mesh.fsdp, c.mesh.data = -1, 1  # base sharded over every device
    if c.model.family == "t5":  # prompt -> encoder, answer -> decoder, each up to seq_len tokens
        c.data.seq_len = 512
    return c
