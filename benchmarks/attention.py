"""Attention implementations side by side: forward+backward time and compiled temporaries.

    python benchmarks/attention.py                          # bench shape: 8 heads, 2 kv heads, d 64
    python benchmarks/attention.py --lengths 256,512,1024,2048 --batch 4

For each sequence length T, times jax.value_and_grad of sum(attend(q, k, v) ** 2) (w.r.t.
q, k, v; packed rows of two segments, causal) for every implementation that runs on this
backend, and reads the compiled program's temporary bytes (memory_analysis). Medians of
--repeats timed runs after a warm-up (compile excluded). This is what chose `auto` on CPU
(attention.CPU_REFERENCE_MAX_KEYS). Prints one JSON line per (T, implementation).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def measure(implementation: str, q, k, v, segments, repeats: int) -> dict:
    def loss(q, k, v):
        out = attention.attend(q, k, v, q_segment_ids=segments, implementation=implementation)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "temp_mib": temp / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--implementations", default="reference,blockwise")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for length in (int(x) for x in args.lengths.split(",")):
        inputs = _inputs(args.batch, length, args.heads, args.kv_heads, args.head_dim, jnp.dtype(args.dtype))
        for impl in args.implementations.split(","):
            row = {"T": length, "implementation": impl, "backend": jax.default_backend(),
                   **measure(impl, *inputs, args.repeats)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
