"""Flash attention for GPU in Pallas (Triton lowering), for packed and left-padded batches.

Why our own kernel: cuDNN through `jax.nn.dot_product_attention` takes only per-row lengths
(one segment per row, right padding) and no logit soft cap, and jax 0.10.2's
`jax.experimental.pallas.ops.gpu.attention.mha` takes segment ids but no sliding window, no soft
cap and no grouped-query heads. This kernel computes attention.py's function for a training call
(queries = keys, no KV cache, no prefix slots): index-causal, same segment id, an optional static
sliding window W (q - k < W), an optional soft cap, GQA by mapping query head h to kv head
h // group in the BlockSpecs (no repeated k/v in memory).

Forward (grid: query block x batch x head): online softmax over the key blocks causality and the
window leave visible; saves the logsumexp. Backward, FlashAttention-2 style from that logsumexp:
one kernel per key block for dK/dV (loops over the query blocks that can see it), one per query
block for dQ (loops over visible key blocks); delta = sum(dO * O) in plain JAX. dK/dV come out
per query head in float32 and are summed over each kv head's group outside the kernel.

Lengths are padded to a multiple of the largest block with segment id -1, which no real token
carries (0 = padding, 1.. = sequences): padded queries see only padded keys, so no row is empty.
`interpret=True` runs the same kernels on any backend (tests on CPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

# Tile sizes: forward (queries x keys) and backward (both kernels). Triton needs tiles of at
# least 16 rows; the backward holds more tiles at once, so it uses smaller ones.
BLOCK_Q = 64
BLOCK_K = 64
BLOCK_BACKWARD = 32
_PAD_SEGMENT = -1
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite: exp(masked - max) never makes a NaN


class Settings(NamedTuple):
    """Static facts of one call (hashable: a custom_vjp nondiff argument)."""

    window: int | None
    soft_cap: float | None
    scale: float
    block_q: int
    block_k: int
    block_backward: int
    interpret: bool


def supported_head_dim(head_dim: int) -> bool:
    """Triton tiles: head_dim a power of two from 16 (its smallest matmul) to 256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def flash_attention(
    q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array, *, scale: float,
    window: int | None = None, soft_cap: float | None = None, interpret: bool = False,
) -> Array:
    """q[B,T,H,D], k/v[B,T,K,D], segment ids [B,T] -> [B,T,H,D] in v's dtype."""
    b, t, h, d = q.shape
    if k.shape[1] != t:
        raise ValueError(f"queries and keys must be the same tokens (T={t}, S={k.shape[1]})")
    if not supported_head_dim(d):
        raise ValueError(f"head_dim {d} is not a power of two from 16 to 256")
    padded = _padded_length(t)
    settings = Settings(window, soft_cap, float(scale), min(BLOCK_Q, padded), min(BLOCK_K, padded),
                        min(BLOCK_BACKWARD, padded), interpret)
    pad = padded - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        q_segment_ids, kv_segment_ids = (
            jnp.pad(x.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
            for x in (q_segment_ids, kv_segment_ids))
    out = _flash(settings, q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
    return out[:, :t].astype(v.dtype)


def _padded_length(t: int) -> int:
    block = max(BLOCK_Q, BLOCK_K, BLOCK_BACKWARD)
    # short sequences: one tile of the next power of two (at least Triton's 16)
    block = min(block, max(16, 1 << (t - 1).bit_length()))
    return -(-t // block) * block


# ----------------------------------------------------------------------------- shared tile math


def _scores(s: Settings, q: Array, k: Array) -> tuple[Array, Array | None]:
    """float32 scores [bq, bk] (soft-capped) and the cap's tanh, for its derivative."""
    scores = pl.dot(q, k, trans_b=True) * s.scale
    if s.soft_cap is None:
        return scores, None
    tanh = jnp.tanh(scores / s.soft_cap)
    return s.soft_cap * tanh, tanh


def _visible(s: Settings, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array) -> Array:
    rule = (q_idx[:, None] >= k_idx[None, :]) & (q_seg[:, None] == k_seg[None, :])
    if s.window is not None:
        rule = rule & (q_idx[:, None] - k_idx[None, :] < s.window)
    return rule


def _key_blocks(s: Settings, q_lo, q_hi, block_k: int, num_blocks: int):
    """Key blocks [lo, hi) that queries q_lo..q_hi-1 can see (causal, window)."""
    hi = jnp.minimum(jax.lax.div(q_hi + block_k - 1, block_k), num_blocks)
    lo = 0 if s.window is None else jax.lax.div(jnp.maximum(q_lo - s.window + 1, 0), block_k)
    return lo, hi


def _query_blocks(s: Settings, k_lo, k_hi, block_q: int, num_blocks: int):
    """Query blocks [lo, hi) that can see keys k_lo..k_hi-1 (causal, window)."""
    lo = jax.lax.div(k_lo, block_q)
    if s.window is None:
        return lo, num_blocks
    return lo, jnp.minimum(jax.lax.div(k_hi - 1 + s.window + block_q - 1, block_q), num_blocks)


# ----------------------------------------------------------------------------- kernels


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, *, s: Settings):
    bq, bk = s.block_q, s.block_k
    i = pl.program_id(0)
    q = q_ref[...]
    q_seg = q_seg_ref[...]
    q_idx = i * bq + jnp.arange(bq)

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * bk, bk)
        v = v_ref[keys, :]
        scores, _ = _scores(s, q, k_ref[keys, :])
        visible = _visible(s, q_idx, j * bk + jnp.arange(bk), q_seg, k_seg_ref[keys])
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, scores, _MASKED), axis=1))
        p = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        acc = acc * corr[:, None] + pl.dot(p.astype(v.dtype), v)
        return acc, m_new, l * corr + jnp.sum(p, axis=1)

    lo, hi = _key_blocks(s, i * bq, (i + 1) * bq, bk, k_ref.shape[0] // bk)
    init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32), jnp.full((bq,), _MASKED, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)  # l > 0: every query sees itself
    lse_ref[...] = m + jnp.log(l)


def _dkdv_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 *, s: Settings):
    blk = s.block_backward
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_seg = k_seg_ref[...]
    k_idx = j * blk + jnp.arange(blk)

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * blk, blk)
        q, do = q_ref[rows, :], do_ref[rows, :]
        scores, tanh = _scores(s, q, k)
        visible = _visible(s, i * blk + jnp.arange(blk), k_idx, q_seg_ref[rows], k_seg)
        p = jnp.where(visible, jnp.exp(scores - lse_ref[rows][:, None]), 0.0)
        dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (pl.dot(do, v, trans_b=True) - delta_ref[rows][:, None])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dk = dk + pl.dot((ds * s.scale).astype(q.dtype), q, trans_a=True)
        return dk, dv

    lo, hi = _query_blocks(s, j * blk, (j + 1) * blk, blk, q_ref.shape[0] // blk)
    zeros = jnp.zeros((blk, k.shape[-1]), jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, s: Settings):
    blk = s.block_backward
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    q_seg, lse, delta = q_seg_ref[...], lse_ref[...], delta_ref[...]
    q_idx = i * blk + jnp.arange(blk)

    def body(j, dq):
        keys = pl.ds(j * blk, blk)
        k = k_ref[keys, :]
        scores, tanh = _scores(s, q, k)
        visible = _visible(s, q_idx, j * blk + jnp.arange(blk), q_seg, k_seg_ref[keys])
        p = jnp.where(visible, jnp.exp(scores - lse[:, None]), 0.0)
        ds = p * (pl.dot(do, v_ref[keys, :], trans_b=True) - delta[:, None])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        return dq + pl.dot((ds * s.scale).astype(k.dtype), k)

    lo, hi = _key_blocks(s, i * blk, (i + 1) * blk, blk, k_ref.shape[0] // blk)
    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros((blk, q.shape[-1]), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


def _specs(t: int, d: int, group: int, block: int):
    """BlockSpecs over a (row block, batch, query head) grid: a [block, D] tile of one head's
    rows, the whole [T, D] of that head (or of its kv head), its segment ids and [T] stats."""
    tile = lambda kv: pl.BlockSpec((None, block, None, d), lambda i, b, h: (b, i, h // group if kv else h, 0))
    whole = lambda kv: pl.BlockSpec((None, t, None, d), lambda i, b, h: (b, 0, h // group if kv else h, 0))
    seg_tile = pl.BlockSpec((None, block), lambda i, b, h: (b, i))
    seg_whole = pl.BlockSpec((None, t), lambda i, b, h: (b, 0))
    stat_tile = pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))
    stat_whole = pl.BlockSpec((None, None, t), lambda i, b, h: (b, h, 0))
    return tile, whole, seg_tile, seg_whole, stat_tile, stat_whole


def _params(head_dim: int):
    """Triton launch settings (untuned: jax's own GPU attention uses the same heuristic)."""
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _forward(s: Settings, q, k, v, q_seg, k_seg):
    b, t, h, d = q.shape
    tile, whole, seg_tile, seg_whole, stat_tile, _ = _specs(t, d, h // k.shape[2], s.block_q)
    return pl.pallas_call(
        functools.partial(_forward_kernel, s=s),
        grid=(t // s.block_q, b, h),
        in_specs=[tile(False), whole(True), whole(True), seg_tile, seg_whole],
        out_specs=[tile(False), stat_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=_params(d), interpret=s.interpret, name="jaxtune_flash_forward",
    )(q, k, v, q_seg, k_seg)


def _backward(s: Settings, q, k, v, q_seg, k_seg, out, lse, dout):
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    tile, whole, seg_tile, seg_whole, stat_tile, stat_whole = _specs(t, d, group, s.block_backward)
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    grid = (t // s.block_backward, b, h)
    per_head = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, s=s), grid=grid,
        in_specs=[whole(False), tile(True), tile(True), seg_whole, seg_tile, whole(False), stat_whole, stat_whole],
        out_specs=[tile(False), tile(False)], out_shape=[per_head, per_head],
        compiler_params=_params(d), interpret=s.interpret, name="jaxtune_flash_dkdv",
    )(q, k, v, q_seg, k_seg, dout, lse, delta)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, s=s), grid=grid,
        in_specs=[tile(False), whole(True), whole(True), seg_tile, seg_whole, tile(False), stat_tile, stat_tile],
        out_specs=tile(False), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(d), interpret=s.interpret, name="jaxtune_flash_dq",
    )(q, k, v, q_seg, k_seg, dout, lse, delta)
    # each kv head's gradient: the sum over the query heads of its group
    dk = dk.reshape(b, t, kv_heads, group, d).sum(axis=3)
    dv = dv.reshape(b, t, kv_heads, group, d).sum(axis=3)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(s: Settings, q, k, v, q_seg, k_seg):
    return _forward(s, q, k, v, q_seg, k_seg)[0]


def _flash_fwd(s, q, k, v, q_seg, k_seg):
    out, lse = _forward(s, q, k, v, q_seg, k_seg)
    return out, (q, k, v, q_seg, k_seg, out, lse)


def _flash_bwd(s, res, dout):
    q, k, v, q_seg, k_seg, out, lse = res
    dq, dk, dv = _backward(s, q, k, v, q_seg, k_seg, out, lse, dout)
    no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return dq, dk, dv, no_grad(q_seg), no_grad(k_seg)


_flash.defvjp(_flash_fwd, _flash_bwd)

