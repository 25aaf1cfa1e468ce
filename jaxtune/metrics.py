"""Run logging: console progress, `metrics.jsonl`, TensorBoard; tokens/s and MFU arithmetic."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtune import paths
from jaxtune import workdir as workdir_lib

# Dense bf16 peak TFLOP/s per device (vendor datasheets, no sparsity), keyed by the exact
# `device_kind` real machines report. Matched whole first, then by the longest known prefix, so
# "TPU v5" (v5p) never swallows "TPU v5 lite" (v5e). A TPU "device" is one chip (megacore).
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5": 459.0,  # v5p
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA L4": 121.0,
}


def peak_tflops_for(device_kind: str) -> float | None:
    """Peak bf16 TFLOP/s of a device kind: exact name, else the longest table name followed by a
    space or '-' (e.g. "NVIDIA H200 NVL" -> H200); None when unknown (CPU)."""
    if device_kind in PEAK_TFLOPS:
        return PEAK_TFLOPS[device_kind]
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if device_kind.startswith(name) and device_kind[len(name)] in " -":
            return PEAK_TFLOPS[name]
    return None


def peak_flops_per_device(override_tflops: float = 0.0, device_kind: str | None = None) -> float | None:
    """Peak FLOP/s of one device (default: the first local one), or None when unknown (e.g. CPU):
    MFU is then not logged."""
    if override_tflops:
        return override_tflops * 1e12
    tflops = peak_tflops_for(device_kind if device_kind is not None else jax.devices()[0].device_kind)
    return None if tflops is None else tflops * 1e12


def train_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """6N for the weights (forward + backward) plus 12*L*d*T for attention scores (PaLM appendix B)."""
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


def _scalar(value: Any) -> float | int:
    value = np.asarray(value)
    return value.item()


class MetricsWriter:
    """Writes one JSON object per logged step; only process 0 writes, every process may call it.

    On resume, rows past the restored step are dropped, so the file always reads as one run.
    `on_write(row)` sees each row as written (process 0 only), e.g. for a live plot.
    """

    def __init__(self, workdir: str | Path, *, resume_step: int = 0, tensorboard: bool = True,
                 on_write: Callable[[dict], None] | None = None):
        self.enabled = jax.process_index() == 0
        self._on_write = on_write
        self.path = paths.path(workdir) / workdir_lib.METRICS_FILE
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lines: list[str] = []
        if self.path.exists():
            self._lines = [line + "\n" for line in self.path.read_text().splitlines()
                           if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(self._lines))
        if not paths.is_remote(self.path):  # object stores (gs://) cannot append: the file is rewritten per row
            self._file = self.path.open("a")
            self._lines = []
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(paths.path(workdir) / workdir_lib.TENSORBOARD))

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        row = {"step": int(step)}
        for name, value in metrics.items():
            value = _scalar(value)
            row[name] = value if isinstance(value, int) or math.isfinite(value) else str(value)
        if self.enabled:
            line = json.dumps(row) + "\n"
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
            else:
                self._lines.append(line)
                self.path.write_text("".join(self._lines))
            if self._tb is not None:
                for name, value in row.items():
                    if name != "step" and isinstance(value, (int, float)):
                        self._tb.add_scalar(name, value, step)
            if self._on_write is not None:
                self._on_write(dict(row))
        return row

    def close(self) -> None:
        if self.enabled:
            if self._file is not None:
                self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = paths.path(workdir) / workdir_lib.METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar showing loss, lr and tokens/s; falls back to a log line every `log_every` steps."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled and jax.process_index() == 0
        self._bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, row: dict[str, Any]) -> None:
        shown = {k: row[k] for k in ("loss", "lr", "tokens_per_s") if k in row}
        text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        elif jax.process_index() == 0:
            print(f"step {step}: {text}", flush=True)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif jax.process_index() == 0:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
