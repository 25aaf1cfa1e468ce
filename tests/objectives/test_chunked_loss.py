"""The chunked LM head (jaxtune/logprobs.py) gives the full path's losses, gradients and eval
scores, and a compiled train step's temporaries stop scaling with batch x seq_len x vocab."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxtune import config as config_lib
from jaxtune import evaluate, logprobs, models, objectives, trainer, validation
from jaxtune.errors import UserError
from jaxtune.objectives import head_token_stats, token_stats
from jaxtune.peft import base as peft_base
from jaxtune.peft import wrapper

CHUNK = 5  # does not divide the sequence lengths below: the last chunk is padded
TIGHT = dict(rtol=2e-5, atol=2e-6)


def _batch(rows, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    segments = np.ones((rows, length), np.int32)
    segments[0, length // 2:] = 2  # a packed row
    segments[-1, -3:] = 0  # padding
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    positions[0, length // 2:] -= length // 2
    return {"inputs": rng.integers(0, vocab, (rows, length)).astype(np.int32),
            "targets": rng.integers(0, vocab, (rows, length)).astype(np.int32),
            "loss_mask": (rng.random((rows, length)) > 0.3).astype(np.int32) * (segments > 0),
            "positions": positions, "segment_ids": segments}


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TIGHT)


def test_head_token_stats_equal_full_logits_and_gradients():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 11, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 37)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 37, (3, 11)))
    head = lambda h, w: 30.0 * jnp.tanh((h @ w) / 30.0)

    def summary(h, w, chunk):  # every output, weighted, so one gradient covers them all
        s = head_token_stats(lambda x: head(x, w), h, targets, chunk=chunk) if chunk else token_stats(head(h, w), targets)
        return jnp.sum(s.logp * 0.7 + jnp.square(s.log_z) * 0.01), s

    @jax.jit  # one compile for every chunk size
    def all_chunks(hidden, w):
        return {c: jax.value_and_grad(summary, argnums=(0, 1), has_aux=True)(hidden, w, c) for c in (0, 1, 4, 11, 64)}

    out = all_chunks(hidden, w)
    for chunk in (1, 4, 11, 64):
        jax.tree.map(_close, out[chunk], out[0])


def test_hand_written_head_backward_equals_autodiff():
    """head_token_stats_handwritten's backward = autodiff's (head_token_stats, the default), chunked and
    not, for a head with a trained and a frozen weight and a temperature."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.float32)
    w, frozen = (jnp.asarray(rng.normal(size=(8, 23)), jnp.float32) for _ in range(2))
    targets = jnp.asarray(rng.integers(0, 23, (2, 9)))

    def summary(stats_fn, h, w, chunk):
        head = logprobs.with_temperature(lambda x: x @ (w + jax.lax.stop_gradient(frozen)), 0.7)
        s = stats_fn(head, h, targets, chunk=chunk)
        return jnp.sum(s.logp * 0.3 - s.log_z * 0.2), s

    @jax.jit
    def both(hidden, w):
        grad = lambda fn, c: jax.value_and_grad(summary, argnums=(1, 2), has_aux=True)(fn, hidden, w, c)
        return {c: (grad(logprobs.head_token_stats_handwritten, c), grad(head_token_stats, c)) for c in (0, 4, 9)}

    for new, old in both(hidden, w).values():
        jax.tree.map(_close, new, old)


def test_sft_with_z_loss_and_dpo_chunked_equal_full():
    """A LoRA Gemma 2 (tied embeddings, final soft-cap): SFT with z-loss on rows, and DPO on pairs with
    the base model as reference (policy and reference both chunked); one compile for both."""
    spec = peft_base.Spec("lora", rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    config = models.get_config("gemma2", "tiny", num_layers=1)
    model = wrapper.wrap(models.build(config), spec)
    rows = _batch(4, 13, config.vocab_size)
    pairs = {k: v.reshape(2, 2, -1) for k, v in rows.items()}
    variables = jax.jit(model.init)(jax.random.key(0), rows["inputs"])
    adapters = jax.tree.map(lambda x: x + 0.05, variables[peft_base.COLLECTION])  # non-zero B: policy != reference
    sft_config = config_lib.base_config()
    sft_config.train.z_loss = 1e-2
    dpo_config = config_lib.base_config()
    dpo_config.objective.type, dpo_config.peft.method = "dpo", "lora"  # reference: the base without adapters
    sft, dpo = objectives.build(sft_config), objectives.build(dpo_config)
    assert dpo.reference_kind() == "base"
    fns = {}
    for c in (0, CHUNK):
        apply_fn = trainer.make_apply_fn(model, logits_chunk=c)
        fns[c] = (trainer.make_loss_fn(sft, apply_fn), trainer.make_loss_fn(dpo, apply_fn))

    @jax.jit
    def both(adapters, base):
        grad = lambda fn, batch, n: jax.value_and_grad(lambda a: fn(a, batch, n, frozen=base), has_aux=True)(adapters)
        return {c: (grad(sft, rows, 30.0), grad(pref, pairs, 2.0)) for c, (sft, pref) in fns.items()}

    out = both(adapters, variables["params"])
    (_, sft_metrics), _ = out[0][0]
    (_, dpo_metrics), _ = out[0][1]
    assert float(sft_metrics["z_loss"]) > 0 and float(dpo_metrics["rewards/margins"]) != 0.0
    jax.tree.map(_close, out[CHUNK], out[0])


def test_eval_log_likelihoods_chunked_equal_full():
    config = models.get_config("llama", "tiny", num_layers=1)  # untied lm_head
    model = models.build(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    pairs = [([1, 2, 3], [4, 5]), ([7] * 9, [8, 9, 10, 11]), ([3], [2] * 12)]
    full = evaluate.score_continuations(model, params, pairs, seq_len=17, batch_size=2, logits_chunk=0)
    chunked = evaluate.score_continuations(model, params, pairs, seq_len=17, batch_size=2, logits_chunk=CHUNK)
    jax.tree.map(_close, chunked, full)
    np.testing.assert_array_equal(chunked[1], [2, 4, 12])


def _train_step_temp_bytes(vocab: int, *, batch: int, seq_len: int, chunk: int) -> int:
    """Temporary bytes of the compiled (not run) SFT train step of a one-layer tied-embedding model."""
    config = models.get_config("llama", "tiny", vocab_size=vocab, num_layers=1, tie_word_embeddings=True)
    model = models.build(config)
    tx = optax.sgd(1e-3)
    sft_config = config_lib.base_config()
    sft_config.train.z_loss = 1e-4
    step = trainer.make_train_step(objectives.build(sft_config), trainer.make_apply_fn(model, logits_chunk=chunk), tx,
                                   optax.constant_schedule(1e-3), accum=1)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"])
    state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                               opt_state=jax.eval_shape(tx.init, params))
    rows = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32) for k in _batch(1, 2, 2)}
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, rows).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_train_step_temporaries_do_not_grow_with_vocab_beyond_a_chunk():
    batch, seq_len, chunk, small, large = 4, 512, 32, 1024, 8192
    growth = (_train_step_temp_bytes(large, batch=batch, seq_len=seq_len, chunk=chunk)
              - _train_step_temp_bytes(small, batch=batch, seq_len=seq_len, chunk=chunk))
    one_chunk = batch * chunk * (large - small) * 4  # float32 logits of one chunk, extra vocab only
    full_logits = batch * seq_len * (large - small) * 4
    # The recomputed chunk logits and their gradient (measured: ~1.8 chunks); the whole-sequence
    # logits would be 16 chunks.
    assert growth <= 2.5 * one_chunk < full_logits / 6, (growth, one_chunk, full_logits)


def test_logits_chunk_is_validated():
    config = config_lib.base_config()
    config.data.train_path = "train.jsonl"  # not read by validate
    config.train.logits_chunk = 0
    validation.validate(config)  # 0 = unchunked is valid
    config.train.logits_chunk = -1
    with pytest.raises(UserError, match="train.logits_chunk"):
        validation.validate(config)


def test_token_stats_at_a_temperature_are_those_of_the_scaled_logits():
    """GRPO's learner scores rollouts under the distribution they were sampled from: softmax(logits / T),
    chunked or from full logits (temperature 1 is the plain path)."""
    config = models.get_config("llama", "tiny", num_layers=1)
    model = models.build(config)
    rows = _batch(3, 13, config.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), rows["inputs"])["params"]
    logits = model.apply({"params": params}, rows["inputs"], positions=rows["positions"], segment_ids=rows["segment_ids"])
    full = trainer.model_fns(lambda p, tokens, positions, segment_ids, frozen=None, rngs=None: model.apply(
        {"params": p}, tokens, positions=positions, segment_ids=segment_ids))
    for temperature in (0.7, 1.0, 1.5):
        want = token_stats(logits / temperature, rows["targets"])
        for fns in (trainer.make_apply_fn(model, logits_chunk=CHUNK), full):
            got = fns.token_stats(params, rows, temperature=temperature)
            _close(got.logp, want.logp)
            _close(got.log_z, want.log_z)
