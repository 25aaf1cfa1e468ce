"""Training-step throughput: tokens/s and MFU of jaxtune's jitted SFT or DPO step on this machine.

    python benchmarks/train_step.py                       # the quickstart model shape
    python benchmarks/train_step.py --variant llama3.2-1b --batch 8 --seq_len 2048 --dtype bfloat16
    python benchmarks/train_step.py --peft lora      # LoRA (all-linear, rank 16); --quantize nf4 for QLoRA
    python benchmarks/train_step.py --objective dpo [--peft lora]   # --batch pairs: [B, 2, T]
    python benchmarks/train_step.py --objective dpo --pairs ../shared/data/hh_rlhf_harmless_base_test.jsonl.gz \
        --pair_layouts padded,packed --seq_len 512 --batch 4 --steps 2 --repeats 3   # packed vs padded DPO
    python benchmarks/train_step.py --compare --repeats 3  # full vs LoRA vs QLoRA, + HF PyTorch/PEFT
    python benchmarks/train_step.py --shape bench --compare --modes full,lora,torch_full,torch_lora \
        --rank 8 --steps 2 --repeats 5    # the CPU side-by-side of benchmarks/RESULTS.md

--compare times jaxtune full, LoRA and QLoRA (nf4) steps and Hugging Face PyTorch full and PEFT
LoRA steps (AdamW, same shape/batch/rank/targets, torch threads = CPU cores; on a GPU: CUDA,
bf16 autocast when --dtype bfloat16, fused AdamW) in one run: everything is built and compiled
first, then the modes are timed in turn, --repeats rounds of --steps steps each, and each mode
reports the median round, so load that comes and goes on a shared machine hits all modes alike.
It prints jaxtune/torch tokens/s ratios; `xla_gflops` is XLA's cost analysis of the compiled
step (LoRA skips the frozen weights' gradient matmuls; XLA counts a scanned layer once).
--modes picks a subset (full, lora, qlora, torch_full, torch_lora); --attention a,b times each
jaxtune mode once per attention implementation (model setting `attention`).

DPO counts the tokens of both rows of every pair; its step also runs the reference forward
(a frozen copy for full fine-tuning, the adapter-free base for LoRA), which MFU does not count.
--pairs FILE (JSONL, or .jsonl.gz) feeds real pairs through jaxtune's pipeline instead of random
full rows: a sentencepiece tokenizer of the model's vocab size is trained on them, and batches are
drawn padded ([batch pairs, 2, seq_len]) or packed ([batch rows, 2 * seq_len], data.packing; same
token slots per step). Then tokens/s counts real (non-padding) tokens, and pairs/s the pairs
trained; --pair_layouts padded,packed times both side by side (alternating rounds) and reports
the packed / padded ratios.

Prints one JSON line. MFU = achieved model FLOP/s / peak FLOP/s; peak is looked up for known
accelerators or given with --peak_tflops (per device; pass the measured peak on a CPU);
--measured_peak_tflops adds `mfu_measured` against a measured matmul rate. --profile DIR writes
each jaxtune step's optimized HLO and a profiler trace (perfetto JSON) of its timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from jaxtune import metrics, models, optim, sharding, trainer
from jaxtune import objectives
from jaxtune.config import base_config
from jaxtune.peft import base as peft_base
from jaxtune.peft import quant



def has_module(name: str) -> bool:
    """Whether an optional package (trl, flash_attn, ...) is installed, without importing it."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def step_timer(times: list, cuda: bool):
    """A transformers Trainer callback that appends each optimizer step's wall time to `times`
    (synchronising CUDA first, so a step's queued kernels count)."""
    import torch
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(-time.time())

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times[-1] += time.time()

    return StepTimer()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama")
    p.add_argument("--variant", default="tiny")
    p.add_argument("--quickstart_shape", action=argparse.BooleanOptionalAction, default=True,
                   help="tiny variant at the quickstart's shape (d128, 4 layers, vocab 512)")
    p.add_argument("--shape", choices=("", "bench"), default="",
                   help="bench: the CPU comparison shape (8 layers, d512, MLP 1536, 8/2 heads, vocab 8192, batch 8 x 512)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--rules", default="fsdp")
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--measured_peak_tflops", type=float, default=0.0, help="a measured matmul peak: adds mfu_measured")
    p.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    p.add_argument("--peft", default="none", choices=("none", *peft_base.names()), help="adapter method (none = full fine-tuning)")
    p.add_argument("--quantize", default="none", choices=("none", *quant.KINDS), help="QLoRA base weights")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--model", default="{}", help='JSON model config overrides, e.g. \'{"hidden_size": 512}\'')
    p.add_argument("--compare", action="store_true", help="full vs LoRA vs QLoRA, and HF PyTorch full vs PEFT LoRA")
    p.add_argument("--repeats", type=int, default=1, help="timings per mode (the median is reported)")
    p.add_argument("--modes", default="full,lora,qlora,torch_full,torch_lora", help="--compare: the modes to time")
    p.add_argument("--attention", default="", help="comma list of model.attention implementations (jaxtune modes)")
    p.add_argument("--variants", default="",
                   help='JSON {name: model overrides}: time each jaxtune mode once per variant, e.g. '
                        '\'{"scan": {"layer_loop": "scan"}, "unrolled": {"layer_loop": "unrolled"}}\' '
                        '(a "logits_chunk" key sets --logits_chunk for that variant; "head_backward": "hand-written" '
                        'traces the LM head + loss with logprobs.head_token_stats_handwritten instead of autodiff)')
    p.add_argument("--profile", default="", help="directory: write the compiled HLO and a profiler trace of the timed steps")
    p.add_argument("--pairs", default="", help="DPO on real pairs from this JSONL(.gz) file (see above)")
    p.add_argument("--pair_layouts", default="padded", help="--pairs: padded, packed or padded,packed (side by side)")
    p.add_argument("--max_pairs_per_row", type=int, default=16, help="packed layout: pair slots per row")
    p.add_argument("--logits_chunk", type=int, default=512,
                   help="train.logits_chunk: LM-head positions per chunk (0 = unchunked); chunked heads recompute "
                        "their logits in the backward pass, so compare layouts under the same setting")
    args = p.parse_args()
    if args.shape == "bench":
        args.quickstart_shape, args.batch, args.seq_len = False, 8, 512
        args.model = json.dumps({**BENCH_SHAPE, **json.loads(args.model)})
    if args.pairs:
        print(json.dumps(compare_pair_layouts(args)))
        return
    if not args.compare:
        run, info = prepare_jaxtune(args, args.peft, args.quantize)
        print(json.dumps(dict(info, **throughput(args, info, statistics.median(run() for _ in range(args.repeats))))))
        return
    print(json.dumps(compare(args)))


# The CPU side-by-side shape of issue 11 (benchmarks/RESULTS.md), Llama-style, float32.
BENCH_SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                   num_kv_heads=2, tie_word_embeddings=False)
JAXTUNE_MODES = {"full": ("none", "none"), "lora": ("lora", "none"), "qlora": ("lora", "nf4")}
TORCH_MODES = {"torch_full": 0, "torch_lora": 1}


def compare(args) -> dict:
    """Builds every mode, then times them in turn (--repeats rounds); medians, ratios, one dict."""
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in JAXTUNE_MODES and m not in TORCH_MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; expected {sorted(JAXTUNE_MODES) + sorted(TORCH_MODES)}")
    runners, infos = {}, {}
    for mode in modes:
        if mode in JAXTUNE_MODES:
            for variant, overrides in variants(args).items():
                name = f"{mode}@{variant}" if variant else mode
                margs = argparse.Namespace(**vars(args))
                overrides = dict(overrides)
                margs.logits_chunk = overrides.pop("logits_chunk", args.logits_chunk)
                margs.head_backward = overrides.pop("head_backward", "autodiff")
                margs.model = json.dumps({**json.loads(args.model), **overrides})
                runners[name], infos[name] = prepare_jaxtune(margs, *JAXTUNE_MODES[mode])
        else:
            cfg = model_config(args, run_config(args, "none", "none"))
            runners[mode], infos[mode] = prepare_torch(cfg, args, lora_rank=args.rank * TORCH_MODES[mode])
    times = {name: [] for name in runners}
    for r in range(args.repeats):
        for name, run in runners.items():
            times[name].append(run())
            print(f"round {r}: {name} {times[name][-1]:.3f} s/step (load {os.getloadavg()[0]:.1f})", file=sys.stderr,
                  flush=True)
    first = infos[next(iter(infos))]
    out = {"shape": {k: first[k] for k in ("params", "batch", "seq_len", "dtype")}, "rank": args.rank,
           "targets": args.targets, "steps": args.steps, "repeats": args.repeats, "cpu_count": os.cpu_count(),
           "load_avg": os.getloadavg()[0], "device_kind": first["device_kind"]}
    for name, info in infos.items():
        row = dict(info, **throughput(args, info, statistics.median(times[name])), rounds_s=[round(t, 4) for t in times[name]])
        out[name] = {k: v for k, v in row.items() if k not in out["shape"] and k not in ("family", "variant", "device_kind")}
    for name in infos:
        mode = name.split("@")[0]
        torch_name = "torch_" + ("full" if mode == "full" else "lora")
        if mode in JAXTUNE_MODES and torch_name in infos:
            out[f"ratio_{name.replace('@', '_')}_over_{torch_name}"] = round(
                out[name]["tokens_per_s"] / out[torch_name]["tokens_per_s"], 3)
    return out


def variants(args) -> dict[str, dict]:
    """{name: model overrides} of the jaxtune runs: --variants, or one per --attention, or one plain run."""
    if args.variants:
        return json.loads(args.variants)
    attentions = [a for a in args.attention.split(",") if a]
    return {a: {"attention": a} for a in attentions} or {"": {}}


def throughput(args, info: dict, step_s: float) -> dict:
    """tokens/s and MFU (6N + attention FLOPs per token) for a median step time."""
    tokens_per_s = info["tokens_per_step"] / step_s
    flops = tokens_per_s * metrics.train_flops_per_token(info["params"], info["num_layers"], info["hidden_size"],
                                                         info["seq_len"])
    out = {"step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1), "model_tflops_per_s": round(flops / 1e12, 4)}
    peak = metrics.peak_flops_per_device(args.peak_tflops) if info["framework"] == "jaxtune" else (
        args.peak_tflops * 1e12 or None)
    if peak:
        out["mfu"] = round(flops / (peak * info["devices"]), 4)
    if args.measured_peak_tflops:
        out["mfu_measured"] = round(flops / (args.measured_peak_tflops * 1e12 * info["devices"]), 4)
    return out


def run_config(args, method: str, quantize: str):
    config = base_config()
    config.peft.update(method=method, quantize=quantize, rank=args.rank, alpha=2.0 * args.rank, targets=args.targets)
    config.objective.type = "sft" if args.objective == "sft" else "preference"
    return config


def model_config(args, config):
    overrides = dict(dtype=args.dtype, remat_policy=args.remat)
    if args.variant == "tiny" and args.quickstart_shape:
        overrides.update(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=True)
    overrides.update(json.loads(args.model))
    return models.get_config(args.family, args.variant, **overrides)


def hf_llama_config(cfg, args):
    """The transformers LlamaConfig of a jaxtune Llama config (SDPA attention)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=max(cfg.max_position_embeddings, args.seq_len), attn_implementation="sdpa")


class TorchTraining(NamedTuple):
    model: Any
    optimizer: Any
    device: str
    autocast: Any
    info: dict


def torch_training(cfg, args, lora_rank: int) -> TorchTraining:
    """A Hugging Face PyTorch model (+ PEFT LoRA when lora_rank) at cfg's shape with AdamW. CUDA
    when available (bf16 autocast for a bfloat16 --dtype, fused AdamW), else CPU float32 with
    torch threads = CPU cores."""
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_llama_config(cfg, args)).to(device)
    if lora_rank:
        targets = list(peft_base.parse_targets(args.targets))
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and args.dtype == "bfloat16")
    info = {"framework": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": "lora" if lora_rank else "none", "params": models.count_params(cfg), "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "batch": args.batch, "seq_len": args.seq_len, "dtype": args.dtype,
            "devices": 1, "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
            "tokens_per_step": args.batch * args.seq_len, "threads": None if cuda else torch.get_num_threads(),
            "trainable_params": sum(p.numel() for p in trainable)}
    return TorchTraining(model, opt, device, autocast, info)


def prepare_torch(cfg, args, lora_rank: int):
    """(run, info): run() times --steps Hugging Face PyTorch (+ PEFT LoRA when lora_rank) steps at
    cfg's shape (torch_training) on one random full batch and returns seconds per step."""
    import torch

    model, opt, device, autocast, info = torch_training(cfg, args, lora_rank)
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len))).to(device)

    def step():
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run() -> float:
        t0 = time.time()
        for _ in range(args.steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.time() - t0) / args.steps

    step()  # warm-up (allocations, kernel selection)
    if device == "cuda":
        torch.cuda.synchronize()
    return run, info


def pair_batches(args, vocab_size: int, packing: bool, count: int) -> list[dict[str, np.ndarray]]:
    """`count` batches of real pairs from --pairs, through jaxtune's preference pipeline (mixture,
    shuffle, truncation, pad or pack), tokenized by a sentencepiece model of `vocab_size` pieces
    trained on them, or by `args.tokenizer` where set (dpo_side_by_side.py: shared with TRL)."""
    import gzip
    import tempfile
    from pathlib import Path

    from jaxtune.data import datasets
    from jaxtune.data.sources import JsonlSource
    from jaxtune.data import preference
    from jaxtune.data.tokenizers import train_sentencepiece

    work = Path(tempfile.gettempdir()) / f"jaxtune_pairs_bench_{os.getpid()}"
    work.mkdir(exist_ok=True)
    path = Path(args.pairs)
    if path.suffix == ".gz":
        plain = work / path.stem
        if not plain.exists():
            plain.write_bytes(gzip.decompress(path.read_bytes()))
        path = plain
    spm = Path(args.tokenizer) if getattr(args, "tokenizer", "") else work / f"spm{vocab_size}.model"
    if not spm.exists():
        source = JsonlSource(str(path))
        train_sentencepiece(list(preference.corpus(source, unpaired=False, limit=len(source))()), spm.with_suffix(""),
                            vocab_size=vocab_size)
    config = base_config()
    config.data.train_path, config.data.tokenizer, config.data.seq_len = str(path), str(spm), args.seq_len
    config.data.packing, config.data.max_pairs_per_row = packing, args.max_pairs_per_row
    data = datasets.load_preference_data(config.data, work, unpaired=False)
    it = iter(datasets.preference_train_dataset(data, config.data, batch_size=args.batch, seed=0, unpaired=False)[0])
    return [next(it) for _ in range(count)]


def compare_pair_layouts(args) -> dict:
    """DPO steps on real pairs, padded and/or packed (--pair_layouts), timed in alternating rounds."""
    layouts = [x for x in args.pair_layouts.split(",") if x]
    if args.objective != "dpo" or not set(layouts) <= {"padded", "packed"}:
        raise SystemExit("--pairs needs --objective dpo and --pair_layouts from padded,packed")
    cfg = model_config(args, run_config(args, args.peft, args.quantize))
    runners, infos = {}, {}
    for layout in layouts:
        batches = pair_batches(args, cfg.vocab_size, layout == "packed", args.steps)
        runners[layout], infos[layout] = prepare_jaxtune(args, args.peft, args.quantize, batches=batches)
    times = {layout: [] for layout in layouts}
    for _ in range(args.repeats):
        for layout, run in runners.items():
            times[layout].append(run())
    out = {"pairs_file": os.path.basename(args.pairs), "steps": args.steps, "repeats": args.repeats,
           "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()[0]}
    for layout, info in infos.items():
        step_s = statistics.median(times[layout])
        row = dict(info, **throughput(args, info, step_s), rounds_s=[round(t, 4) for t in times[layout]])
        row["pairs_per_s"] = round(info["pairs_per_step"] / step_s, 2)
        out[layout] = row
    if len(layouts) == 2:
        out["packed_over_padded_tokens_per_s"] = round(out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"], 3)
        out["packed_over_padded_pairs_per_s"] = round(out["packed"]["pairs_per_s"] / out["padded"]["pairs_per_s"], 3)
    return out


def head_backward(kind: str):
    """A context in which traced steps use the LM head + loss backward `kind`: "autodiff"
    (logprobs.head_token_stats, the default) or "hand-written" (head_token_stats_handwritten),
    patched where the train step and the objectives look the name up."""
    import contextlib
    from unittest import mock

    from jaxtune import logprobs
    from jaxtune.trainer import step

    if kind == "autodiff":
        return contextlib.nullcontext()
    if kind != "hand-written":
        raise SystemExit(f"head_backward={kind!r}: expected 'autodiff' or 'hand-written'")
    stack = contextlib.ExitStack()
    for module in (logprobs, step):
        stack.enter_context(mock.patch.object(module, "head_token_stats", logprobs.head_token_stats_handwritten))
    return stack


def prepare_jaxtune(args, method: str, quantize: str, batches: list[dict[str, np.ndarray]] | None = None):
    """(run, info): builds and compiles jaxtune's train step; run() times --steps steps (seconds
    per step). With --profile, writes the optimized HLO now and traces the first run().
    `batches` (real data, e.g. pair_batches): the steps cycle through them instead of one random batch."""
    config = run_config(args, method, quantize)
    cfg = model_config(args, config)
    model = trainer.build_model(config, cfg)
    spec = trainer.peft_spec(config)
    tx, lr = optim.build(base_config().optim, 1000)
    n = jax.device_count()
    mesh = sharding.build_mesh({"data": 1, "fsdp": n, "tensor": 1})
    rules = sharding.rules(args.rules)
    apply_fn = trainer.make_apply_fn(model, logits_chunk=args.logits_chunk)
    objective = objectives.build(config)
    reference_kind = objective.reference_kind()

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
    real_tokens, pairs_per_step = int(np.prod(rows)) * T, B
    if batches is not None:
        batch = batches[0]
        real_tokens = int(np.mean([np.count_nonzero(b["segment_ids"]) for b in batches]))
        if "pair_mask" in batch:
            pairs_per_step = float(np.mean([b["pair_mask"].sum() for b in batches]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract, shardings, init = trainer.plan_state(model, tx, mesh, rules, seq_len=T)
        holder = {"state": init(jax.random.key(0))}
        ref = init(jax.random.key(0)).params if reference_kind == "copy" else None
        batch_sharding = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        batch = {k: jax.device_put(v, batch_sharding[k]) for k, v in batch.items()}
        placed = [batch] if batches is None else [
            {k: jax.device_put(v, batch_sharding[k]) for k, v in b.items()} for b in batches]
        step = jax.jit(trainer.make_train_step(objective, apply_fn, tx, lr, accum=1),
                       in_shardings=(shardings, batch_sharding, shardings.params if ref is not None else None),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
        t0 = time.time()
        with head_backward(getattr(args, "head_backward", "autodiff")):
            compiled = step.lower(holder["state"], batch, ref).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        holder["state"], m = compiled(holder["state"], batch, ref)
        jax.block_until_ready(m)
        compile_s = time.time() - t0
    tag = f"{method}_{quantize}_{getattr(cfg, 'attention', 'default')}"
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        with open(os.path.join(args.profile, f"step_{tag}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    profile = [bool(args.profile)]

    def run() -> float:
        if profile[0]:
            jax.profiler.start_trace(os.path.join(args.profile, tag), create_perfetto_trace=True)
        t0 = time.time()
        for i in range(args.steps):
            holder["state"], m = compiled(holder["state"], placed[i % len(placed)], ref)
        jax.block_until_ready(m)
        seconds = (time.time() - t0) / args.steps
        if profile[0]:
            jax.profiler.stop_trace()
            profile[0] = False
        return seconds

    num_params = models.count_params(cfg)
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    info = {
        "framework": "jaxtune", "jax": jax.__version__, "objective": args.objective, "reference": reference_kind,
        "family": args.family, "variant": args.variant, "params": num_params, "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size, "batch": B, "seq_len": T, "dtype": args.dtype, "remat": args.remat,
        "attention": getattr(cfg, "attention", None), "layer_loop": getattr(cfg, "layer_loop", None),
        "head_backward": getattr(args, "head_backward", "autodiff"), "devices": n, "device_kind": jax.devices()[0].device_kind,
        "tokens_per_step": real_tokens, "slots_per_step": int(np.prod(batch["inputs"].shape)),
        "pairs_per_step": pairs_per_step, "compile_s": round(compile_s, 2),
        "xla_gflops": round(float(cost.get("flops", 0.0)) / 1e9, 3),
        "peft": method, "quantize": quantize, "trainable_params": sum(x.size for x in jax.tree.leaves(abstract.params)),
        "opt_state_bytes": nbytes(abstract.opt_state), "base_bytes": nbytes(abstract.frozen if spec else abstract.params),
    }
    if spec is not None and spec.quantize != "none":
        info.update({k: round(v, 4) for k, v in quant.bytes_per_param(abstract.frozen).items()})
    return run, info


if __name__ == "__main__":
    main()
