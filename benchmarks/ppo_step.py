"""The colocated PPO step's time split: sampling, reward scoring, value (the rollout's policy/value
and reference passes and its GAE targets) and learning, for the value model on the policy's
backbone ('shared') and on its own ('separate').

    nice -n -10 python benchmarks/ppo_step.py                     # configs/ppo.py's shape, 5 rollouts each
    nice -n -10 python benchmarks/ppo_step.py --rollouts 8 --prompts 16 --completion 32

Runs `jaxtune train` with configs/ppo.py on random weights (what is timed does not depend on what
the model knows), one rollout of --prompts completions per --epochs optimizer steps, in a
temporary workdir, one run per value model in this process (a resumed run would compile again,
so they do not alternate: compare the two only at a steady load, stated beside the numbers). The
first rollout of each (compiles) is dropped and the medians of the rest are reported as seconds
per rollout cycle and fractions of it: the split within one run is the result. Scores are the configs' verifiers (math, worked_steps), so
scoring is cheap here; a reward model (--reward-model DIR, a reward run) makes it a forward pass.
Prints one JSON line per value model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

from jaxtune import api
from jaxtune.metrics import read_metrics

PARTS = ("sampling", "scoring", "value", "learner")


def config(value_model: str, args):
    spec = f"configs/ppo.py:value_model={value_model}" + (f",reward_model={args.reward_model}" if args.reward_model else "")
    cycle = args.epochs
    return api.load_config(spec, {
        "train.steps": cycle * (args.rollouts + 1), "train.checkpoint_every": cycle * (args.rollouts + 1), "train.log_every": 1,
        "train.eval_every": 0, "train.progress_bar": False, "data.num_eval_examples": 0,
        "data.num_train_examples": 2000, "objective.ppo.num_prompts": args.prompts,
        "objective.ppo.max_completion_tokens": args.completion, "objective.ppo.num_ppo_epochs": args.epochs,
        "objective.ppo.num_mini_batches": 1, "train.global_batch_size": args.prompts,
    })


def split(workdir: Path, args) -> dict:
    """Per rollout cycle: sampling (without scoring), scoring, value and the learner's time, in s."""
    rows = [r for r in read_metrics(workdir) if "rollout/sampling_time_s" in r]
    cycles = {}
    for r in rows:
        cycles.setdefault((r["step"] - 1) // args.epochs, r)
    # rollout k's learner time is reported by rollout k + 1 (the train steps run in between)
    out = []
    keys = sorted(cycles)
    for k, nxt in itertools.pairwise(keys[1:]):  # from the second rollout (the first compiles)
        r = cycles[k]
        out.append({"sampling": r["rollout/sampling_time_s"] - r["rollout/scoring_time_s"],
                    "scoring": r["rollout/scoring_time_s"], "value": r["rollout/value_time_s"],
                    "learner": cycles[nxt]["rollout/learner_time_s"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=5, help="rollouts per value model (the first is dropped)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--completion", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=2, help="num_ppo_epochs (optimizer steps per rollout)")
    parser.add_argument("--reward-model", default="", help="a reward run's workdir to score with")
    args = parser.parse_args()
    modes = ("shared", "separate")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            api.train(config(mode, args), Path(tmp) / mode)  # +1 rollout: the last timed one's learner time
            cycles = split(Path(tmp) / mode, args)
            med = {p: statistics.median(c[p] for c in cycles) for p in PARTS}
            total = sum(med.values())
            print(json.dumps({"value_model": mode, "rollouts_timed": len(cycles), "completions": args.prompts,
                              "max_completion_tokens": args.completion, "optimizer_steps_per_rollout": args.epochs,
                              **{f"{p}_s": round(med[p], 3) for p in PARTS},
                              **{f"{p}_fraction": round(med[p] / total, 3) for p in PARTS},
                              "cycle_s": round(total, 3)}), flush=True)


if __name__ == "__main__":
    main()
