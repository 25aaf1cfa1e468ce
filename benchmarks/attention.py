"""Attention implementations side by side: forward+backward time and compiled temporaries.

    python benchmarks/attention.py                          # bench shape: 8 heads, 2 kv heads, d 64
    python benchmarks/attention.py --lengths 256,512,1024,2048 --batch 4
    python benchmarks/attention.py --implementations blockwise --baseline HEAD~1 --blocks 256,512

For each sequence length T, times jax.value_and_grad of sum(attend(q, k, v) ** 2) (w.r.t.
q, k, v; packed rows of two segments, causal) for every implementation that runs on this
backend, and reads the compiled program's temporary bytes (memory_analysis). Medians of
--repeats timed runs after a warm-up (compile excluded). This is what chose `auto` on CPU
(attention.CPU_REFERENCE_MAX_KEYS). Prints one JSON line per (T, implementation).

--baseline GITREF also times jaxtune/models/attention.py as it was at GITREF (loaded from git as a
separate module), and --blocks times blockwise at other tile sizes; all variants of one T are
compiled first and then timed in alternating rounds, so load that comes and goes on a shared
machine hits them alike (before/after comparisons).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import attention


def _inputs(batch, length, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
    segments = np.ones((batch, length), np.int32)
    segments[:, length // 3:] = 2
    return q, k, v, jnp.asarray(segments)


def compile_step(module, implementation: str, q, k, v, segments, block: int | None = None):
    """(compiled value_and_grad step, its temporary bytes); `block` sets blockwise's tiles while tracing."""
    def loss(q, k, v):
        out = module.attend(q, k, v, q_segment_ids=segments, implementation=implementation)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    saved = module.BLOCK_Q, module.BLOCK_KV
    if block:
        module.BLOCK_Q = module.BLOCK_KV = block
    try:
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    finally:
        module.BLOCK_Q, module.BLOCK_KV = saved
    jax.block_until_ready(compiled(q, k, v))
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def timed(compiled, q, k, v) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    return time.perf_counter() - t0


def module_at(ref: str):
    """jaxtune/models/attention.py as of git revision `ref`, imported under another name."""
    source = subprocess.run(["git", "show", f"{ref}:jaxtune/models/attention.py"], check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix="_attention.py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"attention_at_{ref.replace('~', '_')}", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--implementations", default="reference,blockwise")
    p.add_argument("--baseline", default="", help="git revision: also time its blockwise/reference (before/after)")
    p.add_argument("--blocks", default="", help="comma list of blockwise tile sizes to time besides the default")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    old = module_at(args.baseline) if args.baseline else None
    for length in (int(x) for x in args.lengths.split(",")):
        inputs = _inputs(args.batch, length, args.heads, args.kv_heads, args.head_dim, jnp.dtype(args.dtype))
        variants = {}
        for impl in args.implementations.split(","):
            variants[impl] = (attention, impl, None)
            if old is not None:
                variants[f"{impl}@{args.baseline}"] = (old, impl, None)
            if impl == "blockwise":
                for block in (int(b) for b in args.blocks.split(",") if b):
                    variants[f"blockwise/{block}"] = (attention, impl, block)
        steps = {name: compile_step(module, impl, *inputs, block=block) for name, (module, impl, block) in variants.items()}
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, (compiled, _) in steps.items():
                times[name].append(timed(compiled, *inputs[:3]))
        for name, (_, temp) in steps.items():
            row = {"T": length, "implementation": name, "backend": jax.default_backend(),
                   "seconds": statistics.median(times[name]), "rounds_s": [round(t, 3) for t in times[name]],
                   "temp_mib": temp / 2**20}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
