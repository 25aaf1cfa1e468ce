"""GRPO step throughput: rollout (sampling) vs learner time per step, full and LoRA.

    python benchmarks/grpo_step.py                      # the quickstart shape (d128 x 4), full and LoRA
    python benchmarks/grpo_step.py --shape large        # a larger CPU shape (d512 x 8)
    python benchmarks/grpo_step.py --steps 8 --prompts 16 --generations 8 --completion 32

Runs `jaxtune train` with configs/grpo.py on random weights (what is timed does not depend on
what the model knows: completions run to --completion tokens unless EOS is sampled, and
--min-completion can force full length), in a temporary workdir, and reports per mode the
median over steps 2.. of: rollout tokens/s (sampled tokens / sampling time), learner tokens/s
(row tokens / time in the train step), the fraction of step time spent sampling, and seconds per
step. Sampling and learning use the same parameters on the same devices (no weight copy), so the
split is the whole cost of an RL step. Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from jaxtune import api
from jaxtune.metrics import read_metrics

SHAPES = {
    "quickstart": {},
    "large": {"model.hidden_size": 512, "model.intermediate_size": 1536, "model.num_layers": 8,
              "model.num_heads": 8, "model.num_kv_heads": 4},
}


def run(mode: str, args) -> dict:
    overrides = {
        **SHAPES[args.shape], "train.steps": args.steps, "train.log_every": 1, "train.eval_every": 0,
        "train.progress_bar": False, "train.checkpoint_every": 1000, "data.num_eval_examples": 0,
        "objective.grpo.num_prompts": args.prompts, "objective.grpo.num_generations": args.generations,
        "objective.grpo.max_completion_tokens": args.completion, "train.global_batch_size": args.batch,
        "data.num_train_examples": 2000,
    }
    spec = "configs/grpo.py" + (":lora=16" if mode == "lora" else "")
    config = api.load_config(spec, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        api.train(config, workdir)
        rows = [r for r in read_metrics(workdir) if "rollout/sampling_time_s" in r][1:]
    med = {k: statistics.median(r[k] for r in rows) for k in (
        "rollout/rollout_tokens_per_s", "rollout/learner_tokens_per_s", "rollout/sampling_fraction",
        "rollout/sampling_time_s", "rollout/completion_len")}
    step_s = med["rollout/sampling_time_s"] / max(med["rollout/sampling_fraction"], 1e-9)
    return {"mode": mode, "shape": args.shape, "steps_timed": len(rows), "completions_per_step": args.prompts * args.generations,
            "rollout_tokens_per_s": round(med["rollout/rollout_tokens_per_s"], 1),
            "learner_tokens_per_s": round(med["rollout/learner_tokens_per_s"], 1),
            "sampling_fraction": round(med["rollout/sampling_fraction"], 3), "step_s": round(step_s, 3),
            "completion_len": med["rollout/completion_len"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="quickstart")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=24)
    parser.add_argument("--batch", type=int, default=64, help="train rows per step (packed)")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        print(json.dumps(run(mode, args)), flush=True)


if __name__ == "__main__":
    main()
