"""RLHF with a learned reward on a CPU: SFT -> preference pairs -> reward model -> PPO and RLOO.

    nice -n 15 python scripts/rlhf_efficacy.py --workdir runs/rlhf

InstructGPT's recipe, small, on the built-in arithmetic word problems (jaxtune/data/builtin/verifiable.py)
with the quickstart-sized model (configs/grpo.py):
1. SFT on the training problems' worked solutions (configs/grpo.py:stage=sft, --sft-steps).
2. Preference pairs, labelled by the verifiers: the SFT model samples --samples completions of each of
   --pair-prompts 3-operation *training* prompts; a sample is correct when its working and answer
   are right (`worked_solution` = 1) and incorrect when its answer is wrong (`math` = 0). Each
   prompt gives up to --pairs-per-prompt (correct, incorrect) pairs; a prompt with incorrect samples
   but no correct one pairs its reference solution (chosen) with them. The last --heldout-pair-share
   of the prompts' pairs are held out (never trained on) to measure the reward model.
3. A reward model (objective.type=reward, Bradley-Terry) initialised from the SFT model: its
   held-out pair accuracy (r_chosen > r_rejected).
4. PPO (configs/ppo.py, value head on the policy's backbone) and RLOO (configs/grpo.py:variant=rloo),
   each from the SFT model, against the LEARNED reward only (the verifiers are not used in training).
5. Before/after on --heldout unseen 3-operation problems, greedy and --eval-samples sampled answers
   each: the TRUE verifier accuracy (`worked_solution`: working and answer right; `math`: answer
   right) with its binomial standard error, the paired standard error of each change, and the mean
   learned reward, so a policy that raised the learned reward but not the true accuracy (reward
   hacking) shows.
Every stage reports its wall time and CPU seconds (user + system of this process and its children,
resource.getrusage), kept in WORKDIR/times.json; a rerun resumes (finished stages are kept: delete a
stage's folder to redo it). `--tiny` checks the mechanics in seconds (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

import jaxtune
from jaxtune import objectives
from jaxtune.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# A model and budgets for --tiny: mechanics only.
TINY_MODEL = {"model.num_layers": 1, "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_heads": 2,
              "model.num_kv_heads": 1, "data.num_train_examples": 200, "eval.loss": False}
POLICIES = ("SFT", "PPO", "RLOO")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/rlhf")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--pair-prompts", type=int, default=384, help="training prompts sampled for preference pairs")
    parser.add_argument("--samples", type=int, default=4, help="SFT-model samples per pair prompt")
    parser.add_argument("--pairs-per-prompt", type=int, default=2)
    parser.add_argument("--heldout-pair-share", type=float, default=0.2, help="share of pair prompts held out")
    parser.add_argument("--rm-steps", type=int, default=150)
    parser.add_argument("--rm-lr", type=float, default=1e-4)
    parser.add_argument("--rm-batch", type=int, default=16, help="pairs per reward-model step")
    parser.add_argument("--ppo-rollouts", type=int, default=20, help="PPO rollouts (each num_ppo_epochs steps)")
    parser.add_argument("--ppo-prompts", type=int, default=32, help="prompts (= completions) per PPO rollout")
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--ppo-kl", type=float, default=0.05, help="PPO kl_coef (k1, fixed)")
    parser.add_argument("--ppo-lr", type=float, default=1e-4)
    parser.add_argument("--rloo-steps", type=int, default=30)
    parser.add_argument("--rloo-kl", type=float, default=0.05, help="RLOO beta (k1 in the reward)")
    parser.add_argument("--rloo-lr", type=float, default=2e-4)
    parser.add_argument("--heldout", type=int, default=300, help="held-out problems evaluated")
    parser.add_argument("--eval-samples", type=int, default=1, help="sampled answers per held-out problem")
    parser.add_argument("--only", default="PPO,RLOO", help="which RL runs: PPO, RLOO or both (comma-separated)")
    parser.add_argument("--tiny", action="store_true", help="mechanics only: a 1-layer model, a few steps")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sft_steps, args.pair_prompts, args.samples, args.rm_steps, args.rm_batch = 2, 8, 2, 2, 2
        args.ppo_rollouts, args.ppo_prompts, args.ppo_epochs, args.rloo_steps, args.heldout = 1, 4, 1, 1, 4
    for name in ("sft_steps", "pair_prompts", "pairs_per_prompt", "rm_steps", "rm_batch", "ppo_rollouts",
                 "ppo_prompts", "ppo_epochs", "rloo_steps", "heldout", "eval_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.samples < 2:
        parser.error("--samples must be >= 2 (a pair needs two samples)")
    if not 0 < args.heldout_pair_share < 1:
        parser.error("--heldout-pair-share must be in (0, 1)")
    if not (args.rm_lr > 0 and args.ppo_lr > 0 and args.rloo_lr > 0 and args.ppo_kl >= 0 and args.rloo_kl >= 0):
        parser.error("--rm-lr, --ppo-lr and --rloo-lr must be > 0; --ppo-kl and --rloo-kl >= 0")
    args.only = tuple(x.strip().upper() for x in args.only.split(",") if x.strip())
    if not args.only or not set(args.only) <= {"PPO", "RLOO"}:
        parser.error("--only must list PPO and/or RLOO")
    return args


class Stages:
    """Each stage's wall time and CPU seconds (user + system, this process and its children), kept in
    WORKDIR/times.json so a resumed run still reports them. The machine is shared: CPU seconds are
    the budget that does not depend on the other load."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.exists() else {}

    @staticmethod
    def cpu_s() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def run(self, key: str, fn, *args):
        wall, cpu = time.time(), self.cpu_s()
        out = fn(*args)
        entry = {"wall_s": time.time() - wall, "cpu_s": self.cpu_s() - cpu, "load": os.getloadavg()[0]}
        # re-read: another invocation (other RL settings in the same workdir) may have added its stages
        self.times = {**(json.loads(self.path.read_text()) if self.path.exists() else {}), key: entry}
        self.path.write_text(json.dumps(self.times, indent=1))
        return out


def common(args, workdir: Path) -> dict:
    """Every stage after SFT names the SFT run's tokenizer (trained on first use in the SFT run)."""
    tokenizer = workdir / "sft" / "tokenizer.model"
    return {"train.progress_bar": False, **(TINY_MODEL if args.tiny else {}),
            **({"data.tokenizer": str(tokenizer)} if tokenizer.is_file() else {})}


def learned(rm_dir: Path) -> dict:
    """The RL stages' reward: the reward model alone (weight 1); `math` is computed for the logs only."""
    return {"rewards": ("math", f"reward_model:{rm_dir}"), "reward_weights": (0.0, 1.0)}


def verifier_objective(args, workdir: Path, rm_dir: Path | None, heldout: int = 0):
    """GRPO's objective on 3-operation problems, scoring with the verifiers (and the reward model
    when `rm_dir`, weight 1: `reward` is then the learned reward); `heldout` problems held out."""
    rewards = ("math", "worked_solution") + ((f"reward_model:{rm_dir}",) if rm_dir else ())
    config = jaxtune.load_config(f"{CONFIGS / 'grpo.py'}:init_from={workdir / 'sft'}", {
        **common(args, workdir), "objective.grpo.rewards": rewards,
        "objective.grpo.reward_weights": (0.0, 0.0) + ((1.0,) if rm_dir else ()),
        "objective.grpo.eval_samples": args.eval_samples, "data.num_eval_examples": max(heldout, 1)})
    return config, objectives.build(config)


def build_pairs(args, workdir: Path) -> dict:
    """Pairs from the SFT model's samples on training prompts, labelled by the verifiers; written to
    WORKDIR/pairs_{train,heldout}.jsonl (held out by prompt)."""
    sft_dir = workdir / "sft"
    config, objective = verifier_objective(args, workdir, None)
    records = list(objective.load_data(sft_dir).train[: args.pair_prompts])
    model = jaxtune.load(str(sft_dir))
    rollouts, prompts, _, parts = objective.sample(model.model, model.params, model.tokenizer, records,
                                                   group_size=args.samples, seed=config.seed, temperature=1.0)
    g, rng = args.samples, np.random.default_rng(config.seed)
    correct = np.array([v == 1.0 for v in parts["worked_solution"]]).reshape(-1, g)
    wrong = np.array([v == 0.0 for v in parts["math"]]).reshape(-1, g)
    texts = np.array([r.text for r in rollouts], dtype=object).reshape(-1, g)
    per_prompt = []
    for i, record in enumerate(records):
        good = sorted(set(texts[i][correct[i]]))
        bad = sorted(set(texts[i][wrong[i]]))
        if not bad:
            continue
        chosen = good or [" " + record["solution"]]  # the SFT data's completion: the reference solution
        combos = [(c, r) for c in chosen for r in bad]
        picks = rng.permutation(len(combos))[: args.pairs_per_prompt]
        per_prompt.append([{"prompt": prompts[i * g], "chosen": combos[k][0], "rejected": combos[k][1],
                            "reference_chosen": not good} for k in picks])
    if len(per_prompt) < 2:
        raise SystemExit("rlhf_efficacy: fewer than 2 training prompts had a wrong sample; no held-out pairs "
                         "(sample more prompts)")
    cut = max(1, round(len(per_prompt) * (1 - args.heldout_pair_share)))
    split = {"train": [p for group in per_prompt[:cut] for p in group],
             "heldout": [p for group in per_prompt[cut:] for p in group]}
    for name, pairs in split.items():
        with (workdir / f"pairs_{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
    return {"prompts": len(records), "sample_accuracy": float(correct.mean()), "wrong_answers": float(wrong.mean()),
            "train_pairs": len(split["train"]), "heldout_pairs": len(split["heldout"]),
            "reference_chosen": sum(p["reference_chosen"] for group in per_prompt for p in group)}


def rm_config(args, workdir: Path):
    """The SFT model with a scalar head, Bradley-Terry on the training pairs, rendered as the RL stages
    score them: the rendered prompt, then the completion text as sampled."""
    steps = args.rm_steps
    return jaxtune.load_config(f"{CONFIGS / 'grpo.py'}:stage=sft", {
        **common(args, workdir), "objective.type": "reward", "model.init_from": str(workdir / "sft"),
        "data.builtin": "", "data.train_path": str(workdir / "pairs_train.jsonl"),
        "data.templates": (("{prompt}", "{response}"),), "data.packing": False,
        "train.steps": steps, "train.global_batch_size": args.rm_batch, "train.log_every": max(steps // 5, 1),
        "train.checkpoint_every": steps, "optim.lr": args.rm_lr, "optim.warmup_steps": max(steps // 10, 1),
        "optim.schedule": "cosine", "optim.weight_decay": 0.0})


def rm_accuracy(workdir: Path) -> dict:
    """The reward model's accuracy (r_chosen > r_rejected) and margin on the held-out pairs."""
    pairs = [json.loads(line) for line in (workdir / "pairs_heldout.jsonl").read_text().splitlines()]
    rewards = jaxtune.reward_fn(str(workdir / "rm"))
    chosen = np.array(rewards([p["prompt"] for p in pairs], [p["chosen"] for p in pairs]))
    rejected = np.array(rewards([p["prompt"] for p in pairs], [p["rejected"] for p in pairs]))
    acc = float(np.mean(chosen > rejected))
    return {"pairs": len(pairs), "accuracy": acc, "accuracy_se": binomial_se(acc, len(pairs)),
            "margin": float(np.mean(chosen - rejected))}


def ppo_config(args, workdir: Path):
    epochs, rm_dir = args.ppo_epochs, workdir / "rm"
    section = {f"objective.ppo.{k}": v for k, v in learned(rm_dir).items()}
    return jaxtune.load_config(f"{CONFIGS / 'ppo.py'}:init_from={workdir / 'sft'}", {
        **common(args, workdir), **section, "objective.ppo.num_prompts": args.ppo_prompts,
        "objective.ppo.num_ppo_epochs": epochs, "objective.ppo.kl_coef": args.ppo_kl, "objective.ppo.sample_every": 0,
        "data.num_eval_examples": 0, "train.steps": args.ppo_rollouts * epochs, "train.max_seconds": 0.0,
        "train.checkpoint_every": args.ppo_rollouts * epochs, "train.log_every": epochs,
        "optim.lr": args.ppo_lr, "optim.warmup_steps": 0})


def rloo_config(args, workdir: Path):
    section = {f"objective.grpo.{k}": v for k, v in learned(workdir / "rm").items()}
    overrides = {**common(args, workdir), **section, "objective.grpo.beta": args.rloo_kl, "objective.grpo.sample_every": 0,
                 "data.num_eval_examples": 0, "train.steps": args.rloo_steps, "train.max_seconds": 0.0,
                 "train.checkpoint_every": args.rloo_steps, "train.log_every": max(args.rloo_steps // 10, 1),
                 "optim.lr": args.rloo_lr, "optim.warmup_steps": 0}
    if args.tiny:
        overrides.update({"objective.grpo.num_prompts": 2, "objective.grpo.num_generations": 2,
                          "train.global_batch_size": 4})
    return jaxtune.load_config(f"{CONFIGS / 'grpo.py'}:init_from={workdir / 'sft'},variant=rloo", overrides)


def stage_key(name: str, run_dir: Path, make_config) -> str:
    """times.json's key of a policy's stages: SFT's name, an RL run's folder (its settings)."""
    return run_dir.name if make_config is not None else name


def train(config, run_dir: Path) -> None:
    summary = jaxtune.train(config, str(run_dir))
    if summary.stopped_early:
        raise SystemExit(f"rlhf_efficacy: {run_dir} stopped at step {summary.steps}; rerun the same command to resume")


def finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints").is_dir() and any(r.get("step", 0) >= steps for r in read_metrics(run_dir))


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def evaluate(args, workdir: Path, run_dir: Path) -> dict:
    """Per held-out completion (greedy, then sampled): the verifiers' 0/1 and the learned reward."""
    config, objective = verifier_objective(args, workdir, workdir / "rm", heldout=args.heldout)
    records = list(objective.eval_set(objective.load_data(run_dir)).records)[: args.heldout]
    model = jaxtune.load(str(run_dir))
    out = {}
    for mode, temperature, n in (("greedy", 0.0, 1), ("sampled", 1.0, args.eval_samples)):
        _, _, totals, parts = objective.sample(model.model, model.params, model.tokenizer, records, group_size=n,
                                               seed=config.seed, temperature=temperature)
        out[mode] = {"worked_solution": [float(v or 0.0) for v in parts["worked_solution"]],
                     "math": [float(v or 0.0) for v in parts["math"]], "learned_reward": [float(v) for v in totals]}
    return out


def summarise(per_policy: dict) -> dict:
    """Means with binomial SEs, and each RL policy's change vs SFT with the paired SE (same problems)."""
    table = {}
    for name, modes in per_policy.items():
        for mode, values in modes.items():
            for metric, xs in values.items():
                x = np.asarray(xs)
                row = {"mean": float(x.mean()), "n": len(x)}
                row["se"] = binomial_se(row["mean"], len(x)) if metric != "learned_reward" else float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
                if name != "SFT":
                    d = x - np.asarray(per_policy["SFT"][mode][metric])
                    row["change"] = float(d.mean())
                    row["change_se"] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
                table[f"{name}/{mode}/{metric}"] = row
    return table


def report_lines(table: dict, policies, times: dict) -> list[str]:
    lines = ["| policy | greedy worked_solution | greedy math | sampled worked_solution | sampled math | "
             "greedy learned reward | sampled learned reward |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in policies:
        cells = []
        for mode, metric in (("greedy", "worked_solution"), ("greedy", "math"), ("sampled", "worked_solution"),
                             ("sampled", "math"), ("greedy", "learned_reward"), ("sampled", "learned_reward")):
            row = table[f"{name}/{mode}/{metric}"]
            scale, fmt = (1, "{:+.2f}") if metric == "learned_reward" else (100, "{:+.1f}")
            cell = f"{scale * row['mean']:.2f} ± {scale * row['se']:.2f}" if metric == "learned_reward" else \
                f"{scale * row['mean']:.1f}% ± {scale * row['se']:.1f}"
            if "change" in row:
                cell += f" ({fmt.format(scale * row['change'])} ± {scale * row['change_se']:.{2 if scale == 1 else 1}f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | wall s | CPU s | load (1 min) |", "| --- | --- | --- | --- |"]
    for stage, t in times.items():
        lines.append(f"| {stage} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {t['load']:.1f} |")
    total_wall = sum(t["wall_s"] for t in times.values())
    total_cpu = sum(t["cpu_s"] for t in times.values())
    lines.append(f"| total | {total_wall:.0f} | {total_cpu:.0f} | |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = Stages(workdir / "times.json")
    sft_dir, rm_dir = workdir / "sft", workdir / "rm"

    if not finished(sft_dir, args.sft_steps):
        sft = jaxtune.load_config(f"{CONFIGS / 'grpo.py'}:stage=sft", {
            **common(args, workdir), "train.steps": args.sft_steps, "eval.generative": False, "eval.loss": False})
        stages.run("SFT", lambda: train(sft, sft_dir))
    stats_path = workdir / "pairs.json"
    if not stats_path.exists():
        stages.run("pairs", lambda: stats_path.write_text(json.dumps(build_pairs(args, workdir), indent=1)))
    pairs = json.loads(stats_path.read_text())
    print(f"rlhf_efficacy: {pairs['train_pairs']} training + {pairs['heldout_pairs']} held-out pairs from "
          f"{pairs['prompts']} prompts x {args.samples} SFT samples ({pairs['sample_accuracy']:.1%} of samples fully "
          f"right, {pairs['wrong_answers']:.1%} with a wrong answer; {pairs['reference_chosen']} pairs with the "
          "reference solution as chosen)", flush=True)

    if not finished(rm_dir, args.rm_steps):
        stages.run("reward model", lambda: train(rm_config(args, workdir), rm_dir))
    rm_path = workdir / "rm_accuracy.json"
    if not rm_path.exists():
        rm_path.write_text(json.dumps(stages.run("reward model eval", lambda: rm_accuracy(workdir)), indent=1))
    rm = json.loads(rm_path.read_text())
    print(f"rlhf_efficacy: reward model held-out pair accuracy {rm['accuracy']:.1%} ± {rm['accuracy_se']:.1%} "
          f"({rm['pairs']} pairs), mean margin {rm['margin']:.2f}", flush=True)

    runs = {"SFT": (sft_dir, None)}
    if "PPO" in args.only:
        runs["PPO"] = (workdir / f"ppo_kl{args.ppo_kl:g}_lr{args.ppo_lr:g}_r{args.ppo_rollouts}x{args.ppo_prompts}"
                                 f"_e{args.ppo_epochs}", ppo_config)
    if "RLOO" in args.only:
        runs["RLOO"] = (workdir / f"rloo_kl{args.rloo_kl:g}_lr{args.rloo_lr:g}_s{args.rloo_steps}", rloo_config)
    per_policy = {}
    for name, (run_dir, make_config) in runs.items():
        if make_config is not None:
            config = make_config(args, workdir)
            if not finished(run_dir, config.train.steps):
                stages.run(stage_key(name, run_dir, make_config), train, config, run_dir)
        path = run_dir / f"heldout_{args.heldout}x{args.eval_samples}.json"
        if not path.exists():
            key = f"{stage_key(name, run_dir, make_config)} eval"
            path.write_text(json.dumps(stages.run(key, evaluate, args, workdir, run_dir)))
        per_policy[name] = json.loads(path.read_text())

    table = summarise(per_policy)
    # This invocation's stages (other RL settings tried in the same workdir are kept in times.json).
    shown = ["SFT", "pairs", "reward model", "reward model eval"] + [
        f"{stage_key(name, d, make)}{suffix}" for name, (d, make) in runs.items()
        for suffix in (("", " eval") if make else (" eval",))]
    lines = report_lines(table, list(runs), {k: stages.times[k] for k in shown if k in stages.times})
    (workdir / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "pairs": pairs,
                                                      "reward_model": rm, "heldout": table, "times": stages.times},
                                                     indent=1))
    print(f"\nheld-out: {args.heldout} unseen 3-operation problems, greedy and {args.eval_samples} sampled answer(s) "
          "each; true accuracy (verifiers: worked_solution = working and answer right, math = answer right) ± "
          "binomial SE, in brackets the change vs SFT ± its paired SE; learned reward = the reward model's score "
          "(the only reward PPO/RLOO trained on):\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
