"""T5, T5 v1.1 / Flan-T5 and mT5 encoder-decoders: config dataclass -> named variants -> modules.

What sets T5 apart from the decoder families (and is all this module adds to the shared layers):
- no position embeddings: a learned relative position bias, bucketed (bidirectional in the
  encoder, causal in the decoder), held by each stack's first layer in HF and shared by all its
  layers; here each stack computes it once and every scanned layer adds it to its scores;
- unscaled dot-product attention (the scale is folded into the weights), T5's RMS norm (no mean,
  no bias: `layers.RMSNorm`), a decoder with cross-attention over the encoder output;
- a ReLU MLP (T5) or a gated-GELU one (T5 v1.1, Flan-T5, mT5);
- one embedding shared by encoder and decoder; a tied LM head whose input is scaled by
  d_model**-0.5 (T5) or an untied `lm_head` without the scale (v1.1, mT5);
- the decoder starts from `decoder_start_token_id` (the pad id): its inputs are the targets
  shifted right (`shift_right`), as transformers' `_shift_right` does for `labels`.

Batch contract: encoder `inputs`/`positions`/`segment_ids` as for a decoder-only model, and the
decoder's `decoder_inputs`/`decoder_positions`/`decoder_segment_ids`; packed rows (T5X-style) put
example k of the row in segment k of both streams, and decoder segment k attends only to encoder
segment k. Positions restart per segment, so the relative bias of a packed example equals the
unpacked one's.

Params layout (HF conversion, adapters and the optimizer's decay mask key on these names; the
projection names are HF's module names q, k, v, o, wi, wo, so adapters named after them mean the same thing):
  embed/embedding, {encoder,decoder}/rel_bias, {encoder,decoder}/final_norm/scale,
  {encoder,decoder}/layers/{attn_norm,mlp_norm}/scale, .../attn/{q,k,v,o}/kernel,
  .../mlp/{wi | wi_0,wi_1, wo}/kernel, decoder/layers/cross_norm/scale,
  decoder/layers/cross_attn/{q,k,v,o}/kernel, lm_head/kernel (untied only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxtune.errors import UserError
from jaxtune.models import attention, hf_mapping, layers

Array = jax.Array
_DTYPES = ("float32", "bfloat16", "float16")
MODEL_TYPES = ("t5", "mt5")  # HF model_type -> T5ForConditionalGeneration / MT5ForConditionalGeneration
_ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture plus numerics. HF names: hidden_size = d_model, intermediate_size = d_ff,
    head_dim = d_kv, rms_norm_eps = layer_norm_epsilon."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # encoder layers
    num_heads: int
    head_dim: int
    num_decoder_layers: int | None = None  # None -> num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # HF: "relu" (T5) | "gated-gelu" (v1.1, Flan-T5, mT5) | "[gated-]<act>"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True  # the LM head is the shared embedding
    scale_decoder_outputs: bool = True  # multiply the decoder output by hidden_size**-0.5 (T5 v1.0)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"  # "mt5": exported as MT5ForConditionalGeneration
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # a key of layers.REMAT_POLICIES

    def __post_init__(self):
        name = type(self).__name__
        if self.model_type not in MODEL_TYPES:
            raise UserError(f"{name}: model_type={self.model_type!r}, expected one of {MODEL_TYPES}.")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise UserError(f"{name}: {field}={getattr(self, field)!r}, expected one of {_DTYPES}.")
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise UserError(f"{name}: remat_policy={self.remat_policy!r}, expected one of "
                            f"{tuple(layers.REMAT_POLICIES)}.")
        self.mlp_activation()  # validates feed_forward_proj
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance < 2:
            raise UserError(f"{name}: relative_attention_num_buckets={self.relative_attention_num_buckets} and "
                            f"relative_attention_max_distance={self.relative_attention_max_distance}; "
                            "expected at least 4 buckets and a distance of at least 2.")

    @property
    def resolved_decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def num_kv_heads(self) -> int:
        """T5 has no grouped-query attention (read by code that sizes KV caches)."""
        return self.num_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim

    def mlp_activation(self) -> tuple[bool, str]:
        """(gated, activation name) of `feed_forward_proj`, as transformers parses it."""
        parts = self.feed_forward_proj.split("-")
        gated = len(parts) == 2 and parts[0] == "gated"
        if len(parts) > 2 or (len(parts) == 2 and not gated):
            raise UserError(f"{type(self).__name__}: feed_forward_proj={self.feed_forward_proj!r}; expected "
                            "'<act>' or 'gated-<act>', e.g. 'relu' or 'gated-gelu'.")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]  # transformers' rule
        if act not in layers.ACTIVATIONS:
            raise UserError(f"{type(self).__name__}: feed_forward_proj={self.feed_forward_proj!r} names activation "
                            f"{act!r}; supported: {tuple(layers.ACTIVATIONS)}.")
        return gated, act

    def train_flops(self, encoder_tokens: int, decoder_tokens: int, encoder_len: int, decoder_len: int) -> float:
        """Model FLOPs of a forward + backward pass over `encoder_tokens` encoder and `decoder_tokens`
        decoder tokens in rows of `encoder_len` / `decoder_len`: what MFU counts for an encoder-decoder.

        As the decoder-only 6N + 12·L·d·T (PaLM appendix B), counted per stream, since the two
        streams see different weights: 6 x the matmul weights each token passes through (encoder
        layers and the cross-attention k/v for an encoder token; decoder self-attention, cross q/o,
        MLP and the LM head for a decoder token; the embedding lookup is free) plus 12 x the
        attention width for every key a query scores (encoder: its row; decoder: its own row and
        the encoder's)."""
        d, width, ff = self.hidden_size, self.num_heads * self.head_dim, self.intermediate_size
        mlp = (3 if self.mlp_activation()[0] else 2) * d * ff
        enc_layers, dec_layers = self.num_layers, self.resolved_decoder_layers
        per_encoder_token = enc_layers * (4 * d * width + mlp) + dec_layers * 2 * d * width  # + cross k, v
        per_decoder_token = dec_layers * (6 * d * width + mlp) + d * self.vocab_size  # self q,k,v,o + cross q,o
        weights = 6.0 * (encoder_tokens * per_encoder_token + decoder_tokens * per_decoder_token)
        scores = 12.0 * width * (encoder_tokens * enc_layers * encoder_len
                                 + decoder_tokens * dec_layers * (decoder_len + encoder_len))
        return weights + scores

    def replace(self, **kw: Any) -> T5Config:
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- variants

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, head_dim=16)
_V1_1 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
_FLAN_T5 = dict(vocab_size=32128, head_dim=64, **_V1_1)


def _flan(hidden, ff, layers_, heads) -> T5Config:
    return T5Config(hidden_size=hidden, intermediate_size=ff, num_layers=layers_, num_heads=heads, **_FLAN_T5)


VARIANTS: dict[str, T5Config] = {
    # Test-sized; train from scratch on CPU in seconds.
    "tiny": T5Config(**_TINY),  # T5 v1.0: ReLU, tied and scaled head
    "tiny-v1.1": T5Config(**_TINY, **_V1_1),  # T5 v1.1 / Flan-T5: gated-GELU, untied head
    "tiny-mt5": T5Config(**_TINY, **_V1_1, model_type="mt5"),
    # Parameter counts below match the published checkpoints (tested against transformers).
    "t5-small": T5Config(vocab_size=32128, hidden_size=512, intermediate_size=2048, num_layers=6, num_heads=8,
                         head_dim=64),  # 60,506,624
    "flan-t5-small": _flan(512, 1024, 8, 6),  # 76,961,152
    "flan-t5-base": _flan(768, 2048, 12, 12),  # 247,577,856
    "flan-t5-large": _flan(1024, 2816, 24, 16),  # 783,150,080
    "flan-t5-xl": _flan(2048, 5120, 24, 32),  # 2,849,757,184
    "flan-t5-xxl": _flan(4096, 10240, 24, 64),  # 11,135,332,352
    "mt5-small": _flan(512, 1024, 8, 6).replace(vocab_size=250112, model_type="mt5"),  # 300,176,768
}


# ----------------------------------------------------------------------------- position bias


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """Mesh TensorFlow's bucketing of key_position - query_position into [0, num_buckets).

    Half the buckets are exact small distances, the other half log-spaced up to max_distance;
    bidirectional (encoder) splits them between keys before and after the query, causal (decoder)
    keeps only keys before it. Computed in float32 as transformers does, so buckets match exactly.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    safe = jnp.maximum(distance, max_exact).astype(jnp.float32)  # log(0) never computed
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


def _position_bias(table: Array, q_positions: Array, k_positions: Array, *, bidirectional: bool,
                   max_distance: int) -> Array:
    """table[buckets, heads], positions [B,T] / [B,S] -> bias [B, heads, T, S] in float32."""
    relative = k_positions[:, None, :].astype(jnp.int32) - q_positions[:, :, None].astype(jnp.int32)
    buckets = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=table.shape[0],
                                       max_distance=max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [B, T, S, heads]
    return nn.with_logical_constraint(bias.transpose(0, 3, 1, 2), ("act_batch", "act_heads", None, None))


# ----------------------------------------------------------------------------- modules


class T5Attention(nn.Module):
    """Unscaled multi-head attention with an additive bias; self-attention (kv_input = x) or
    cross-attention. Projections are named q/k/v/o as in HF (adapter targets and exports key on them).

    With a KV cache (`write_index` given: decoding), self-attention writes this call's keys and
    values at the index of a [B, S_max, heads, head_dim] cache (S_max = the mask's key length);
    cross-attention computes the encoder's keys and values on the first call only and reads them
    from the cache afterwards.
    """

    num_heads: int
    head_dim: int
    cross: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, kv_input: Array, bias: Array | None, mask: Array,
                 write_index: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = ("embed", "heads", "head_dim")
        act = ("act_batch", "act_length", "act_heads", None)
        # T5 folds the 1/sqrt(head_dim) score scale into q: initialise q as transformers' T5 does
        # (std (d_model * head_dim)**-0.5), so initial scores are O(1) rather than O(sqrt(head_dim)).
        q_init = nn.initializers.variance_scaling(1.0 / self.head_dim, "fan_in", "truncated_normal")
        q = nn.with_logical_constraint(
            layers.dense((self.num_heads, self.head_dim), heads, name="q", kernel_init=q_init, **kw)(x), act)

        def keys_values():
            k = layers.dense((self.num_heads, self.head_dim), heads, name="k", **kw)(kv_input)
            v = layers.dense((self.num_heads, self.head_dim), heads, name="v", **kw)(kv_input)
            return nn.with_logical_constraint(k, act), nn.with_logical_constraint(v, act)

        if write_index is None:
            k, v = keys_values()
        elif self.cross:
            k, v = self._cross_cache(keys_values)
        else:
            k, v = keys_values()
            k, v = self._self_cache(k, v, write_index, mask.shape[-1])
        out = attention.dot_product_attention(q, k, v, mask, scale=1.0, bias=bias)
        out = nn.with_logical_constraint(out, act)
        return layers.dense(x.shape[-1], ("heads", "head_dim", "embed"), axis=(-2, -1), name="o", **kw)(out)

    def _self_cache(self, k: Array, v: Array, index: Array, slots: int) -> tuple[Array, Array]:
        def buffer(name, like):
            shape = (like.shape[0], slots, *like.shape[2:])
            init = nn.with_logical_partitioning(lambda: jnp.zeros(shape, like.dtype), layers.CACHE_AXES)
            return self.variable("cache", name, init)

        out = []
        for name, new in (("key", k), ("value", v)):
            buf = buffer(name, new)
            buf.value = nn.with_logical_constraint(
                jax.lax.dynamic_update_slice_in_dim(buf.value, new.astype(buf.value.dtype), index, axis=1),
                layers.CACHE_AXES)
            out.append(buf.value)
        return out[0], out[1]

    def _cross_cache(self, keys_values) -> tuple[Array, Array]:
        if not self.has_variable("cache", "cross_key"):
            k, v = keys_values()
            self.variable("cache", "cross_key", lambda: k)
            self.variable("cache", "cross_value", lambda: v)
        return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")


class T5MLP(nn.Module):
    """wo(act(wi(x))) (T5) or wo(act(wi_0(x)) * wi_1(x)) (gated: T5 v1.1, mT5), HF's names."""

    intermediate_size: int
    gated: bool
    activation: str  # a key of layers.ACTIVATIONS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = layers.ACTIVATIONS[self.activation]
        up = ("embed", "mlp")
        if self.gated:
            h = act(layers.dense(self.intermediate_size, up, name="wi_0", **kw)(x))
            h = h * layers.dense(self.intermediate_size, up, name="wi_1", **kw)(x)
        else:
            h = act(layers.dense(self.intermediate_size, up, name="wi", **kw)(x))
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        return layers.dense(x.shape[-1], ("mlp", "embed"), name="wo", **kw)(h)


def _kw(cfg: T5Config) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class T5Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), [x + cross_attn(norm(x), encoded)], x + mlp(norm(x)).

    Scan-compatible: every argument after x is broadcast to all layers (the bias and masks are
    computed once per stack). `encoded` is None in the encoder, which has no cross-attention.
    """

    config: T5Config

    @nn.compact
    def __call__(self, x, bias, mask, encoded=None, cross_mask=None, write_index=None):
        cfg = self.config
        kw = _kw(cfg)
        residual = ("act_batch", "act_length", "act_embed")
        norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, name=name, **kw)
        attn = lambda name, cross: T5Attention(cfg.num_heads, cfg.head_dim, cross=cross, name=name, **kw)

        h = norm("attn_norm")(x)
        x = nn.with_logical_constraint(x + attn("attn", False)(h, h, bias, mask, write_index), residual)
        if encoded is not None:
            h = norm("cross_norm")(x)
            x = nn.with_logical_constraint(x + attn("cross_attn", True)(h, encoded, None, cross_mask, write_index),
                                           residual)
        gated, activation = cfg.mlp_activation()
        h = T5MLP(cfg.intermediate_size, gated, activation, name="mlp", **kw)(norm("mlp_norm")(x))
        return nn.with_logical_constraint(x + h, residual), None


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, cross-attending): relative bias table,
    scanned blocks, final norm. The input embedding is the model's shared one, applied outside."""

    config: T5Config
    decoder: bool

    def _bias(self, q_positions: Array, k_positions: Array) -> Array:
        cfg = self.config
        table = self.param(
            "rel_bias", nn.with_logical_partitioning(layers.embed_init(cfg.hidden_size), (None, "heads")),
            (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.dtype(cfg.param_dtype))
        return _position_bias(table, q_positions, k_positions, bidirectional=not self.decoder,
                              max_distance=cfg.relative_attention_max_distance)

    def _layers(self, x: Array, *args) -> Array:
        cfg = self.config
        n = cfg.resolved_decoder_layers if self.decoder else cfg.num_layers
        x, _ = layers.stack_layers(T5Block, n, cfg.remat_policy)(cfg, name="layers")(x, *args)
        return layers.RMSNorm(cfg.rms_norm_eps, name="final_norm", **_kw(cfg))(x)

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array, encoded: Array | None = None,
                 encoder_segment_ids: Array | None = None, cache_size: int | None = None) -> Array:
        if not self.decoder:
            mask = segment_ids[:, :, None] == segment_ids[:, None, :]
            return self._layers(x, self._bias(positions, positions), mask)
        assert encoded is not None and encoder_segment_ids is not None
        cross_mask = segment_ids[:, :, None] == encoder_segment_ids[:, None, :]
        if self.is_mutable_collection("cache") and not self.is_initializing():
            return self._decode_cached(x, segment_ids, encoded, cross_mask, cache_size)
        mask = attention.make_attention_mask(segment_ids)  # causal by index, same segment
        return self._layers(x, self._bias(positions, positions), mask, encoded, cross_mask)

    def _decode_cached(self, x, segment_ids, encoded, cross_mask, cache_size):
        """One decoding call: the T new tokens sit at the cache's write index; positions are slots."""
        b, t = segment_ids.shape
        slots = cache_size or t
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        seg = self.variable("cache", "segment_ids", lambda: jnp.zeros((b, slots), jnp.int32))
        i = index.value
        seg.value = jax.lax.dynamic_update_slice_in_dim(seg.value, segment_ids.astype(jnp.int32), i, axis=1)
        index.value = i + t
        mask = attention.make_attention_mask(segment_ids, seg.value, q_offset=i)
        q_positions = jnp.broadcast_to(i + jnp.arange(t), (b, t))
        k_positions = jnp.broadcast_to(jnp.arange(seg.value.shape[1]), seg.value.shape)
        return self._layers(x, self._bias(q_positions, k_positions), mask, encoded, cross_mask, i)


def shift_right(targets: Array, decoder_start_token_id: int) -> Array:
    """The decoder inputs of `targets` [..., T]: the start token, then targets[..., :-1] (HF `_shift_right`).

    Per example: for a packed row, shift each segment (the data pipeline does that before packing).
    """
    xp = jnp if isinstance(targets, jax.Array) else np  # numpy in the data pipeline, jax in a step
    start = xp.full((*targets.shape[:-1], 1), decoder_start_token_id, dtype=targets.dtype)
    return xp.concatenate([start, targets[..., :-1]], axis=-1)


class T5(nn.Module):
    """Encoder-decoder: (inputs[B,S], decoder_inputs[B,T]) -> logits[B,T,vocab] in the compute dtype.

    Split in methods so that the loss can run the LM head in token chunks (as `layers.CausalLM`):
    `encode`, `decoder_hidden_states` (up to the decoder's final norm), `logits_from_hidden`
    (output scale, then the tied embedding or `lm_head`). `__call__` composes them; without
    `decoder_inputs` it decodes the start token alone (what `init` and parameter counting use).
    Encoder and decoder positions default to arange, segment ids to ones (one example per row;
    0 = padding in either stream).
    """

    config: T5Config
    is_encoder_decoder = True

    def setup(self):
        cfg = self.config
        kw = _kw(cfg)
        self.embed = layers.token_embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head", **kw)

    def _embed(self, tokens: Array) -> Array:
        return nn.with_logical_constraint(self.embed(tokens.astype(jnp.int32)), ("act_batch", "act_length", "act_embed"))

    def encode(self, inputs: Array, *, positions: Array | None = None, segment_ids: Array | None = None) -> Array:
        """inputs[B,S] -> the encoder output [B,S,hidden] (computed once per generation)."""
        positions, segment_ids = layers.default_positions_and_segments(inputs, positions, segment_ids)
        return self.encoder(self._embed(inputs), positions, segment_ids)

    def decoder_hidden_states(self, decoder_inputs: Array, encoded: Array, *, encoder_segment_ids: Array | None = None,
                              positions: Array | None = None, segment_ids: Array | None = None,
                              cache_size: int | None = None) -> Array:
        """decoder_inputs[B,T] + encoder output -> the decoder's final-normed hidden states [B,T,hidden].

        With a mutable "cache" (decoding) the tokens continue the cached ones; the first such call
        creates a cache of `cache_size` slots and the cross-attention keys/values of `encoded`.
        """
        positions, segment_ids = layers.default_positions_and_segments(decoder_inputs, positions, segment_ids)
        if encoder_segment_ids is None:
            encoder_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
        return self.decoder(self._embed(decoder_inputs), positions, segment_ids, encoded, encoder_segment_ids,
                            cache_size)

    def logits_from_hidden(self, x: Array) -> Array:
        """hidden[..., hidden] -> logits[..., vocab] (any number of tokens at a time)."""
        cfg = self.config
        if cfg.scale_decoder_outputs:
            x = x * jnp.asarray(cfg.hidden_size**-0.5, x.dtype)
        logits = self.embed.attend(x) if cfg.tie_word_embeddings else self.lm_head(x)
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))

    def decode(self, decoder_inputs: Array, encoded: Array, *, encoder_segment_ids: Array | None = None,
               cache_size: int | None = None) -> Array:
        """One decoding call with a KV cache (apply with mutable=["cache"]): the next tokens'
        logits [B,T,vocab]. The first call creates a `cache_size`-slot cache (see
        `decoder_hidden_states`); `jaxtune.generate` drives it."""
        hidden = self.decoder_hidden_states(decoder_inputs, encoded, encoder_segment_ids=encoder_segment_ids,
                                            cache_size=cache_size)
        return self.logits_from_hidden(hidden)

    def hidden_states(self, inputs: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                      decoder_inputs: Array | None = None, decoder_positions: Array | None = None,
                      decoder_segment_ids: Array | None = None) -> Array:
        """The decoder's final hidden states [B, T_dec, D] for both streams: what a loss runs the LM
        head on in token chunks (`logits_from_hidden`)."""
        _, segment_ids = layers.default_positions_and_segments(inputs, positions, segment_ids)
        encoded = self.encode(inputs, positions=positions, segment_ids=segment_ids)
        if decoder_inputs is None:
            decoder_inputs = jnp.full((inputs.shape[0], 1), self.config.decoder_start_token_id, jnp.int32)
        return self.decoder_hidden_states(decoder_inputs, encoded, encoder_segment_ids=segment_ids,
                                          positions=decoder_positions, segment_ids=decoder_segment_ids)

    def __call__(self, inputs: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                 decoder_inputs: Array | None = None, decoder_positions: Array | None = None,
                 decoder_segment_ids: Array | None = None) -> Array:
        return self.logits_from_hidden(self.hidden_states(
            inputs, positions=positions, segment_ids=segment_ids, decoder_inputs=decoder_inputs,
            decoder_positions=decoder_positions, decoder_segment_ids=decoder_segment_ids))


# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = MODEL_TYPES


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> T5Config:
    """T5Config from a T5/mT5 config.json.

    The output scale: `scale_decoder_outputs` when the file has it (transformers >= 5 writes it),
    else what transformers infers: T5 scales unless `tie_word_embeddings` is false (v1.1 files),
    mT5 never does. The head is tied unless `tie_word_embeddings` is false.
    """
    model_type = hf.get("model_type", "t5")
    tie = hf.get("tie_word_embeddings", True) is not False
    scale = hf.get("scale_decoder_outputs", tie if model_type == "t5" else False)
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["d_model"], intermediate_size=hf["d_ff"],
        num_layers=hf["num_layers"], num_heads=hf["num_heads"], head_dim=hf["d_kv"],
        num_decoder_layers=hf.get("num_decoder_layers"),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        rms_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=tie, scale_decoder_outputs=bool(scale),
        pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
        eos_token_id=_first(hf.get("eos_token_id", 1)),
        decoder_start_token_id=hf.get("decoder_start_token_id") if hf.get("decoder_start_token_id") is not None
        else (hf.get("pad_token_id") or 0),
        model_type=model_type,
    )
    if kw["num_decoder_layers"] == kw["num_layers"]:
        kw["num_decoder_layers"] = None
    kw.update(overrides)
    return T5Config(**kw)


def config_for_checkpoint(config: T5Config, tensor_names: frozenset[str]) -> T5Config:
    """Untied when the checkpoint holds its own `lm_head.weight`: transformers >= 5 writes
    `"tie_word_embeddings": true` into every T5/mT5 config.json (it ties unless the weights say
    otherwise), so a Flan-T5 or mT5 it re-saved says tied but carries a distinct head; a tied
    model's file has no lm_head tensor."""
    if config.tie_word_embeddings and "lm_head.weight" in tensor_names:
        return dataclasses.replace(config, tie_word_embeddings=False)
    return config


def _first(token_ids: int | list[int] | None) -> int:
    if isinstance(token_ids, list | tuple):
        return int(token_ids[0])
    return 1 if token_ids is None else int(token_ids)


def config_to_hf(config: T5Config) -> dict[str, Any]:
    """config.json content that transformers reads back to the same model (head, scale and all)."""
    return {
        "architectures": [_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.hidden_size,
        "d_ff": config.intermediate_size,
        "d_kv": config.head_dim,
        "num_layers": config.num_layers,
        "num_decoder_layers": config.resolved_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": config.feed_forward_proj,
        "layer_norm_epsilon": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.scale_decoder_outputs,
        "dropout_rate": 0.0,  # jaxtune trains T5 without dropout; the export says so
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "torch_dtype": config.param_dtype,
    }


def _block_maps(prefix: str, n: int, config: T5Config, sublayers: Mapping[str, tuple[int, str]]) -> list:
    """One stack's per-layer maps; `sublayers`: jaxtune attention name -> (HF layer index, HF module)."""
    h, d = config.num_heads, config.head_dim
    gated, _ = config.mlp_activation()
    ff = len(sublayers)  # the feed-forward sublayer comes after the attention ones

    def layer(path, name, transforms):
        return hf_mapping.layer_param(("layers", *path), f"{prefix}.block.{{i}}.layer.{name}", range(n), transforms)

    maps = []
    for ours, (index, theirs) in sublayers.items():
        norm = {"attn": "attn_norm", "cross_attn": "cross_norm"}[ours]
        maps.append(layer((norm, "scale"), f"{index}.layer_norm.weight", hf_mapping.identity()))
        for proj in ("q", "k", "v"):
            maps.append(layer((ours, proj, "kernel"), f"{index}.{theirs}.{proj}.weight", hf_mapping.split_out_heads(h, d)))
        maps.append(layer((ours, "o", "kernel"), f"{index}.{theirs}.o.weight", hf_mapping.split_in_heads(h, d)))
    maps.append(layer(("mlp_norm", "scale"), f"{ff}.layer_norm.weight", hf_mapping.identity()))
    for proj in ("wi_0", "wi_1", "wo") if gated else ("wi", "wo"):
        maps.append(layer(("mlp", proj, "kernel"), f"{ff}.DenseReluDense.{proj}.weight", hf_mapping.transpose()))
    return [dataclasses.replace(m, path=(prefix, *m.path)) for m in maps]


def hf_param_maps(config: T5Config) -> list[hf_mapping.ParamMap]:
    """Every jaxtune param with its HF tensor name(s) and layout change (see hf_mapping)."""
    maps = [hf_mapping.param(("embed", "embedding"), "shared.weight", hf_mapping.identity())]
    for stack, n, sublayers in (
        ("encoder", config.num_layers, {"attn": (0, "SelfAttention")}),
        ("decoder", config.resolved_decoder_layers, {"attn": (0, "SelfAttention"), "cross_attn": (1, "EncDecAttention")}),
    ):
        maps.append(hf_mapping.param((stack, "rel_bias"), f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                     hf_mapping.identity()))
        maps += _block_maps(stack, n, config, sublayers)
        maps.append(hf_mapping.param((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", hf_mapping.identity()))
    if not config.tie_word_embeddings:
        maps.append(hf_mapping.param(("lm_head", "kernel"), "lm_head.weight", hf_mapping.transpose()))
    return maps


def projection_names(config: T5Config) -> tuple[str, ...]:
    """The module names of the model's projections (HF's: each names the projection in the encoder's
    self-attention, the decoder's self- and cross-attention and both MLPs alike), gated MLP or not."""
    gated, _ = config.mlp_activation()
    return ("q", "k", "v", "o", *(("wi_0", "wi_1") if gated else ("wi",)), "wo")


def hf_unused_tensors(config: T5Config) -> frozenset[str]:
    """Tensors a T5 checkpoint may hold that the model reads elsewhere: the stacks' copies of the
    shared embedding, and a cross-attention bias table old checkpoints carry but T5 never uses."""
    del config
    return frozenset({"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                      "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"})
