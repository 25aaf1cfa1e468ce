"""Attention: one interface (`attend`), several implementations chosen by `model.attention`.

    reference  batched matmuls over a [B, kv, group*T, S] float32 score tensor (tests, short T)
    blockwise  flash-style online softmax in plain JAX, every backend; a custom VJP recomputes
               scores block by block, so forward and backward hold O(T * block), never O(T^2)
    splash     Pallas splash attention on TPU (jax.experimental.pallas.ops.tpu.splash_attention)
    pallas_gpu Pallas flash attention on GPU (Triton lowering, models/gpu_flash_attention.py):
               packed and left-padded rows, windows, soft cap, GQA; no KV cache, no prefix slots
    cudnn      cuDNN fused attention through jax.nn.dot_product_attention on GPU, where its
               constraints allow (see `_cudnn_blocker`): rows of one segment plus right padding,
               checked at run time; other calls run pallas_gpu where it can, else blockwise
    auto       TPU: splash; GPU: cudnn (so pallas_gpu for packed/left-padded rows); CPU:
               reference up to CPU_REFERENCE_MAX_KEYS keys, blockwise above (see `resolve`)

Every implementation computes the same function (tests/models/test_attention.py):
- query t of the T queries sits at key index q_offset + t (default: the last T of S keys), and
  sees key s when s <= q_offset + t (causal by index, since packed rows restart positions),
  segment_ids match (0 = padding: padding only sees padding, so no row is ever empty), and,
  with a sliding window W, q_offset + t - s < W (HF: W keys including the query itself);
- grouped-query attention: query head h reads kv head h // (H // K) (HF's repeat_kv);
- scores are scale * q.k (scale defaults to head_dim ** -0.5), then soft-capped
  cap * tanh(scores / cap) (Gemma 2) before masking; softmax in float32;
- `is_sliding` (a traced bool scalar, the scanned per-layer flag of Gemma 2/3) switches the
  window on and off per layer;
- `prefix` slots: P extra key/value pairs in front of the keys (no segment, no position), seen
  by every non-padding query whatever its segment or window (`layers.Attention.prefix_slots`).
An implementation that cannot express a call (e.g. splash with prefix slots) hands it to
blockwise and logs that once.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.errors import UserError
from jaxtune.models import gpu_flash_attention, matmul

log = logging.getLogger(__name__)

Array = jax.Array

IMPLEMENTATIONS = ("auto", "splash", "blockwise", "cudnn", "pallas_gpu", "reference")

# CPU `auto`: up to this many keys the reference (batched matmuls in the transpose-free layout)
# beat blockwise in benchmarks/attention.py on an idle 2-core machine (forward+backward, batch 8,
# 8 heads / 2 kv heads / d 64: 256 keys 1.3x, 512 keys 1.9x, 1024 keys 1.7x faster) and in the
# bench train step (T 512: 5.80 vs 6.52 s/step); above it blockwise keeps memory linear in T.
CPU_REFERENCE_MAX_KEYS = 1024
# blockwise tile sizes (queries x keys); shorter sequences use a single tile. 256 beat 512 in
# benchmarks/attention.py (fwd+bwd, batch 4, 8 heads / 2 kv heads / d 64, causal, 2 segments; Intel
# Xeon @ 2.80GHz, 2 cores, contended, alternating rounds): T 1024 3.95 vs 5.67 s, T 2048 15.6 vs
# 19.0 s, half the temporaries: causal tiles on the diagonal waste less.
BLOCK_Q = 256
BLOCK_KV = 256
# A window wider than any sequence: "not sliding" for a traced window.
_NO_WINDOW = 2**30

_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def validate_implementation(name: str, owner: str = "model.attention") -> None:
    if name not in IMPLEMENTATIONS:
        raise UserError(f"{owner}={name!r}; expected one of {', '.join(IMPLEMENTATIONS)}")


# ----------------------------------------------------------------------------- the call


class Call(NamedTuple):
    """Everything that defines the mask, shared by every implementation."""

    q_segment_ids: Array  # [B, T]
    kv_segment_ids: Array  # [B, S]
    q_offset: Array | int  # key index of query 0 (traced for a KV cache)
    sliding_window: int | None  # static W, or None
    is_sliding: Array | None  # traced bool: W applies (None: W applies when set)
    soft_cap: float | None
    scale: float
    prefix: tuple[Array, Array] | None  # ([P, K, D], [P, K, D]) or None

    @property
    def cached(self) -> bool:
        return not isinstance(self.q_offset, int)


def attend(
    q: Array, k: Array, v: Array, *, q_segment_ids: Array, kv_segment_ids: Array | None = None,
    q_offset: Array | int | None = None, sliding_window: int | None = None, is_sliding: Array | None = None,
    soft_cap: float | None = None, scale: float | None = None,
    prefix: tuple[Array, Array] | None = None, implementation: str = "auto",
) -> Array:
    """q[B,T,H,D], k/v[B,S,K,D] -> [B,T,H,D] in v's dtype (semantics: the module docstring).

    kv_segment_ids/q_offset: a KV cache's per-slot segment ids and write index (queries at keys
    q_offset..); by default q/k/v are the same tokens (q_offset = S - T).
    """
    validate_implementation(implementation)
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"num_heads ({h}) must be a multiple of num_kv_heads ({kv}).")
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    if q_offset is None:
        q_offset = k.shape[1] - t
    call = Call(q_segment_ids, kv_segment_ids, q_offset, sliding_window, is_sliding, soft_cap,
                d**-0.5 if scale is None else scale, prefix)
    name = resolve(implementation, q, k, call)
    return _IMPLS[name](q, k, v, call)


def target_platform() -> str:
    """The platform being compiled for: the active mesh's devices (a deviceless TPU compile runs
    on a CPU host under `jax.set_mesh(tpu_mesh)`), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve(implementation: str, q: Array, k: Array, call: Call) -> str:
    """The implementation that runs this call: `auto` per backend, and fallbacks to blockwise
    for what splash/cudnn cannot express (each logged once)."""
    backend = target_platform()
    if implementation == "auto":
        if backend == "tpu":
            implementation = "splash"
        elif backend == "gpu":
            implementation = "cudnn"
        else:
            implementation = "reference" if k.shape[1] <= CPU_REFERENCE_MAX_KEYS else "blockwise"
    if implementation == "splash":
        why = _splash_blocker(call)
    elif implementation == "cudnn":
        why = _cudnn_blocker(q, call)
    elif implementation == "pallas_gpu":
        why = _pallas_gpu_blocker(q, k, call)
    else:
        return implementation
    if why:
        fallback = _gpu_fallback(q, k, call) if implementation == "cudnn" else "blockwise"
        _log_once(f"attention: {implementation} cannot run this call ({why}); using {fallback}")
        return fallback
    return implementation


def _gpu_fallback(q: Array, k: Array, call: Call) -> str:
    """What runs a call cuDNN cannot take: the Pallas GPU kernel where it can, else blockwise."""
    why = _pallas_gpu_blocker(q, k, call)
    if why:
        _log_once(f"attention: pallas_gpu cannot run this call ({why}); using blockwise")
        return "blockwise"
    return "pallas_gpu"


# ----------------------------------------------------------------------------- reference


def make_attention_mask(
    q_segment_ids: Array, kv_segment_ids: Array | None = None, *, sliding_window: int | None = None,
    q_offset: Array | int | None = None,
) -> Array:
    """[B,T,S] bool: causal by array index AND same segment id (AND within the window).

    Queries sit at key indices q_offset.. (default: the last T of the S keys); a KV cache passes
    its write index, with unwritten slots carrying segment 0.
    Index-causal (not position-causal) because packed rows restart positions per segment.
    Padding (segment 0) attends to padding only, so no row is ever fully masked (no NaNs).
    sliding_window=W keeps keys with q_index - k_index < W (HF's convention: W keys including
    the query itself). Segments are contiguous, so index distance = position distance.
    """
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    t, s = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
    q_idx = jnp.arange(t)[:, None] + (s - t if q_offset is None else q_offset)
    k_idx = jnp.arange(s)[None, :]
    causal = q_idx >= k_idx
    if sliding_window is not None:
        causal = causal & (q_idx - k_idx < sliding_window)
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return causal[None] & same


@jax.custom_vjp
def softmax(x: Array) -> Array:
    """jax.nn.softmax over the last axis whose backward keeps only the output y (autodiff kept
    the unnormalised exponentials as well: a second [T, S] array per layer in the scan)."""
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
    y = softmax(x)
    return y, y


def _softmax_bwd(y, dy):
    return (y * (dy - jnp.sum(dy * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def dot_product_attention(
    q: Array, k: Array, v: Array, mask: Array, *, scale: float | None = None,
    soft_cap: float | None = None, bias: Array | None = None,
) -> Array:
    """Grouped-query attention: q[B,T,H,D], k/v[B,S,K,D], mask[B,T,S] -> [B,T,H,D].

    Scores and softmax are float32; the weighted sum runs in the compute dtype of v. `bias`
    ([B or 1, H, T, S], float32) is added to the scaled scores before masking: T5's relative
    position bias, which no fused kernel takes, so T5 calls this function directly.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    g, s = h // kv, k.shape[1]
    # Batched matmuls in [B, K, rows, cols] layout, so neither pass transposes a [T, S] tensor
    # (matmul.bmm; only q/k/v/out, T*D-sized, are transposed: XLA:CPU pays dearly for those).
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    scores = matmul.bmm(q, k.transpose(0, 2, 3, 1), jnp.float32)  # [B, K, G*T, S]
    scores = scores * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    if bias is not None:  # heads are kv-major (h = kv * G + g), as in the reshape of q above
        bias = jnp.broadcast_to(bias.astype(jnp.float32), (b, h, t, s)).reshape(b, kv, g * t, s)
        scores = scores + bias
    mask = jnp.broadcast_to(mask[:, None, None], (b, kv, g, t, s)).reshape(b, kv, g * t, s)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    # One [G*T, S] array is both softmax's and the second matmul's residual (float32 models).
    probs = softmax(scores).astype(v.dtype)
    out = matmul.bmm(probs, v.transpose(0, 2, 1, 3), None)  # [B, K, G*T, D]
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _reference(q: Array, k: Array, v: Array, call: Call) -> Array:
    mask = make_attention_mask(call.q_segment_ids, call.kv_segment_ids, q_offset=call.q_offset)
    if call.sliding_window is not None:
        local = make_attention_mask(
            call.q_segment_ids, call.kv_segment_ids, q_offset=call.q_offset, sliding_window=call.sliding_window
        )
        mask = local if call.is_sliding is None else jnp.where(call.is_sliding, local, mask)
    if call.prefix is not None:
        k, v, mask = _with_prefix_slots(k, v, mask, call.q_segment_ids, call.prefix)
    return dot_product_attention(q, k, v, mask, scale=call.scale, soft_cap=call.soft_cap)


def _with_prefix_slots(k: Array, v: Array, mask: Array, q_segment_ids: Array,
                       prefix: tuple[Array, Array]) -> tuple[Array, Array, Array]:
    """k/v [B,S,K,D] and mask [B,T,S] with the P prefix slots in front (seen by every real query)."""
    pk, pv = prefix
    b, length = k.shape[0], pk.shape[0]
    k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), (b, *pk.shape)), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), (b, *pv.shape)), v], axis=1)
    seen = jnp.broadcast_to((q_segment_ids != 0)[:, :, None], (*q_segment_ids.shape, length))
    return k, v, jnp.concatenate([seen, mask], axis=-1)


# ----------------------------------------------------------------------------- blockwise


class _Geometry(NamedTuple):
    """Static shape facts of one blockwise call (hashable: a custom_vjp nondiff argument)."""

    block_q: int
    block_kv: int
    num_keys: int  # prefix slots + real keys, before padding to block_kv
    prefix_len: int
    soft_cap: float | None


def _window_of(call: Call) -> Array | int:
    """The window as a number: static W, a traced W-or-infinite, or infinite."""
    if call.sliding_window is None:
        return _NO_WINDOW
    if call.is_sliding is None:
        return call.sliding_window
    return jnp.where(call.is_sliding, call.sliding_window, _NO_WINDOW)


def _block_mask(geo: _Geometry, q_pos: Array, k_idx: Array, q_seg: Array, k_seg: Array, window) -> Array:
    """[B, bq, bk] visibility: q_pos [bq] (key index of each query), k_idx [bk] (index into the
    prefix + keys sequence), q_seg [B, bq], k_seg [B, bk]."""
    real = k_idx - geo.prefix_len
    rule = (q_pos[:, None] >= real[None, :]) & (q_pos[:, None] - real[None, :] < window)
    rule = rule[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    if geo.prefix_len:
        is_prefix = (k_idx < geo.prefix_len)[None, None, :]
        rule = jnp.where(is_prefix, (q_seg != 0)[:, :, None], rule)
    if geo.num_keys % geo.block_kv:  # tail padding of the keys
        rule = rule & (k_idx < geo.num_keys)[None, None, :]
    return rule


def _block_needed(geo: _Geometry, i: Array, j: Array, q_offset, window) -> Array:
    """False when causality / the window hides the whole (query block i, key block j) tile."""
    q_lo = q_offset + i * geo.block_q
    q_hi = q_lo + geo.block_q - 1
    k_lo = j * geo.block_kv - geo.prefix_len
    k_hi = k_lo + geo.block_kv - 1
    visible = (k_lo <= q_hi) & (q_lo - k_hi < window)
    return visible | (j * geo.block_kv < geo.prefix_len)


def _scores(geo: _Geometry, q: Array, k: Array) -> tuple[Array, Array | None]:
    """Capped float32 scores [B,K,G,bq,bk] and tanh (for the cap's derivative); q comes scaled
    (`_blockwise` folds the scale into q once: no per-tile multiply, forward or backward)."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32)
    if geo.soft_cap is None:
        return s, None
    tanh = jnp.tanh(s / geo.soft_cap)
    return geo.soft_cap * tanh, tanh


_MIN = float(np.finfo(np.float32).min)


def _blockwise_forward(geo, q, k, v, q_seg, k_seg, q_offset, window):
    """q [nq,B,K,G,bq,D], k/v [nk,B,K,bk,D], segs [nq,B,bq] / [nk,B,bk] -> out like q, lse [nq,B,K,G,bq]."""
    nk = k.shape[0]

    def one_q_block(args):
        i, q_i, q_seg_i = args
        q_pos = q_offset + i * geo.block_q + jnp.arange(geo.block_q)
        b, kh, g, bq, d = q_i.shape
        init = (jnp.full((b, kh, g, bq), _MIN, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, v.shape[-1]), jnp.float32))

        def step(carry, xs):
            j, k_j, v_j, k_seg_j = xs

            def update(carry):
                m, l, acc = carry
                k_idx = j * geo.block_kv + jnp.arange(geo.block_kv)
                mask = _block_mask(geo, q_pos, k_idx, q_seg_i, k_seg_j, window)[:, None, None]
                s, _ = _scores(geo, q_i, k_j)
                s = jnp.where(mask, s, _MIN)
                m_new = jnp.maximum(m, s.max(-1))
                # No second select: masked scores give exp(_MIN - m_new) = 0 once a row has seen
                # a visible key, and a row's terms from before that (m_new = _MIN) are erased by
                # corr = exp(_MIN - m) = 0 at its first visible key (every real query sees itself).
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

            needed = _block_needed(geo, i, j, q_offset, window)
            return jax.lax.cond(needed, update, lambda c: c, carry), None

        (m, l, acc), _ = jax.lax.scan(step, init, (jnp.arange(nk), k, v, k_seg))
        l_safe = jnp.where(l == 0.0, 1.0, l)  # only padding rows added here are empty
        return (acc / l_safe[..., None]).astype(v.dtype), m + jnp.log(l_safe)

    return jax.lax.map(one_q_block, (jnp.arange(q.shape[0]), q, q_seg))


def _blockwise_backward(geo, q, k, v, q_seg, k_seg, q_offset, window, out, lse, dout):
    """Gradients of _blockwise_forward's out w.r.t. q, k, v: one pass over key blocks (outer),
    query blocks inside; each tile's probabilities are recomputed from the saved logsumexp."""
    nq = q.shape[0]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq,B,K,G,bq]

    def one_kv_block(args):
        j, k_j, v_j, k_seg_j = args
        k_idx = j * geo.block_kv + jnp.arange(geo.block_kv)
        zeros_kv = jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32)

        def step(carry, xs):
            i, q_i, q_seg_i, do_i, lse_i, delta_i = xs

            def grads(carry):
                dk_j, dv_j = carry
                q_pos = q_offset + i * geo.block_q + jnp.arange(geo.block_q)
                mask = _block_mask(geo, q_pos, k_idx, q_seg_i, k_seg_j, window)[:, None, None]
                s, tanh = _scores(geo, q_i, k_j)
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do_i.dtype), do_i,
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None])
                if tanh is not None:
                    ds = ds * (1.0 - tanh * tanh)
                ds = ds.astype(q_i.dtype)
                dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds, k_j, preferred_element_type=jnp.float32)
                dk_j = dk_j + jnp.einsum("bkgqs,bkgqd->bksd", ds, q_i, preferred_element_type=jnp.float32)
                return (dk_j, dv_j), dq_i

            def skip(carry):
                return carry, jnp.zeros(q_i.shape, jnp.float32)

            needed = _block_needed(geo, i, j, q_offset, window)
            return jax.lax.cond(needed, grads, skip, carry)

        (dk_j, dv_j), dq = jax.lax.scan(step, zeros_kv, (jnp.arange(nq), q, q_seg, dout, lse, delta))
        return dk_j, dv_j, dq

    def outer(dq, args):
        dk_j, dv_j, dq_j = one_kv_block(args)
        return dq + dq_j, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(outer, jnp.zeros(q.shape, jnp.float32), (jnp.arange(k.shape[0]), k, v, k_seg))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_core(geo, q, k, v, q_seg, k_seg, q_offset, window):
    return _blockwise_forward(geo, q, k, v, q_seg, k_seg, q_offset, window)[0]


def _core_fwd(geo, q, k, v, q_seg, k_seg, q_offset, window):
    out, lse = _blockwise_forward(geo, q, k, v, q_seg, k_seg, q_offset, window)
    return out, (q, k, v, q_seg, k_seg, q_offset, window, out, lse)


def _core_bwd(geo, res, dout):
    q, k, v, q_seg, k_seg, q_offset, window, out, lse = res
    dq, dk, dv = _blockwise_backward(geo, q, k, v, q_seg, k_seg, q_offset, window, out, lse, dout)
    int_zero = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)
    return dq, dk, dv, int_zero(q_seg), int_zero(k_seg), int_zero(q_offset), int_zero(window)


_blockwise_core.defvjp(_core_fwd, _core_bwd)


def _tiles(x: Array, axis: int, block: int, fill) -> Array:
    """Pads `axis` to a multiple of block and moves the block index to the front."""
    n = x.shape[axis]
    pad = -n % block
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    shape = x.shape[:axis] + ((n + pad) // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _blockwise(q: Array, k: Array, v: Array, call: Call, block_q: int | None = None,
               block_kv: int | None = None) -> Array:
    b, t, h, d = q.shape
    kh = k.shape[2]
    kv_seg = call.kv_segment_ids.astype(jnp.int32)
    if call.prefix is not None:  # the prefix slots are the first keys (their mask rule: _block_mask)
        pk, pv = call.prefix
        k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), (b, *pk.shape)), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), (b, *pv.shape)), v], axis=1)
        kv_seg = jnp.concatenate([jnp.zeros((b, pk.shape[0]), jnp.int32), kv_seg], axis=1)
    s = k.shape[1]
    block_q = min(block_q or BLOCK_Q, t)
    block_kv = min(block_kv or BLOCK_KV, s)
    geo = _Geometry(block_q, block_kv, s, 0 if call.prefix is None else call.prefix[0].shape[0], call.soft_cap)
    q = (q.astype(jnp.float32) * call.scale).astype(q.dtype)  # autodiff scales dq outside the core
    q5 = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,D]
    q_tiles = _tiles(q5, 3, block_q, 0)
    q_seg = _tiles(call.q_segment_ids.astype(jnp.int32), 1, block_q, 0)
    k_tiles = _tiles(k.transpose(0, 2, 1, 3), 2, block_kv, 0)
    v_tiles = _tiles(v.transpose(0, 2, 1, 3), 2, block_kv, 0)
    k_seg = _tiles(kv_seg, 1, block_kv, 0)
    q_offset = jnp.asarray(call.q_offset, jnp.int32)
    window = jnp.asarray(_window_of(call), jnp.int32)
    out = _blockwise_core(geo, q_tiles, k_tiles, v_tiles, q_seg, k_seg, q_offset, window)
    out = jnp.moveaxis(out, 0, 3)  # [B,K,G,nq,bq,D]
    out = out.reshape(b, kh, h // kh, -1, d)[:, :, :, :t]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# ----------------------------------------------------------------------------- splash (TPU)

SPLASH_BLOCK = 128  # splash's tiles are multiples of 128 lanes; shorter sequences are padded
# Tests set this to run splash in Pallas interpret mode on CPU (slow; off the TPU it otherwise
# hands over to blockwise).
SPLASH_INTERPRET = False


def _splash_blocker(call: Call) -> str | None:
    if target_platform() != "tpu" and not SPLASH_INTERPRET:
        return f"splash is a TPU kernel, platform is {target_platform()}"
    if call.prefix is not None:
        return "prefix slots need a per-query 'any non-padding segment' rule splash masks cannot express"
    if call.cached:
        return "KV-cache decoding (a traced query offset)"
    return None


def _splash_kernel(heads: int, length: int, window: int | None, soft_cap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), offset=0)
    block = next(b for b in (512, 256, 128) if length % b == 0)  # length is a multiple of 128
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha_single_device(
        sa.MultiHeadMask([one] * heads), block_sizes=sizes, attn_logits_soft_cap=soft_cap, interpret=interpret
    )


def _splash_local(q, k, v, q_seg, kv_seg, *, window, soft_cap, interpret):
    """Per-device splash: q [B,H,T,D] (already scaled), k/v [B,K,T,D], segs [B,T]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kernel = _splash_kernel(q.shape[1], q.shape[2], window, soft_cap, interpret)
    one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks))
    return jax.vmap(one)(q, k, v, q_seg, kv_seg)


def _mesh_spec(shape: tuple[int, ...], logical: tuple[str | None, ...], mesh) -> Any:
    """The partition spec of an activation under the active logical rules, dropping mesh axes
    that do not divide their dimension (as sharding.py's fallback does)."""
    from flax import linen as nn
    from jax.sharding import PartitionSpec

    spec = nn.logical_to_mesh_axes(logical)
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def _splash(q: Array, k: Array, v: Array, call: Call, *, interpret: bool | None = None) -> Array:
    b, t, h, d = q.shape
    interpret = target_platform() != "tpu" if interpret is None else interpret
    pad = -t % SPLASH_BLOCK
    # [B,H,T,D]; the scale folds into q (splash scores are plain q.k)
    qt = (q.astype(jnp.float32) * call.scale).astype(q.dtype).transpose(0, 2, 1, 3)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    q_seg, kv_seg = call.q_segment_ids.astype(jnp.int32), call.kv_segment_ids.astype(jnp.int32)
    if pad:  # appended keys/queries: segment 0, after every real token, so causally invisible
        qt, kt, vt = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (qt, kt, vt))
        q_seg, kv_seg = (jnp.pad(x, ((0, 0), (0, pad))) for x in (q_seg, kv_seg))

    def run(window):
        fn = functools.partial(_splash_local, window=window, soft_cap=call.soft_cap, interpret=interpret)
        return _per_device(fn, ("act_batch", "act_heads", None, None), qt, kt, vt, q_seg, kv_seg)

    out = _per_window(call, run)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(v.dtype)


def _per_device(fn, logical: tuple[str | None, ...], q: Array, k: Array, v: Array, q_seg: Array,
                kv_seg: Array) -> Array:
    """fn(q, k, v, q_seg, kv_seg) on each device's shard under the active mesh (a Pallas kernel
    is one custom call XLA cannot partition: outside a shard_map it would gather every shard).
    `logical`: the activation axes of q/k/v, batch first, heads named "act_heads"."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, q_seg, kv_seg)
    q_spec = _mesh_spec(q.shape, logical, mesh)
    kv_spec = _mesh_spec(k.shape, logical, mesh)
    heads = logical.index("act_heads")
    if q_spec[heads] != kv_spec[heads]:  # q and kv heads must split alike
        q_spec = kv_spec = jax.sharding.PartitionSpec(q_spec[0], *([None] * (q.ndim - 1)))
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_seg, kv_seg)


def _per_window(call: Call, run) -> Array:
    """run(window) with the call's window: static, none, or switched per layer by is_sliding."""
    if call.sliding_window is None:
        return run(None)
    if call.is_sliding is None:
        return run(call.sliding_window)
    return jax.lax.cond(call.is_sliding, lambda: run(call.sliding_window), lambda: run(None))


# ----------------------------------------------------------------------------- Pallas (GPU)

# Tests set this to run the Pallas GPU kernel in interpret mode on CPU (slow; off the GPU it
# otherwise hands over to blockwise).
PALLAS_GPU_INTERPRET = False


def _pallas_gpu_blocker(q: Array, k: Array, call: Call) -> str | None:
    if target_platform() != "gpu" and not PALLAS_GPU_INTERPRET:
        return f"pallas_gpu is a GPU kernel, platform is {target_platform()}"
    if not gpu_flash_attention.supported_head_dim(q.shape[-1]):
        return f"head_dim {q.shape[-1]} is not a power of two from 16 to 256"
    if call.prefix is not None:
        return "prefix slots"
    if call.cached or q.shape[1] != k.shape[1]:
        return "KV-cache decoding (queries are not the keys)"
    return None


def _pallas_gpu(q: Array, k: Array, v: Array, call: Call) -> Array:
    interpret = target_platform() != "gpu"

    def run(window):
        fn = functools.partial(gpu_flash_attention.flash_attention, scale=call.scale, window=window,
                               soft_cap=call.soft_cap, interpret=interpret)
        return _per_device(fn, ("act_batch", None, "act_heads", None), q, k, v,
                           call.q_segment_ids, call.kv_segment_ids)

    return _per_window(call, run).astype(v.dtype)


# ----------------------------------------------------------------------------- cuDNN (GPU)

# jax 0.10.2's jax.nn.dot_product_attention(implementation="cudnn") takes causal masks, a left
# sliding window and per-row valid lengths (right padding), in bf16/fp16, head_dim a multiple of
# 8 up to 128 (256 on Hopper and later). It has no segment ids and no logit soft cap. So a call
# runs on cuDNN only when every row is one segment followed by right padding (checked at run time
# with lax.cond; packed or left-padded batches take pallas_gpu, or blockwise where that cannot run
# the call), without soft cap or prefix slots. (jax._src.cudnn's private dot_product_attention has a
# packed layout, q_offsets/kv_offsets, but no public API reaches it and it has no soft cap.)


def _cudnn_blocker(q: Array, call: Call) -> str | None:
    if target_platform() != "gpu":
        return f"cuDNN needs a GPU, platform is {target_platform()}"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16/float16, compute dtype is {q.dtype}"
    hopper = all(tuple(int(x) for x in getattr(dev, "compute_capability", "0.0").split(".")) >= (9, 0)
                 for dev in jax.local_devices())
    limit = 256 if hopper else 128
    if q.shape[-1] % 8 or q.shape[-1] > limit:
        return f"head_dim {q.shape[-1]} is not a multiple of 8 up to {limit}"
    if call.soft_cap is not None:
        return "logit soft-capping"
    if call.prefix is not None:
        return "prefix slots"
    if call.cached:
        return "KV-cache decoding"
    return None


def _single_segment_lengths(segment_ids: Array) -> tuple[Array, Array]:
    """(valid length [B] int32, whether every row is 1...1 0...0: one segment, right padded)."""
    length = jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)
    expected = (jnp.arange(segment_ids.shape[-1])[None] < length[:, None]).astype(segment_ids.dtype)
    return length, jnp.all(segment_ids == expected)


def _cudnn(q: Array, k: Array, v: Array, call: Call, *, implementation: str = "cudnn") -> Array:
    """`implementation="xla"` runs the same jax.nn call on any backend (tests on CPU)."""
    length, simple = _single_segment_lengths(call.q_segment_ids)

    def fused(window):
        out = jax.nn.dot_product_attention(
            q, k, v, scale=call.scale, is_causal=True, query_seq_lengths=length,
            key_value_seq_lengths=length, local_window_size=None if window is None else (window - 1, 0),
            implementation=implementation,
        )
        # rows past `length` are padding: their output is never read by a real token
        return out.astype(v.dtype)

    fallback = _IMPLS[_gpu_fallback(q, k, call)]
    return jax.lax.cond(simple, lambda: _per_window(call, fused), lambda: fallback(q, k, v, call))


_IMPLS = {"reference": _reference, "blockwise": _blockwise, "splash": _splash, "cudnn": _cudnn,
          "pallas_gpu": _pallas_gpu}
