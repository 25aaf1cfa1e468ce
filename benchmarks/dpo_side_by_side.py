"""DPO side by side per real token: jaxtune packed and padded pairs vs TRL's DPOTrainer.

    python benchmarks/dpo_side_by_side.py --variant llama3.2-1b --dtype bfloat16 --batch 8 --seq_len 1024 \\
        --peak_tflops 989
    python benchmarks/dpo_side_by_side.py --smoke       # tiny model, a couple of steps, any backend

Both sides train on the same synthetic pairs with the same tokenizer: each pair is a prompt and
two responses of hh-rlhf-like token lengths (log-normal; prompt median 60, responses median 50,
sigma 0.8), written as words "t<id>" that a word-level tokenizer.json maps back to ids, so
jaxtune (data.tokenizer = that file) and TRL (the same file through transformers) see the same
token sequences. jaxtune runs through its own preference pipeline (benchmarks/train_step.py
--pairs: padded [B, 2, T] and packed rows); TRL 1.16 pads (its padding-free DPO is disabled).
Real (non-padding) tokens per second, pairs per second and MFU (policy forward + backward,
6N + attention per real token; the reference forward is extra work no side gets credit for).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step

from jaxtune import metrics

LENGTHS = {"prompt": (60.0, 0.8), "response": (50.0, 0.8)}  # median tokens, sigma of log length


def write_pairs(path: Path, count: int, vocab: int, seq_len: int) -> None:
    rng = np.random.default_rng(0)
    draw = lambda kind: max(2, int(rng.lognormal(np.log(LENGTHS[kind][0]), LENGTHS[kind][1])))
    words = lambda n: " ".join(f"t{i}" for i in rng.integers(3, vocab, n))
    with path.open("w") as f:
        for _ in range(count):
            prompt = min(draw("prompt"), seq_len // 2)
            chosen, rejected = (min(draw("response"), seq_len - prompt - 2) for _ in range(2))
            f.write(json.dumps({"prompt": words(prompt), "chosen": words(chosen), "rejected": words(rejected)}) + "\n")


def write_tokenizer(directory: Path, vocab: int):
    """A word-level tokenizer ("t<i>" -> i; 0 pad, 1 eos, 2 unk) saved as a Hugging Face directory."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(pieces, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def trl_dpo(cfg, args, pairs: Path, tokenizer):
    """(run, info): TRL DPOTrainer, --steps optimizer steps of --batch pairs (beta 0.1, sigmoid loss),
    the reference a frozen copy (full) or the adapter-free base (LoRA); seconds per step from its
    own callbacks over the steps after the first."""
    import datasets
    import torch
    import transformers
    import trl

    cuda = torch.cuda.is_available()
    model = transformers.LlamaForCausalLM(train_step.hf_llama_config(cfg, args))
    lora = None
    if args.peft == "lora":
        import peft

        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                               target_modules=list(train_step.peft_base.parse_targets(args.targets)))
    config = trl.DPOConfig(
        output_dir=os.path.join(args.workdir, "trl_dpo"), max_steps=args.steps + 1, per_device_train_batch_size=args.batch,
        max_length=args.seq_len, learning_rate=1e-4, beta=0.1, logging_steps=1, save_strategy="no", report_to=[],
        bf16=cuda and args.dtype == "bfloat16", use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True)
    times: list[float] = []
    tokens: list[int] = []

    data = datasets.load_dataset("json", data_files=str(pairs), split="train")
    ref = None if lora is not None else copy.deepcopy(model).eval()  # full: a frozen copy, like jaxtune's
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora, callbacks=[train_step.step_timer(times, cuda)])
    rows = trainer.train_dataset
    for i in range(min(len(rows), args.batch * (args.steps + 1))):
        r = rows[i]
        tokens.append(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]))
    info = {"framework": "trl", "trl": trl.__version__, "params": train_step.models.count_params(cfg),
            "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "seq_len": args.seq_len, "devices": 1,
            "tokens_per_step": sum(tokens) / (args.steps + 1), "pairs_per_step": args.batch}

    def run() -> float:
        times.clear()
        trainer.train()
        return statistics.median(times[1:] or times)

    return run, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="llama3.2-1b")
    p.add_argument("--model", default="{}", help="JSON model config overrides")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--peft", choices=("none", "lora"), default="none")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="pairs per step (jaxtune packed: rows of pairs)")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pairs_count", type=int, default=4000)
    p.add_argument("--modes", default="jaxtune,trl", help="jaxtune (padded and packed), trl")
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--measured_peak_tflops", type=float, default=0.0)
    p.add_argument("--workdir", default="/tmp/jaxtune_dpo_side_by_side")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, 1 repeat: checks every mode runs")
    args = p.parse_args()
    if args.smoke:
        args.variant, args.dtype, args.batch, args.seq_len, args.steps, args.repeats = "tiny", "float32", 2, 128, 2, 1
        args.pairs_count = 64
    print(json.dumps(run(args)))


def run(args) -> dict:
    args.family, args.remat, args.rules, args.targets, args.objective = "llama", "none", "fsdp", "all-linear", "dpo"
    args.quickstart_shape, args.logits_chunk, args.profile = args.variant == "tiny", 512, ""
    args.quantize, args.max_pairs_per_row, args.pair_layouts = "none", 16, "padded,packed"
    cfg = train_step.model_config(args, train_step.run_config(args, args.peft, "none"))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pairs = work / "pairs.jsonl"
    write_pairs(pairs, args.pairs_count, cfg.vocab_size, args.seq_len)
    tokenizer = write_tokenizer(work / "tokenizer", cfg.vocab_size)
    args.pairs, args.tokenizer = str(pairs), str(work / "tokenizer" / "tokenizer.json")
    modes = [m for m in args.modes.split(",") if m]
    out: dict = {"peft": args.peft, "pairs_per_step": args.batch, "seq_len": args.seq_len, "steps": args.steps,
                 "repeats": args.repeats, "lengths": LENGTHS}
    if "jaxtune" in modes:
        out["jaxtune"] = train_step.compare_pair_layouts(args)
    if "trl" in modes:
        if train_step.has_module("trl"):
            runner, info = trl_dpo(cfg, args, pairs, tokenizer)
            step_s = statistics.median(runner() for _ in range(args.repeats))
            tokens_per_s = info["tokens_per_step"] / step_s
            flops = tokens_per_s * metrics.train_flops_per_token(info["params"], info["num_layers"], info["hidden_size"],
                                                                 info["seq_len"])
            row = {"step_s": round(step_s, 4), "real_tokens_per_s": round(tokens_per_s, 1),
                   "pairs_per_s": round(info["pairs_per_step"] / step_s, 2), "trl": info["trl"]}
            if args.peak_tflops:
                row["mfu"] = round(flops / (args.peak_tflops * 1e12), 4)
            if args.measured_peak_tflops:
                row["mfu_measured"] = round(flops / (args.measured_peak_tflops * 1e12), 4)
            out["trl"] = row
        else:
            out["trl"] = {"skipped": "trl is not installed (pip install -e '.[bench]')"}
    for layout in ("padded", "packed"):
        mine = out.get("jaxtune", {}).get(layout)
        if mine and "real_tokens_per_s" in out.get("trl", {}):
            out[f"ratio_jaxtune_{layout}_over_trl_pairs_per_s"] = round(mine["pairs_per_s"] / out["trl"]["pairs_per_s"], 3)
    return out


if __name__ == "__main__":
    main()
