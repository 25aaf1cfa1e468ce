"""The machine a GPU run measured on: card, driver, library versions and a measured bf16 matmul peak.

    python benchmarks/gpu_peak.py      # prints `MEASURED_PEAK_TFLOPS <x>` on CUDA (torch, 8192^3, median of 10)

MFU against the datasheet peak hides how far below it a card's clocks run; the measured peak is
the second denominator benchmarks/gpu_side_by_side.sh passes on (--measured_peak_tflops).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess


def versions() -> dict:
    out = {}
    for name in ("torch", "jax", "jaxlib", "flax", "transformers", "peft", "trl", "optax"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def measured_peak_tflops(size: int = 8192, repeats: int = 10) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return round(2 * size**3 / times[len(times) // 2] / 1e12, 1)


def main() -> None:
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm"
        print(subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True).stdout.strip())
    else:
        print("no nvidia-smi: not a CUDA machine")
    print("versions", versions())
    peak = measured_peak_tflops()
    if peak is not None:
        print("MEASURED_PEAK_TFLOPS", peak)


if __name__ == "__main__":
    main()
