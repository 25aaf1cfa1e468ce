"""The shipped configs planned for the TPU slices they are meant for (benchmarks/RESULTS.md "Plan").

    python benchmarks/plan_configs.py                 # every row (each a 1-10 minute compile on a CPU)
    python benchmarks/plan_configs.py --only sft_1b   # one row

Runs `jaxtune plan` once per row, in a fresh process each (one at a time: each compile of a
1B-70B train step takes 70-160 s of CPU), and prints the markdown table with the per-device
memory, whether it fits (<= 90% of HBM) and the step-time / MFU bound. Needs the tpu extra.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = {
    "sft_1b": ("configs/sft_llama.py:llama3.2-1b", "v5e-8", []),
    "lora_8b": ("configs/sft_lora.py:variant=llama3.1-8b", "v5p-8", []),
    "sft_8b": ("configs/sft_llama.py:llama3.1-8b", "v5p-8", []),
    "lora_70b": ("configs/sft_lora.py:variant=llama3.1-70b", "v5p:4x4x2", []),
    "dpo_lora_8b": ("configs/dpo.py:variant=llama3.1-8b,method=lora", "v5p-8", []),
    "lora_flan_t5_xxl": ("configs/sft_lora.py:family=t5,variant=flan-t5-xxl", "v5e-8", []),  # encoder-decoder
    # PPO: an 8B policy and a separate 8B value model, each with its own LoRA adapters over a bf16
    # base of both backbones; the total adds the rollout KV cache (plan_memory)
    "ppo_lora_8b": ("configs/ppo.py:variant=llama3.1-8b,lora=16,value_model=separate", "v5p-8", []),
    # The seq-length scaling check: same per-device batch (4), twice the length.
    "sft_1b_seq8192": ("configs/sft_llama.py:llama3.2-1b", "v5e-8", ["--config.data.seq_len=8192"]),
}


def plan_row(config: str, topology: str, overrides: list[str]) -> tuple[dict, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli", "plan", "--config", config, "--topology", topology,
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{config} on {topology}: no plan (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1]), time.time() - start


def markdown_row(name: str, overrides: list[str], p: dict) -> str:
    gib = 1024**3
    memory = p["memory_per_device"]
    total = f"{memory['total'] / gib:.2f} GiB" if memory else f"OOM: {p['oom']}"
    temps = f"{memory['temporaries'] / gib:.2f} GiB" if memory else ""
    hbm = f"{p['hbm_per_device'] / gib:.2f} GiB"
    bound = f"{p['step_time_lower_bound_s']:.2f} s / {p['mfu_bound']:.0%}"
    config = p["config"] + "".join(f" `{o}`" for o in overrides)
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
    return (f"| {config} | {p['topology']} ({p['devices']} chips) | {mesh} | {total} of {hbm} | {temps} | "
            f"{'yes' if p['fits'] else 'no'} | {bound} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(ROWS), help="plan only these rows")
    args = parser.parse_args()
    print("| config | topology | mesh | memory per device | temporaries | fits (<= 90%) | step time >= / MFU <= |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only or ROWS:
        config, topology, overrides = ROWS[name]
        p, seconds = plan_row(config, topology, overrides)
        print(markdown_row(name, overrides, p), flush=True)
        print(f"<!-- {name}: compiled in {seconds:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
