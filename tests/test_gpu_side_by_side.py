"""benchmarks/gpu_side_by_side.sh is ready to run on a GPU machine: the script parses, and its
Python pieces' batch builders and smoke runs work on CPU (the GPU figures are measured there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import packed_sft  # noqa: E402


def test_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_side_by_side.sh")], check=True)


def test_packed_rows_hold_every_example_whole_and_in_order():
    lengths = np.array([100, 30, 200, 60, 250, 10, 90, 300, 40, 5])
    batches, used = packed_sft.packed_batches(lengths, batch=2, seq_len=256, steps=2, vocab=50)
    seen = []
    for b in batches:
        for seg, pos, mask in zip(b["segment_ids"], b["positions"], b["loss_mask"]):
            for s in range(1, seg.max() + 1):
                where = np.flatnonzero(seg == s)
                assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
                assert np.array_equal(pos[where], np.arange(len(where)))  # positions restart
                seen.append(len(where))
            assert np.array_equal(mask, seg != 0)
    assert sorted(seen) == sorted(lengths[:used].tolist())
    assert used == 7  # 300 opens no row of step 2: the steps hold the first 7 examples


def test_padded_rows_one_example_each():
    lengths = np.array([5, 9, 3, 7])
    batches = packed_sft.padded_batches(lengths, batch=2, seq_len=10, steps=2, vocab=50)
    assert [b["segment_ids"].sum(axis=1).tolist() for b in batches] == [[5, 9], [3, 7]]


@pytest.mark.slow
def test_packed_sft_smoke_runs_jaxtune_and_trl(tmp_path):
    """The packed SFT piece end to end on a tiny model (TRL's row skipped when trl is absent)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")  # one device, as on the GPU machine: batch 2
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "packed_sft.py"), "--smoke", "--modes", "jaxtune_packed,trl_packed",
         "--workdir", str(tmp_path)], check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["jaxtune_packed"]["real_tokens_per_s"] > 0
    assert 0 < result["jaxtune_packed"]["fill"] <= 1
    assert "real_tokens_per_s" in result["trl_packed"] or "skipped" in result["trl_packed"]
