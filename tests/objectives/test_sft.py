import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.objectives import sft_loss, token_logprobs


def _reference_ce(logits, targets, mask):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return -(picked * mask).sum() / mask.sum()


def test_matches_reference_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 7))
    mask = (rng.random((3, 7)) > 0.3).astype(np.int32)
    loss, metrics = sft_loss(jnp.asarray(logits), {"targets": targets, "loss_mask": mask}, normalizer=mask.sum())
    assert float(loss) == pytest.approx(_reference_ce(logits, targets, mask), rel=1e-5)
    assert int(metrics["trained_tokens"]) == mask.sum()
    acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
    assert float(metrics["accuracy"]) == pytest.approx(acc)


def test_bf16_logits_are_upcast():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 13)), jnp.bfloat16)
    logp, log_z = token_logprobs(logits, jnp.zeros((2, 5), jnp.int32))
    assert logp.dtype == jnp.float32 and log_z.dtype == jnp.float32


def test_split_batches_sum_to_global_mean():
    """Micro-batches normalised by the global count add up to the full-batch loss (accumulation-exact)."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 6, 9)), jnp.float32)
    targets = rng.integers(0, 9, size=(4, 6))
    mask = np.zeros((4, 6), np.int32)
    mask[0, :1] = 1
    mask[1:, 2:] = 1  # very different trained-token counts per row
    batch = {"targets": targets, "loss_mask": mask}
    full, _ = sft_loss(logits, batch, normalizer=mask.sum())
    parts = sum(
        float(sft_loss(logits[i : i + 2], {"targets": targets[i : i + 2], "loss_mask": mask[i : i + 2]}, normalizer=mask.sum())[0])
        for i in (0, 2)
    )
    assert parts == pytest.approx(float(full), rel=1e-6)


def test_masked_tokens_have_no_gradient():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 5)), jnp.float32)
    mask = np.array([[0, 1, 0, 1]])
    grads = jax.grad(lambda x: sft_loss(x, {"targets": np.zeros((1, 4), int), "loss_mask": mask}, normalizer=2)[0])(logits)
    assert np.allclose(grads[0, 0], 0) and np.allclose(grads[0, 2], 0)
    assert not np.allclose(grads[0, 1], 0)


def test_z_loss_adds_log_z_squared():
    logits = jnp.full((1, 2, 3), 2.0)
    mask = np.ones((1, 2), np.int32)
    batch = {"targets": np.zeros((1, 2), int), "loss_mask": mask}
    base, _ = sft_loss(logits, batch, normalizer=2)
    with_z, metrics = sft_loss(logits, batch, normalizer=2, z_loss=1e-2)
    log_z = 2.0 + np.log(3.0)
    assert float(metrics["z_loss"]) == pytest.approx(log_z**2, rel=1e-5)
    assert float(with_z - base) == pytest.approx(1e-2 * log_z**2, rel=1e-5)
