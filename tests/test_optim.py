import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxtune import optim
from jaxtune.config import base_config


def _cfg(**kw):
    c = base_config().optim
    c.update(kw)
    return c


def test_decay_mask_skips_norms_biases_embeddings():
    params = {
        "embed": {"embedding": jnp.zeros((4, 2))},
        "layers": {"attn_norm": {"scale": jnp.zeros(2)}, "attn": {"q_proj": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}},
        "lm_head": {"kernel": jnp.zeros((2, 4))},
    }
    mask = optim.decay_mask(params)
    assert mask["layers"]["attn"]["q_proj"]["kernel"] and mask["lm_head"]["kernel"]
    assert not mask["embed"]["embedding"] and not mask["layers"]["attn_norm"]["scale"]
    assert not mask["layers"]["attn"]["q_proj"]["bias"]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay(kind):
    lr = optim.schedule(_cfg(lr=1e-3, warmup_steps=10, schedule=kind, min_lr_ratio=0.1), total_steps=100)
    assert float(lr(0)) == pytest.approx(1e-4)
    assert float(lr(9)) == pytest.approx(1e-3)
    assert float(lr(10)) == pytest.approx(1e-3)
    end = float(lr(100))
    assert end == pytest.approx(1e-3 if kind == "constant" else 1e-4, rel=1e-3)
    values = [float(lr(s)) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))


def test_weight_decay_only_touches_masked_leaves():
    tx, _ = optim.build(_cfg(lr=0.1, weight_decay=0.5, warmup_steps=0, clip_norm=0.0, schedule="constant"), 10)
    params = {"embed": {"embedding": jnp.ones((2, 2))}, "w": {"kernel": jnp.ones((2, 2))}}
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, state, params)
    assert np.allclose(updates["embed"]["embedding"], 0.0)
    assert np.allclose(updates["w"]["kernel"], -0.1 * 0.5)


def test_gradients_are_clipped_to_global_norm():
    tx, _ = optim.build(_cfg(lr=1.0, weight_decay=0.0, warmup_steps=0, clip_norm=1.0, schedule="constant", b1=0.5), 10)
    params = {"w": {"kernel": jnp.zeros(3)}}
    grads = {"w": {"kernel": jnp.array([300.0, 400.0, 0.0])}}
    _, state = tx.update(grads, tx.init(params), params)
    adam_state = state[1][0]  # chain(clip, adamw): adamw's scale_by_adam state
    mu = np.asarray(adam_state.mu["w"]["kernel"])
    assert np.allclose(mu, 0.5 * np.array([0.6, 0.8, 0.0]), atol=1e-6)  # (1 - b1) * clipped gradient


def test_trainable_mask_freezes_and_allocates_no_state():
    tx, _ = optim.build(_cfg(lr=0.1, warmup_steps=0), 10, trainable={"a": True, "b": False})
    params = {"a": jnp.ones(1000), "b": jnp.ones(1000)}
    state = tx.init(params)
    state_elements = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size"))
    assert state_elements < 2 * 1000 + 10  # Adam moments for "a" only
    updates, _ = tx.update({"a": jnp.ones(1000), "b": jnp.ones(1000)}, state, params)
    assert np.allclose(updates["b"], 0.0) and not np.allclose(updates["a"], 0.0)
