"""matmul.linear / matmul.bmm: same values and gradients as plain autodiff, whichever operand
the backward transposes (x or dy smaller), in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import matmul


def _grads(fn, *args):
    return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32))), tuple(range(len(args))))(*args)


@pytest.mark.parametrize("x_shape,k_shape,n_in", [
    ((2, 5, 6), (6, 3), 1),  # dy smaller than x: dy is transposed
    ((2, 5, 6), (6, 30), 1),  # x smaller
    ((2, 5, 2, 3), (2, 3, 4), 2),  # o_proj-like: two contracted axes
    ((2, 5, 4), (4, 2, 3), 1),  # q_proj-like: two output axes
])
def test_linear_matches_tensordot(x_shape, k_shape, n_in):
    kx, kk = jax.random.split(jax.random.key(0))
    x, k = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
    plain = lambda x, k: jnp.tensordot(x, k, axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
    np.testing.assert_array_equal(matmul.linear(x, k, n_in), plain(x, k))
    for got, want in zip(_grads(lambda x, k: matmul.linear(x, k, n_in), x, k), _grads(plain, x, k)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3, 5, 7), (2, 3, 7, 4)), ((2, 3, 50, 7), (2, 3, 7, 4)),
                                             ((2, 3, 5, 7), (2, 3, 7, 40))])
def test_bmm_matches_einsum(a_shape, b_shape):
    ka, kb = jax.random.split(jax.random.key(1))
    a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
    plain = lambda a, b: jnp.einsum("...mk,...kn->...mn", a, b)
    np.testing.assert_allclose(matmul.bmm(a, b, None), plain(a, b), rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(lambda a, b: matmul.bmm(a, b, None), a, b), _grads(plain, a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_keeps_dtypes():
    ka, kb = jax.random.split(jax.random.key(2))
    a = jax.random.normal(ka, (2, 8, 16), jnp.bfloat16)
    b = jax.random.normal(kb, (2, 16, 4), jnp.bfloat16)
    assert matmul.bmm(a, b, jnp.float32).dtype == jnp.float32
    da, db = _grads(lambda a, b: matmul.bmm(a, b, jnp.float32), a, b)
    assert da.dtype == db.dtype == jnp.bfloat16
    ref = _grads(lambda a, b: jnp.einsum("bmk,bkn->bmn", a.astype(jnp.float32), b.astype(jnp.float32)), a, b)
    for got, want in zip((da, db), ref):
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)
    dx, dk = _grads(lambda x, k: matmul.linear(x, k, 1), a, b[0])
    assert dx.dtype == dk.dtype == jnp.bfloat16
