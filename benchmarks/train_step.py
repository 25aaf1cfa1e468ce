"""Training-step throughput: tokens/s and MFU of jaxtune's jitted SFT or DPO step on this machine.

    python benchmarks/train_step.py                       # the quickstart model shape
    python benchmarks/train_step.py --variant llama3.2-1b --batch 8 --seq_len 2048 --dtype bfloat16
    python benchmarks/train_step.py --peft lora      # LoRA (all-linear, rank 16); --quantize nf4 for QLoRA
    python benchmarks/train_step.py --objective dpo [--peft lora]   # --batch pairs: [B, 2, T]
    python benchmarks/train_step.py --compare --repeats 3  # full vs LoRA vs QLoRA, + HF PyTorch/PEFT

--compare times jaxtune full, LoRA and QLoRA (nf4) steps and Hugging Face PyTorch full and PEFT
LoRA steps (AdamW, same shape/batch/rank/targets, torch threads = CPU cores) in one run, each the
median of --repeats timings, and prints their ratios; `xla_gflops` is XLA's cost analysis of the
compiled step (LoRA skips the frozen weights' gradient matmuls; XLA counts a scanned layer once).

DPO counts the tokens of both rows of every pair; its step also runs the reference forward
(a frozen copy for full fine-tuning, the adapter-free base for LoRA), which MFU does not count.

Prints one JSON line. MFU = achieved model FLOP/s / peak FLOP/s; peak is looked up for known
accelerators or given with --peak_tflops (per device; pass the measured peak on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from jaxtune import metrics, models, optim, sharding, trainer
from jaxtune.config import base_config, resolved_reference
from jaxtune.peft import lora, quant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama")
    p.add_argument("--variant", default="tiny")
    p.add_argument("--quickstart_shape", action=argparse.BooleanOptionalAction, default=True,
                   help="tiny variant at the quickstart's shape (d128, 4 layers, vocab 512)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--rules", default="fsdp")
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    p.add_argument("--peft", default="none", choices=lora.METHODS, help="adapter method (none = full fine-tuning)")
    p.add_argument("--quantize", default="none", choices=("none", *quant.KINDS), help="QLoRA base weights")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--model", default="{}", help='JSON model config overrides, e.g. \'{"hidden_size": 512}\'')
    p.add_argument("--compare", action="store_true", help="full vs LoRA vs QLoRA, and HF PyTorch full vs PEFT LoRA")
    p.add_argument("--repeats", type=int, default=1, help="timings per mode (the median is reported)")
    args = p.parse_args()
    if not args.compare:
        print(json.dumps(bench_jaxtune(args, args.peft, args.quantize)))
        return
    rows = {"full": bench_jaxtune(args, "none", "none"), "lora": bench_jaxtune(args, "lora", "none"),
            "qlora": bench_jaxtune(args, "lora", "nf4")}
    out = {"shape": {k: rows["full"][k] for k in ("params", "batch", "seq_len", "dtype")}, "rank": args.rank,
           "targets": args.targets, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()[0]}
    for name, row in rows.items():
        out.update({f"{name}_{k}": row[k] for k in ("step_s", "xla_gflops", "opt_state_bytes", "base_bytes")})
    out["full_over_lora"] = round(rows["full"]["step_s"] / rows["lora"]["step_s"], 3)
    out["full_over_qlora"] = round(rows["full"]["step_s"] / rows["qlora"]["step_s"], 3)
    cfg = model_config(args, run_config(args, "none", "none"))
    torch_full = bench_torch(cfg, args, lora_rank=0)
    torch_lora = bench_torch(cfg, args, lora_rank=args.rank)
    out.update(torch_full_step_s=torch_full, torch_lora_step_s=torch_lora,
               torch_full_over_lora=round(torch_full / torch_lora, 3), torch_threads=os.cpu_count())
    print(json.dumps(out))


def run_config(args, method: str, quantize: str):
    config = base_config()
    config.peft.update(method=method, quantize=quantize, rank=args.rank, alpha=2.0 * args.rank, targets=args.targets)
    config.objective.type = "sft" if args.objective == "sft" else "preference"
    return config


def model_config(args, config):
    overrides = dict(dtype=args.dtype, remat_policy=args.remat, peft=lora.spec_from_config(config.peft))
    if args.variant == "tiny" and args.quickstart_shape:
        overrides.update(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=True)
    overrides.update(json.loads(args.model))
    return models.get_config(args.family, args.variant, **overrides)


def bench_torch(cfg, args, lora_rank: int) -> float:
    """Median step seconds of Hugging Face PyTorch (+ PEFT LoRA when lora_rank) at cfg's shape."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        tie_word_embeddings=cfg.tie_word_embeddings)
    model = transformers.LlamaForCausalLM(hf)
    if lora_rank:
        targets = [lora.TARGETS.get(t, t) for t in lora.parse_targets(args.targets)]
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len)))

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(args.repeats):
        t0 = time.time()
        for _ in range(args.steps):
            step()
        times.append((time.time() - t0) / args.steps)
    return round(statistics.median(times), 4)


def bench_jaxtune(args, method: str, quantize: str) -> dict:
    config = run_config(args, method, quantize)
    cfg = model_config(args, config)
    model = models.build(cfg)
    ocfg = base_config().optim
    tx, lr = optim.build(ocfg, 1000)
    n = jax.device_count()
    mesh = sharding.build_mesh({"data": 1, "fsdp": n, "tensor": 1})
    rules = sharding.rules(args.rules)

    apply_fn = trainer.make_apply_fn(model)
    reference_kind = resolved_reference(config)

    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq_len
    rows = (B, 2) if args.objective == "dpo" else (B,)
    batch = {
        "inputs": rng.integers(0, cfg.vocab_size, (*rows, T)).astype(np.int32),
        "targets": rng.integers(0, cfg.vocab_size, (*rows, T)).astype(np.int32),
        "loss_mask": np.ones((*rows, T), np.int32),
        "segment_ids": np.ones((*rows, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (*rows, T)).copy(),
    }
    if args.objective == "dpo":
        batch["example_index"] = np.arange(B, dtype=np.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract, shardings, init = trainer.plan_state(model, tx, mesh, rules, seq_len=T)
        state = init(jax.random.key(0))
        ref = init(jax.random.key(0)).params if reference_kind == "copy" else None
        batch_sharding = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        batch = {k: jax.device_put(v, batch_sharding[k]) for k, v in batch.items()}
        step = jax.jit(trainer.make_train_step(apply_fn, tx, lr, accum=1, z_loss=0.0, objective=config.objective,
                                               reference_kind=reference_kind),
                       in_shardings=(shardings, batch_sharding, shardings.params if ref is not None else None),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
        t0 = time.time()
        compiled = step.lower(state, batch, ref).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        state, m = compiled(state, batch, ref)
        jax.block_until_ready(m)
        compile_s = time.time() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.time()
            for _ in range(args.steps):
                state, m = compiled(state, batch, ref)
            jax.block_until_ready(m)
            times.append((time.time() - t0) / args.steps)
        step_s = statistics.median(times)
    num_params = models.count_params(cfg)
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    tokens_per_s = int(np.prod(rows)) * T / step_s
    flops_per_token = metrics.train_flops_per_token(num_params, cfg.num_layers, cfg.hidden_size, T)
    peak = metrics.peak_flops_per_device(args.peak_tflops)
    out = {
        "objective": args.objective, "reference": reference_kind,
        "family": args.family, "variant": args.variant, "params": num_params, "batch": B, "seq_len": T,
        "dtype": args.dtype, "devices": n, "device_kind": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 2), "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(tokens_per_s * flops_per_token / 1e12, 4),
        "xla_gflops": round(float(cost.get("flops", 0.0)) / 1e9, 3),
        "peft": method, "quantize": quantize, "trainable_params": sum(x.size for x in jax.tree.leaves(abstract.params)),
        "opt_state_bytes": nbytes(abstract.opt_state), "base_bytes": nbytes(abstract.frozen if cfg.peft else abstract.params),
    }
    if cfg.peft is not None and cfg.peft.quantize != "none":
        out.update({k: round(v, 4) for k, v in quant.bytes_per_param(abstract.frozen).items()})
    if peak:
        out["mfu"] = round(tokens_per_s * flops_per_token / (peak * n), 4)
    return out


if __name__ == "__main__":
    main()
