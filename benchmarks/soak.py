"""Soak: a long `jaxtune train` run with checkpoints and evaluation every 100 steps, watched from outside.

Runs `python -m jaxtune.cli train` on a tiny config (2-layer d32 Llama, generated data, a
held-out eval set) as a subprocess, samples its resident memory (VmRSS from /proc) and the logged
steps twice a second, and prints JSON with per-window figures: RSS at each 100-step boundary,
tokens/s of each window (the trainer's own figure, which excludes eval and compile time), and
the summary the reliability issue asks for: RSS growth after warm-up (target < 5 %) and the
tokens/s drift after warm-up (mean of the second half over the first, and the best window of each
half, which load from other processes cannot inflate).

    PYTHONPATH=. python benchmarks/soak.py [--steps 2000] [--every 100] [--devices 1] [--out soak.json]

Timings on a shared machine are noisy; compare windows within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

WORDS = "red blue green cat dog sun moon tree book lamp".split()


def _write_data(directory: Path) -> tuple[Path, Path]:
    train, held_out = directory / "train.jsonl", directory / "eval.jsonl"
    for path, n, offset in ((train, 512, 0), (held_out, 16, 7)):
        with path.open("w") as f:
            for i in range(n):
                words = [WORDS[(i * 7 + j * 3 + offset) % len(WORDS)] for j in range(2 + i % 3)]
                f.write(json.dumps({"prompt": "reverse: " + " ".join(words), "response": " ".join(reversed(words))}) + "\n")
    return train, held_out


def _config(directory: Path, steps: int, every: int) -> Path:
    train, held_out = _write_data(directory)
    path = directory / "soak_config.py"
    path.write_text(textwrap.dedent(f'''
        from jaxtune import config as config_lib

        def get_config(arg=None):
            c = config_lib.base_config()
            c.data.train_path = {str(train)!r}
            c.data.eval_path = {str(held_out)!r}
            c.data.templates = (("{{prompt}} =", " {{response}}"),)
            c.data.seq_len = 32
            c.data.tokenizer_vocab_size = 280
            c.model.variant = "tiny"
            c.model.hidden_size, c.model.intermediate_size = 32, 64
            c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 2, 4, 2
            c.train.steps = {steps}
            c.train.global_batch_size = 8
            c.train.log_every = 10
            c.train.checkpoint_every = {every}
            c.train.eval_every = {every}
            c.train.keep_checkpoints = 2
            c.train.progress_bar = False
            c.eval.batch_size = 8
            c.eval.max_new_tokens = 4
            c.eval.show_examples = 0
            c.optim.lr = 3e-3
            c.mesh.rules = "dp"
            return c
    '''))
    return path


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


def soak(steps: int, every: int, devices: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config, workdir = _config(tmp, steps, every), tmp / "run"
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PYTHONPATH=os.environ.get("PYTHONPATH", "."))
        cmd = [sys.executable, "-m", "jaxtune.cli", "train", "--config", str(config), "--workdir", str(workdir)]
        start = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rss_at: dict[int, int] = {}
        samples = []
        while proc.poll() is None:
            rows = [r for r in _rows(workdir) if "loss" in r]
            step = rows[-1]["step"] if rows else 0
            rss = _rss_kib(proc.pid)
            if rss is not None:
                samples.append((round(time.time() - start, 1), step, rss))
                boundary = step - step % every
                if boundary and boundary not in rss_at:
                    rss_at[boundary] = rss
            time.sleep(0.5)
        output = proc.stdout.read()
        if proc.returncode != 0:
            raise SystemExit(f"train failed ({proc.returncode}):\n{output[-3000:]}")
        rows = [r for r in _rows(workdir) if "tokens_per_s" in r]
        evals = [r for r in _rows(workdir) if any(k.startswith("eval/") for k in r)]
    windows = []
    for end in range(every, steps + 1, every):
        rates = [r["tokens_per_s"] for r in rows if end - every < r["step"] <= end]
        windows.append({"steps": f"{end - every + 1}-{end}", "rss_mib": round(rss_at.get(end, 0) / 1024, 1),
                        "tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None})
    after = [w for w, end in zip(windows, range(every, steps + 1, every)) if end > warmup and w["rss_mib"]]
    first, last = after[0], after[-1]
    rates = [w["tokens_per_s"] for w in after if w["tokens_per_s"]]
    half = len(rates) // 2
    return {
        "steps": steps, "every": every, "devices": devices, "wall_s": round(time.time() - start, 1),
        "evaluations": len(evals), "peak_rss_mib": round(max(s[2] for s in samples) / 1024, 1),
        "rss_growth_after_warmup": round(last["rss_mib"] / first["rss_mib"] - 1, 4),
        "rss_after_warmup_mib": [first["rss_mib"], last["rss_mib"]],
        "tokens_per_s_first_last_window": [first["tokens_per_s"], last["tokens_per_s"]],
        "tokens_per_s_drift_halves": round(sum(rates[half:]) / len(rates[half:]) / (sum(rates[:half]) / half) - 1, 4)
        if half else None,
        # On a shared machine other jobs only ever slow a window down: the best window of each half
        # is the cleanest drift signal.
        "tokens_per_s_best_window_halves": [max(rates[:half]), max(rates[half:])] if half else None,
        "windows": windows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="checkpoint and evaluation interval")
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices")
    parser.add_argument("--warmup", type=int, default=200, help="steps before RSS is expected to be flat")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    result = soak(args.steps, args.every, args.devices, args.warmup)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
