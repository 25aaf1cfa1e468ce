"""Packed SFT on realistic length spreads, side by side, per REAL token (padding earns nothing).

    python benchmarks/packed_sft.py --variant llama3.2-1b --dtype bfloat16 --batch 8 --seq_len 2048 \\
        --peak_tflops 989 --modes jaxtune_packed,jaxtune_full_rows,jaxtune_padded,torch_padded,trl_packed
    python benchmarks/packed_sft.py --smoke        # tiny model, a few steps of every mode (any backend)

Example lengths are drawn from a log-normal spread (--spread): `hh_rlhf` is fitted to
../shared/data/hh_rlhf_harmless_base_test.jsonl.gz (chars / 4 per chosen conversation: median 118
tokens, sigma 0.84 in log space); `long_chat` (median 700, sigma 0.8) is an assumed longer
chat-SFT spread; --lengths_from FILE measures a JSONL(.gz) file the same way. Modes:

    jaxtune_packed     jaxtune's SFT step on rows packed with the examples (segment ids; on GPU
                       `auto` attention = the Pallas flash kernel, models/gpu_flash_attention.py)
    jaxtune_full_rows  every slot one real segment (on GPU: cuDNN) - the per-token ceiling that
                       packed rows should reach (issue 25: packed >= 0.95x of it)
    jaxtune_padded     one example per row, right-padded to --seq_len (cuDNN on GPU)
    torch_padded       Hugging Face PyTorch, --batch examples per step padded to the longest
    trl_packed         TRL SFTTrainer with packing (best-fit decreasing, padding-free), when trl
                       is installed (the `bench` extra); its own data collator and optimizer step

Every mode trains on the same examples in the same order where its layout allows; each reports
real tokens/s, MFU (6N + attention FLOPs per real token against --peak_tflops or the device's
datasheet peak), the fill (real / computed tokens) and computed slots/s (the kernels' speed
whatever the fill). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step

from jaxtune import metrics

SPREADS = {"hh_rlhf": (118.0, 0.84), "long_chat": (700.0, 0.8)}  # (median tokens, sigma of log length)
MODES = ("jaxtune_packed", "jaxtune_full_rows", "jaxtune_padded", "torch_padded", "trl_packed")


def example_lengths(args, count: int) -> np.ndarray:
    """`count` token lengths in [8, seq_len] from the spread or the file, in a fixed order."""
    rng = np.random.default_rng(0)
    if args.lengths_from:
        opener = gzip.open if args.lengths_from.endswith(".gz") else open
        with opener(args.lengths_from, "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        text = lambda r: r.get("chosen") or r.get("text") or json.dumps(r)
        pool = np.array([len(text(r) if isinstance(text(r), str) else json.dumps(text(r))) // 4 for r in rows])
        lengths = rng.choice(pool, count)
    else:
        median, sigma = SPREADS[args.spread]
        lengths = rng.lognormal(np.log(median), sigma, count)
    return np.clip(lengths.astype(np.int64), 8, args.seq_len)


def packed_batches(lengths: np.ndarray, batch: int, seq_len: int, steps: int, vocab: int) -> tuple[list, int]:
    """`steps` batches of `batch` rows packed first-fit in arrival order (an example that fits no
    open row opens the next; a full step is emitted when a row would overflow the batch), and the
    number of examples used."""
    rng = np.random.default_rng(1)
    out, used = [], 0
    for _ in range(steps):
        seg = np.zeros((batch, seq_len), np.int32)
        pos = np.zeros((batch, seq_len), np.int32)
        fill = [0] * batch
        count = [0] * batch
        while used < len(lengths):
            n = int(lengths[used])
            row = next((r for r in range(batch) if fill[r] + n <= seq_len), None)
            if row is None:
                break
            count[row] += 1
            seg[row, fill[row]:fill[row] + n] = count[row]
            pos[row, fill[row]:fill[row] + n] = np.arange(n)
            fill[row] += n
            used += 1
        out.append(_batch(seg, pos, rng, vocab))
    return out, used


def padded_batches(lengths: np.ndarray, batch: int, seq_len: int, steps: int, vocab: int) -> list:
    rng = np.random.default_rng(1)
    out = []
    for s in range(steps):
        chunk = lengths[s * batch:(s + 1) * batch]
        real = np.arange(seq_len)[None] < chunk[:, None]
        pos = np.where(real, np.arange(seq_len)[None], 0).astype(np.int32)
        out.append(_batch(real.astype(np.int32), pos, rng, vocab))
    return out


def full_rows(batch: int, seq_len: int, steps: int, vocab: int) -> list:
    rng = np.random.default_rng(1)
    seg = np.ones((batch, seq_len), np.int32)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    return [_batch(seg, pos, rng, vocab) for _ in range(steps)]


def _batch(seg: np.ndarray, pos: np.ndarray, rng, vocab: int) -> dict:
    tokens = rng.integers(1, vocab, seg.shape).astype(np.int32) * (seg != 0)
    return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": (seg != 0).astype(np.int32),
            "segment_ids": seg, "positions": pos}


def torch_padded(cfg, args, lengths: np.ndarray):
    """(run, info): HF PyTorch steps on --batch examples per step, padded to the step's longest."""
    import torch

    model, opt, device, autocast, info = train_step.torch_training(cfg, args, lora_rank=_lora_rank(args))
    rng = np.random.default_rng(1)
    steps = []
    for s in range(args.steps):
        chunk = lengths[s * args.batch:(s + 1) * args.batch]
        width = int(chunk.max())
        ids = rng.integers(1, cfg.vocab_size, (len(chunk), width))
        mask = np.arange(width)[None] < chunk[:, None]
        labels = np.where(mask, ids, -100)
        steps.append(tuple(torch.as_tensor(x).to(device) for x in (ids * mask, mask.astype(np.int64), labels)))

    def run() -> float:
        t0 = time.time()
        for ids, mask, labels in steps:
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.time() - t0) / len(steps)

    run()  # warm-up: every padded width once
    real = int(lengths[:args.steps * args.batch].sum())
    info.update(tokens_per_step=real / args.steps, slots_per_step=sum(int(x[0].numel()) for x in steps) / args.steps)
    return run, info


def trl_packed(cfg, args, lengths: np.ndarray):
    """(run, info): TRL SFTTrainer (packing=True: best-fit decreasing, padding-free) on the same
    examples, --steps optimizer steps of --batch packed rows of --seq_len; seconds per step from
    its own timer over the steps after the first."""
    import datasets
    import torch
    import transformers
    import trl

    cuda = torch.cuda.is_available()
    hf = train_step.hf_llama_config(cfg, args)
    attn = "flash_attention_2" if cuda and train_step.has_module("flash_attn") else "sdpa"
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation=attn)
    rng = np.random.default_rng(1)
    ids = [rng.integers(1, cfg.vocab_size, int(n)).tolist() for n in lengths]
    data = datasets.Dataset.from_dict({"input_ids": ids})
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_dummy_tokenizer(cfg.vocab_size), pad_token="<pad>", eos_token="<eos>")
    config = trl.SFTConfig(
        output_dir=os.path.join(args.workdir, "trl_sft"), max_steps=args.steps + 1, per_device_train_batch_size=args.batch,
        max_length=args.seq_len, packing=True, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
        bf16=cuda and args.dtype == "bfloat16", use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True)
    times: list[float] = []

    lora = None
    if args.peft == "lora":
        import peft

        targets = list(train_step.peft_base.parse_targets(args.targets))
        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[train_step.step_timer(times, cuda)], peft_config=lora)
    info = {"framework": "trl", "trl": trl.__version__, "attn_implementation": attn, "params": train_step.models.count_params(cfg),
            "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "seq_len": args.seq_len, "devices": 1,
            "slots_per_step": args.batch * args.seq_len}

    def run() -> float:
        times.clear()
        trainer.train()
        # real tokens per step from TRL's own count (padding-free rows: every token is real)
        seen = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r][-(args.steps + 1):]
        info["tokens_per_step"] = (seen[-1] - seen[0]) / (len(seen) - 1) if len(seen) > 1 else seen[0]
        return statistics.median(times[1:] or times)

    return run, info


def _lora_rank(args) -> int:
    return args.rank if args.peft == "lora" else 0


def _dummy_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` pieces: TRL wants a processing class; the data is already ids."""
    from tokenizers import Tokenizer, models

    pieces = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    return Tokenizer(models.WordLevel(pieces, unk_token="<pad>"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="llama3.2-1b")
    p.add_argument("--model", default="{}", help="JSON model config overrides")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--peft", choices=("none", "lora"), default="none", help="lora: all-linear, --rank, every mode")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="rows per step (padded modes: examples per step)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--spread", choices=tuple(SPREADS), default="hh_rlhf")
    p.add_argument("--lengths_from", default="", help="JSONL(.gz) whose records' lengths (chars / 4) to sample")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--measured_peak_tflops", type=float, default=0.0)
    p.add_argument("--workdir", default="/tmp/jaxtune_packed_sft")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, 1 repeat: checks every mode runs")
    args = p.parse_args()
    if args.smoke:
        args.variant, args.dtype, args.batch, args.seq_len, args.steps, args.repeats = "tiny", "float32", 2, 256, 2, 1
        args.spread = "hh_rlhf"
    print(json.dumps(run(args)))


def run(args) -> dict:
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; expected some of {', '.join(MODES)}")
    # train_step's model/torch builders read these fields
    args.family, args.remat, args.rules, args.targets = "llama", "none", "fsdp", "all-linear"
    args.objective, args.logits_chunk, args.profile = "sft", 512, ""
    args.quickstart_shape = args.variant == "tiny"
    cfg = train_step.model_config(args, train_step.run_config(args, args.peft, "none"))
    lengths = example_lengths(args, 64 * args.batch * max(args.steps, 1) + 1000)
    packed, used = packed_batches(lengths, args.batch, args.seq_len, args.steps, cfg.vocab_size)
    runners, infos = {}, {}
    for mode in modes:
        if mode == "jaxtune_packed":
            runners[mode], infos[mode] = train_step.prepare_jaxtune(args, args.peft, "none", batches=packed)
        elif mode == "jaxtune_full_rows":
            rows = full_rows(args.batch, args.seq_len, args.steps, cfg.vocab_size)
            runners[mode], infos[mode] = train_step.prepare_jaxtune(args, args.peft, "none", batches=rows)
        elif mode == "jaxtune_padded":
            rows = padded_batches(lengths, args.batch, args.seq_len, args.steps, cfg.vocab_size)
            runners[mode], infos[mode] = train_step.prepare_jaxtune(args, args.peft, "none", batches=rows)
        elif mode == "torch_padded":
            runners[mode], infos[mode] = torch_padded(cfg, args, lengths)
        elif train_step.has_module("trl"):
            runners[mode], infos[mode] = trl_packed(cfg, args, lengths)
        else:
            infos[mode] = {"skipped": "trl is not installed (pip install -e '.[bench]')"}
    times: dict[str, list[float]] = {m: [] for m in runners}
    for _ in range(args.repeats):
        for mode, runner in runners.items():
            times[mode].append(runner())
    median, sigma = SPREADS[args.spread]
    out = {"peft": args.peft, "spread": args.lengths_from or args.spread, "spread_median_tokens": median, "spread_sigma": sigma,
           "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "repeats": args.repeats,
           "examples_packed_per_step": round(used / max(args.steps, 1), 1), "load_avg": os.getloadavg()[0]}
    for mode, info in infos.items():
        if mode not in times:
            out[mode] = info
            continue
        step_s = statistics.median(times[mode])
        tokens_per_s = info["tokens_per_step"] / step_s
        flops = tokens_per_s * metrics.train_flops_per_token(info["params"], info["num_layers"], info["hidden_size"],
                                                             info["seq_len"])
        row = {"step_s": round(step_s, 4), "real_tokens_per_s": round(tokens_per_s, 1),
               "fill": round(info["tokens_per_step"] / info["slots_per_step"], 3),
               # computed token slots per second: the kernels' speed whatever the fill
               "slot_tokens_per_s": round(info["slots_per_step"] / step_s, 1),
               "model_tflops_per_s": round(flops / 1e12, 3), "attention": info.get("attention"),
               "device_kind": info.get("device_kind"), "compile_s": info.get("compile_s"),
               "rounds_s": [round(t, 4) for t in times[mode]]}
        peak = args.peak_tflops * 1e12 or (metrics.peak_flops_per_device(0.0) if info["framework"] == "jaxtune" else None)
        if peak:
            row["mfu"] = round(flops / (peak * info["devices"]), 4)
        if args.measured_peak_tflops:
            row["mfu_measured"] = round(flops / (args.measured_peak_tflops * 1e12 * info["devices"]), 4)
        row.update({k: info[k] for k in ("attn_implementation", "trl") if k in info})
        out[mode] = row
    for mode in ("jaxtune_packed", "jaxtune_padded", "torch_padded", "trl_packed"):
        for base in ("jaxtune_full_rows", "torch_padded", "trl_packed"):
            if mode != base and "real_tokens_per_s" in out.get(mode, {}) and "real_tokens_per_s" in out.get(base, {}):
                out[f"ratio_{mode}_over_{base}"] = round(out[mode]["real_tokens_per_s"] / out[base]["real_tokens_per_s"], 3)
    return out


if __name__ == "__main__":
    main()
