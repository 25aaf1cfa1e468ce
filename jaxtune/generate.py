"""KV-cache sampling: one jitted prefill + decode loop per (batch, prompt length) bucket.

Encoder-decoder models (T5) take the prompts as encoder inputs, computed once, and decode from
their start token with a decoder self-attention cache plus cross-attention keys/values computed
on the first step.

Prompts are left-padded into a [B, P] buffer (padding is segment 0, real tokens segment 1 with
positions 0..len-1, which is what Hugging Face derives from its attention mask), so every row's
next token is read from the last column and all rows share one cache write index. The cache is
the model's own "cache" variable collection (layers.Attention), preallocated to P + max_new_tokens
and constrained with logical axis names, so it shards like the model's activations.

Shapes are bucketed to powers of two (batch, prompt length), so a stream of prompts compiles a
handful of times, not once per shape. Stop tokens end a row on device (later slots are padding
and the loop exits when every row is done); stop strings are applied on the host to the decoded
text (`decode_completion`), so generation itself still runs to a stop token or the token limit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import distributed, sharding
from jaxtune.errors import UserError

MIN_PROMPT_BUCKET = 8


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def batch_multiple() -> int:
    """Rows must split evenly over the data-parallel mesh axes when a mesh is active (jax.set_mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape)


def as_variables(params: Any) -> dict:
    """A params tree, or a variables dict such as {"params": base, "lora": adapters}."""
    if isinstance(params, Mapping) and "params" in params:
        return {k: v for k, v in params.items() if k != "cache"}
    return {"params": params}


def sample_tokens(
    logits: jax.Array, rng: jax.Array, *, temperature: jax.Array | float = 1.0, top_k: int | None = None,
    top_p: jax.Array | float | None = None, greedy: bool = False,
) -> jax.Array:
    """Next tokens [B] from logits [B, V] (float32 math).

    greedy: argmax. Otherwise logits / temperature, then top-k (keep the k largest), then top-p
    (nucleus: the smallest prefix of the sorted distribution whose mass reaches p; the most
    likely token is always kept, and ties at the cut-off are kept), then a categorical draw.
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = mass_before < top_p
        keep = keep.at[..., 0].set(True)
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(model, variables: Mapping, batch: int, length: int) -> Any:
    """A zero KV cache for `batch` rows of up to `length` tokens (shapes from an abstract init)."""
    dummy = jnp.zeros((batch, length), jnp.int32)
    abstract = jax.eval_shape(lambda v: model.apply(v, dummy, mutable=["cache"])[1]["cache"], dict(variables))
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sharding.unbox(abstract))


class ByRepr:
    """A static jit argument for a Flax module whose config holds dicts (rope_scaling): modules with
    the same repr are the same computation, so they share one compiled loop."""

    def __init__(self, module):
        self.module, self._key = module, repr(module)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, ByRepr) and other._key == self._key


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "top_k", "use_top_p", "pad_id"),
)
def _sample_loop(
    model, variables, tokens, segment_ids, positions, lengths, stop_tokens, rng, temperature, top_p, *,
    max_new_tokens: int, greedy: bool, top_k: int | None, use_top_p: bool, pad_id: int,
):
    """Prefill the [B, P] prompts, then decode one token per step; returns [B, max_new_tokens].

    A decoder-only model continues its prompts in one KV cache. An encoder-decoder model (T5:
    `is_encoder_decoder`) encodes the prompts once, then its decoder starts from the start token;
    the decoder's first call creates its self-attention cache and the cross-attention keys and
    values of the encoder output, which every later step reuses.
    """
    model = model.module
    batch, prompt_len = tokens.shape
    sample = functools.partial(
        sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None, greedy=greedy,
    )

    if getattr(model, "is_encoder_decoder", False):
        encoded = model.apply(variables, tokens, positions=positions, segment_ids=segment_ids, method="encode")

        def step(cache, token, i):
            cached = {} if cache is None else {"cache": cache}
            logits, mutated = model.apply(
                {**variables, **cached}, token[:, None], encoded, encoder_segment_ids=segment_ids,
                cache_size=max_new_tokens, mutable=["cache"], method="decode")
            return logits[:, -1], mutated["cache"]

        start = jnp.full((batch,), model.config.decoder_start_token_id, jnp.int32)
        last, cache = step(None, start, 0)
    else:
        def step(cache, token, i):
            pos = (lengths + i - 1)[:, None]
            logits, mutated = model.apply({**variables, "cache": cache}, token[:, None], positions=pos,
                                          segment_ids=jnp.ones_like(pos), mutable=["cache"])
            return logits[:, -1], mutated["cache"]

        cache = init_cache(model, variables, batch, prompt_len + max_new_tokens)
        logits, mutated = model.apply({**variables, "cache": cache}, tokens, positions=positions,
                                      segment_ids=segment_ids, mutable=["cache"])
        last, cache = logits[:, -1], mutated["cache"]

    def is_stop(token):
        return jnp.any(token[:, None] == stop_tokens[None, :], axis=-1)

    first = sample(last, jax.random.fold_in(rng, 0))
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, out, done = carry
        last, cache = step(cache, token, i)
        token = jnp.where(done, pad_id, sample(last, jax.random.fold_in(rng, i)))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, token, cache, out, done | is_stop(token)

    carry = (jnp.int32(1), first, cache, out, is_stop(first))
    return jax.lax.while_loop(cond, body, carry)[3]


def left_pad(prompts: Sequence[Sequence[int]], rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """tokens/segment_ids/positions [rows, length] with each prompt right-aligned; spare rows repeat row 0."""
    out = {k: np.zeros((rows, length), np.int32) for k in ("tokens", "segment_ids", "positions")}
    out["tokens"][:] = pad_id
    for row in range(rows):
        prompt = prompts[row] if row < len(prompts) else prompts[0]
        n = len(prompt)
        out["tokens"][row, length - n:] = prompt
        out["segment_ids"][row, length - n:] = 1
        out["positions"][row, length - n:] = np.arange(n)
    return out


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    if getattr(getattr(model, "config", None), "num_labels", None):
        raise UserError("generate: this model is a reward model (a score head, no LM head) and cannot generate; "
                        "score texts with jaxtune.reward_fn(workdir)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"generate: prompt {i} is empty; every prompt needs at least one token")
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"generate: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"generate: top_p must be in (0, 1], got {top_p}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if limit and longest > limit:
        raise UserError(
            f"generate: the longest prompt plus max_new_tokens is {longest} tokens, beyond the model's "
            f"max_position_embeddings ({limit})"
        )


def generate(
    model,
    params,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    batch_size: int = 64,
    keep_stop: bool = False,
) -> list[list[int]]:
    """Continuations of each prompt (prompt excluded; cut before, and excluding, the first stop token;
    `keep_stop` keeps that stop token, so RL rollouts train the model to stop).

    `params`: the params tree or a variables dict ({"params": ..., "lora": ...}). temperature 0 is
    greedy. Prompts are processed in chunks of `batch_size` rows. Sampling is seeded per chunk
    and step (`seed`), so a given call is reproducible.
    """
    prompts = [list(map(int, p)) for p in prompt_tokens]
    if not prompts:
        return []
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p)
    variables = as_variables(params)
    greedy = temperature == 0.0 or top_k == 1
    stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    outputs: list[list[int]] = []
    for chunk_index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        multiple = batch_multiple()
        rows = -(-bucket(len(chunk)) // multiple) * multiple
        batch = left_pad(chunk, rows, bucket(max(len(p) for p in chunk), MIN_PROMPT_BUCKET), pad_id)
        lengths = np.array([len(chunk[r]) if r < len(chunk) else len(chunk[0]) for r in range(rows)], np.int32)
        new = _sample_loop(
            ByRepr(model), variables, batch["tokens"], batch["segment_ids"], batch["positions"], lengths, stops,
            jax.random.fold_in(jax.random.key(seed), chunk_index), jnp.float32(temperature or 1.0),
            jnp.float32(top_p or 1.0), max_new_tokens=max_new_tokens, greedy=greedy,
            top_k=None if greedy else top_k, use_top_p=top_p is not None and not greedy, pad_id=pad_id,
        )
        for row in distributed.to_host(new)[: len(chunk)].tolist():
            cut = next((i + int(keep_stop) for i, t in enumerate(row) if t in stop_tokens), len(row))
            outputs.append(row[:cut])
    return outputs


def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


def decode_completion(decode: Callable[[list[int]], str], tokens: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
    """Generated tokens -> text, cut at the first stop string (checked on the host after generation)."""
    return truncate_at_stop_strings(decode(list(tokens)), stop_strings)
