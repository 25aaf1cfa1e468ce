"""LM head + cross-entropy, forward and backward: full logits vs jaxtune's chunked head.

    python benchmarks/chunked_loss.py [--batch 8] [--seq_len 512] [--hidden 512] [--vocab 8192]

Times value_and_grad of the token-mean NLL w.r.t. the hidden states and the head weights (an
untied [hidden, vocab] kernel) and reads the compiled function's temporary bytes, for the full
path (`chunk=0`), `jaxtune.logprobs.head_token_stats` at several chunk sizes, and, for
comparison, a hand-written custom-VJP version of the chunked head (softmax gradient written out,
log Z saved from the forward pass instead of recomputed). Medians of --repeats runs after a
warm-up; one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.logprobs import head_token_stats


def custom_vjp_logp(w, hidden, targets, chunk):
    """log p(target) [B, T] with a hand-written backward pass, chunk positions at a time."""
    b, t, d = hidden.shape
    n = t // chunk
    split = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)
    merge = lambda x: jnp.swapaxes(x, 0, 1).reshape(b, t, *x.shape[3:])

    def forward(w, hs, ys):
        def one(_, x):
            h, y = x
            logits = (h @ w).astype(jnp.float32)
            log_z = jax.nn.logsumexp(logits, -1)
            return None, (jnp.take_along_axis(logits, y[..., None], -1)[..., 0] - log_z, log_z)
        return jax.lax.scan(one, None, (hs, ys))[1]

    @jax.custom_vjp
    def logp(w, hs):
        return forward(w, hs, split(targets))[0]

    def fwd(w, hs):
        out, log_z = forward(w, hs, split(targets))
        return out, (w, hs, log_z)

    def bwd(res, g):
        w, hs, log_z = res

        def one(dw, x):
            h, y, lz, gy = x
            p = jnp.exp((h @ w).astype(jnp.float32) - lz[..., None])
            dlogits = gy[..., None] * (jax.nn.one_hot(y, w.shape[1], dtype=jnp.float32) - p)
            return dw + jnp.einsum("bcd,bcv->dv", h, dlogits), dlogits @ w.T

        dw, dh = jax.lax.scan(one, jnp.zeros_like(w), (hs, split(targets), log_z, g))
        return dw, dh

    logp.defvjp(fwd, bwd)
    return merge(logp(w, split(hidden)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--chunks", default="0,64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(args.batch, args.seq_len, args.hidden)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(args.hidden, args.vocab)) / np.sqrt(args.hidden), jnp.float32)
    targets = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq_len)))

    variants = {f"chunk={c}": (lambda c: lambda w, h: -jnp.mean(
        head_token_stats(lambda x: x @ w, h, targets, chunk=c).logp))(int(c)) for c in args.chunks.split(",")}
    for c in args.chunks.split(","):
        if int(c) and args.seq_len % int(c) == 0:
            variants[f"custom_vjp chunk={c}"] = (lambda c: lambda w, h: -jnp.mean(
                custom_vjp_logp(w, h, targets, c)))(int(c))
    reference = None
    for name, loss in variants.items():
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        temp = fn.lower(w, hidden).compile().memory_analysis().temp_size_in_bytes
        out = jax.block_until_ready(fn(w, hidden))
        reference = reference or out
        error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(w, hidden))
            times.append(time.perf_counter() - t0)
        print(json.dumps({"variant": name, "ms": round(1e3 * statistics.median(times), 1),
                          "temp_mb": round(temp / 2**20, 1), "max_abs_diff_vs_first": error}), flush=True)


if __name__ == "__main__":
    main()
