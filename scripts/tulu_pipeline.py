"""Tulu 3's recipe, small: SFT -> on-policy preference pairs -> DPO -> GRPO (RL with verifiable rewards).

    python scripts/tulu_pipeline.py --workdir runs/tulu

On the built-in arithmetic word problems (jaxtune/data/builtin/verifiable.py) with the quickstart's
from-scratch model (configs/grpo.py):
1. SFT on the training problems' worked solutions (configs/grpo.py:stage=sft, --sft-steps).
2. On-policy preference data, as Tulu 3 builds it: the SFT model samples --samples completions for
   each of --pair-prompts *training* prompts; the verifiers (the GRPO config's rewards: math and
   worked_steps) score them; each prompt whose samples differ gives one pair, chosen = the best
   sample, rejected = the worst (WORKDIR/pairs.jsonl).
3. DPO (full fine-tuning, sigmoid loss, reference = a frozen copy of the SFT model) on those pairs
   (--dpo-beta, --dpo-lr, --dpo-steps).
4. GRPO from the DPO model (configs/grpo.py, --grpo-steps).
After each stage the same 300 held-out problems (never trained on, 3 operations: GRPO's eval set)
are answered greedily and by sampling (2 per prompt), scored by the same verifiers: accuracy (every
reward right) and mean reward, with the time each stage took. A rerun resumes: finished stages are
kept (delete a stage's folder to redo it). `--tiny` checks the mechanics in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from stage_clock import StageClock

import jaxtune
from jaxtune import objectives
from jaxtune.metrics import read_metrics

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo.py"
# A model and budgets for --tiny: mechanics only (the numbers mean nothing).
TINY_MODEL = {"model.num_layers": 1, "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_heads": 2,
              "model.num_kv_heads": 1, "data.num_eval_examples": 4, "data.num_train_examples": 200, "eval.loss": False}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/tulu")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds every stage (init, data order, sampling); outputs go to WORKDIR/seed<N>")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--pair-prompts", type=int, default=256, help="training prompts sampled for preference pairs")
    parser.add_argument("--samples", type=int, default=4, help="SFT-model samples per prompt")
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--dpo-lr", type=float, default=1e-5)
    parser.add_argument("--dpo-batch", type=int, default=8, help="pairs per DPO step")
    parser.add_argument("--grpo-steps", type=int, default=40)
    parser.add_argument("--reference-chosen", action="store_true",
                        help="where every sample of a prompt scores the same, pair the reference solution (chosen) "
                             "with a sample (rejected): off-policy chosen, for models too weak to ever differ (--tiny)")
    parser.add_argument("--skip-grpo", action="store_true", help="stop after DPO (for tuning DPO)")
    parser.add_argument("--tiny", action="store_true", help="mechanics only: a 1-layer model, a few steps")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sft_steps, args.pair_prompts, args.samples, args.dpo_steps, args.grpo_steps = 2, 8, 2, 2, 1
        args.dpo_batch, args.reference_chosen = 2, True
    for name in ("sft_steps", "pair_prompts", "samples", "dpo_steps", "grpo_steps", "dpo_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.samples < 2:
        parser.error("--samples must be >= 2 (a pair needs two samples)")
    if not (args.dpo_beta > 0 and args.dpo_lr > 0):
        parser.error("--dpo-beta and --dpo-lr must be > 0")
    return args


def seed_dir(args) -> Path:
    return Path(args.workdir) / f"seed{args.seed}"


def common(args) -> dict:
    # Every stage after SFT names the SFT run's tokenizer: a run started from a run that was itself
    # started from another (GRPO from DPO from SFT) does not find it through model.init_from alone.
    tokenizer = seed_dir(args) / "sft" / "tokenizer.model"
    return {"train.progress_bar": False, "seed": args.seed, **(TINY_MODEL if args.tiny else {}),
            **({"data.tokenizer": str(tokenizer)} if tokenizer.is_file() else {})}


def grpo_config(args, init_from: Path):
    overrides = {**common(args), "train.steps": args.grpo_steps, "train.max_seconds": 0.0,
                 "train.log_every": max(args.grpo_steps // 5, 1)}
    if args.tiny:
        overrides.update({"objective.grpo.num_prompts": 2, "objective.grpo.num_generations": 2,
                          "objective.grpo.max_completion_tokens": 4, "train.global_batch_size": 4})
    return jaxtune.load_config(f"{CONFIG}:init_from={init_from}", overrides)


def heldout_scores(args, run_dir: Path) -> dict[str, float]:
    """GRPO's held-out evaluation (greedy + sampled accuracy and reward) of `run_dir`'s latest
    checkpoint: exactly what the GRPO stage logs before and after training. Kept in
    `run_dir/heldout_step<N>.json`, so a DPO sweep does not evaluate the same SFT model again."""
    step = max((r.get("step", 0) for r in read_metrics(run_dir)), default=0)
    cached = run_dir / f"heldout_step{step}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    config = grpo_config(args, run_dir)
    objective = objectives.build(config)
    data = objective.load_data(run_dir)
    model = jaxtune.load(str(run_dir))
    scores = objective.evaluate(model.model, model.params, model.tokenizer, objective.eval_set(data))
    cached.write_text(json.dumps(scores))
    return scores


def build_pairs(args, sft_dir: Path, path: Path) -> dict:
    """On-policy pairs from the SFT model's samples on training prompts, labelled by the verifiers."""
    config = grpo_config(args, sft_dir)
    objective = objectives.build(config)
    data = objective.load_data(sft_dir)
    records = list(data.train[: args.pair_prompts])
    model = jaxtune.load(str(sft_dir))
    rollouts, _, totals, _ = objective.sample(model.model, model.params, model.tokenizer, records,
                                              group_size=args.samples, seed=config.seed, temperature=1.0)
    totals = totals.reshape(len(records), args.samples)
    texts = np.asarray([r.text.strip() for r in rollouts], dtype=object).reshape(len(records), args.samples)
    pairs = []
    for record, rewards, samples in zip(records, totals, texts):
        best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
        if rewards[best] > rewards[worst] and samples[best] != samples[worst]:
            pairs.append({"prompt": record["prompt"], "chosen": samples[best], "rejected": samples[worst],
                          "chosen_reward": float(rewards[best]), "rejected_reward": float(rewards[worst])})
        elif args.reference_chosen and samples[worst] != record["solution"]:
            pairs.append({"prompt": record["prompt"], "chosen": record["solution"], "rejected": samples[worst],
                          "chosen_reward": None, "rejected_reward": float(rewards[worst])})
    if not pairs:
        raise SystemExit("tulu_pipeline: no training prompt had samples of different reward; no preference pairs "
                         "(train SFT longer or sample more per prompt)")
    with path.open("w") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    return {"prompts": len(records), "pairs": len(pairs), "mean_sample_reward": float(totals.mean()),
            "reference_chosen": sum(p["chosen_reward"] is None for p in pairs)}


def dpo_config(args, sft_dir: Path, pairs: Path):
    """The SFT model's shape and data settings, trained with DPO on the pairs (rendered like SFT)."""
    return jaxtune.load_config(f"{CONFIG}:stage=sft", {
        **common(args), "objective.type": "dpo", "objective.dpo.beta": args.dpo_beta,
        "model.init_from": str(sft_dir), "data.builtin": "", "data.train_path": str(pairs),
        "data.templates": (("{prompt} A:", " {response}"),), "data.packing": False,
        "train.steps": args.dpo_steps, "train.global_batch_size": args.dpo_batch, "train.log_every": max(args.dpo_steps // 5, 1),
        "optim.lr": args.dpo_lr, "optim.warmup_steps": max(args.dpo_steps // 10, 1), "optim.schedule": "linear",
        "optim.min_lr_ratio": 0.0, "optim.weight_decay": 0.0, "train.checkpoint_every": max(args.dpo_steps, 1),
    })


def train(config, run_dir: Path) -> None:
    """One stage; a stage stopped by a signal ends the pipeline (rerunning resumes it)."""
    summary = jaxtune.train(config, str(run_dir))
    if summary.stopped_early:
        raise SystemExit(f"tulu_pipeline: {run_dir} stopped at step {summary.steps}; rerun the same command to resume")


def finished(run_dir: Path, steps: int) -> bool:
    """Whether an earlier invocation trained this stage to the end (then it is kept, not redone)."""
    return (run_dir / "checkpoints").is_dir() and any(r.get("step", 0) >= steps for r in read_metrics(run_dir))


def report(name: str, scores: dict[str, float], seconds: float, before: dict[str, float] | None = None) -> str:
    def cell(key):
        value = f"{scores[key]:6.1%}"
        return value + (f" ({100 * (scores[key] - before[key]):+5.1f})" if before else "")

    return (f"| {name} | {cell('greedy/accuracy')} | {cell('sampled/accuracy')} | {cell('greedy/reward')} | "
            f"{cell('sampled/reward')} | {seconds['wall_s']:.0f} | "
            + (f"{seconds['cpu_s']:.0f} |" if seconds["cpu_s"] is not None else "- |"))


class StageTimes:
    """Each stage's wall and CPU seconds, kept in WORKDIR/seed<N>/times.json so a resumed run still
    reports them."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.exists() else {}

    def run(self, key: str, fn) -> None:
        with StageClock() as clock:
            fn()
        self.times[key] = clock.times
        self.path.write_text(json.dumps(self.times, indent=1))

    def total(self, *keys: str) -> dict[str, float | None]:
        """The stages' summed wall and CPU seconds (0 for a stage not timed; CPU None where a
        stage's times were written before CPU time was kept)."""
        timed = [self.times.get(key, {"wall_s": 0.0, "cpu_s": 0.0}) for key in keys]
        cpu = [t.get("cpu_s") for t in timed]
        return {"wall_s": sum(t["wall_s"] for t in timed), "cpu_s": None if None in cpu else sum(cpu)}


def eval_rows(run_dir: Path) -> list[dict[str, float]]:
    """The GRPO run's held-out evaluations (before and after training), keys without "eval/"."""
    return [{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}
            for r in read_metrics(run_dir) if "eval/greedy/accuracy" in r]


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = seed_dir(args)
    workdir.mkdir(parents=True, exist_ok=True)
    sft_dir, pairs_path = workdir / "sft", workdir / f"pairs_n{args.pair_prompts}_g{args.samples}.jsonl"
    dpo_name = f"dpo_beta{args.dpo_beta:g}_lr{args.dpo_lr:g}_steps{args.dpo_steps}_n{args.pair_prompts}"
    dpo_dir, grpo_dir = workdir / dpo_name, workdir / dpo_name / f"grpo_steps{args.grpo_steps}"
    times = StageTimes(workdir / "times.json")
    scores = {}
    invocation = StageClock()

    if not finished(sft_dir, args.sft_steps):
        sft = jaxtune.load_config(f"{CONFIG}:stage=sft", {**common(args), "train.steps": args.sft_steps,
                                                          "eval.generative": False})  # judged below, as every stage
        times.run("SFT", lambda: train(sft, sft_dir))
    scores["SFT"] = heldout_scores(args, sft_dir)

    stats_path = pairs_path.with_suffix(".stats.json")
    if not stats_path.exists():
        times.run(pairs_path.name, lambda: stats_path.write_text(json.dumps(build_pairs(args, sft_dir, pairs_path))))
    stats = json.loads(stats_path.read_text())
    print(f"tulu_pipeline: {stats['pairs']} on-policy pairs from {stats['prompts']} training prompts x {args.samples} "
          f"SFT samples (mean sample reward {stats['mean_sample_reward']:.2f}; {stats['reference_chosen']} with the "
          "reference solution as chosen)")

    if not finished(dpo_dir, args.dpo_steps):
        times.run(dpo_name, lambda: train(dpo_config(args, sft_dir, pairs_path), dpo_dir))
    if args.skip_grpo:
        scores["DPO"] = heldout_scores(args, dpo_dir)
    else:  # GRPO evaluates its starting model (the DPO model) and its result on the same held-out set
        if not finished(grpo_dir, args.grpo_steps):
            times.run(f"{dpo_name}/grpo", lambda: train(grpo_config(args, dpo_dir), grpo_dir))
        rows = eval_rows(grpo_dir)
        scores["DPO"], scores["GRPO"] = rows[0], rows[-1]

    seconds = {"SFT": times.total("SFT"), "DPO": times.total(pairs_path.name, dpo_name),
               "GRPO": times.total(f"{dpo_name}/grpo")}
    lines = ["| after stage | greedy accuracy | sampled accuracy | greedy reward | sampled reward | wall s | CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    previous = None
    for stage, stage_scores in scores.items():
        lines.append(report(stage, stage_scores, seconds[stage], scores[previous] if previous else None))
        previous = stage
    text = "\n".join(lines)
    invocation.stop()
    (dpo_dir / "pipeline.json").write_text(json.dumps({"args": vars(args), "pairs": stats, "times_s": times.times,
                                                       "invocation_s": invocation.times, "scores": scores}, indent=1))
    heldout = grpo_config(args, sft_dir).data.num_eval_examples
    print(f"\nheld-out: {heldout} unseen 3-operation problems, greedy and sampled (in brackets: points vs the "
          f"previous stage); stage time, wall and CPU (this process and its children, every thread): training "
          f"(+ building the pairs for DPO; + GRPO's two held-out evaluations):\n{text}\n"
          f"this invocation (every stage not finished by an earlier one, and every held-out evaluation): "
          f"{invocation.times['wall_s']:.0f} s wall, {invocation.times['cpu_s']:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
