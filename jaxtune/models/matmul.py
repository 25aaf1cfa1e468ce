"""Matmuls with a backward pass laid out for XLA:CPU (same forward, same maths as autodiff).

XLA:CPU's matmul wants the contracted axis of its left operand last and the right operand as
[K, N]; an operand in any other layout is physically transposed first, in a loop fusion that
runs far below memory speed. Autodiff's weight / right-operand gradient dot(dy, x) puts the
output gradient on the left, contracted over its leading (token) axis, so XLA transposed every
output gradient, including [B, K, G, T, S] attention probabilities (~30% of the backward on the
CPU benchmark shape, benchmarks/RESULTS.md). Here the smaller of the two operands is the one
that gets transposed. GPU and TPU matmuls take either order natively, so this costs nothing
there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _contract_smaller(x: Array, dy: Array, batch: tuple[int, ...], rows: tuple[int, ...], preferred=None) -> Array:
    """x^T . dy over `rows` (batch dims `batch` kept in front): [*batch, *x_rest, *dy_rest],
    computed with whichever of x and dy is smaller as the (transposed) left operand."""
    x_rest = x.ndim - len(batch) - len(rows)
    dy_rest = dy.ndim - len(batch) - len(rows)
    dims = ((rows, rows), (batch, batch))
    if math.prod(dy.shape) < math.prod(x.shape):
        out = jax.lax.dot_general(dy, x, dims, preferred_element_type=preferred)  # [*batch, *dy_rest, *x_rest]
        nb = len(batch)
        return jnp.transpose(out, (*range(nb), *range(nb + dy_rest, nb + dy_rest + x_rest), *range(nb, nb + dy_rest)))
    return jax.lax.dot_general(x, dy, dims, preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: Array, kernel: Array, n_in: int) -> Array:
    """x[..., *in] . kernel[*in, *out] -> [..., *out] (x's trailing n_in axes contracted);
    the forward is exactly `jnp.tensordot`."""
    return jnp.tensordot(x, kernel, axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))


def _linear_fwd(x, kernel, n_in):
    return linear(x, kernel, n_in), (x, kernel)


def _linear_bwd(n_in, residuals, dy):
    x, kernel = residuals
    n_out = kernel.ndim - n_in
    dx = jnp.tensordot(dy, kernel, axes=(tuple(range(dy.ndim - n_out, dy.ndim)), tuple(range(n_in, kernel.ndim))))
    dkernel = _contract_smaller(x, dy, (), tuple(range(x.ndim - n_in)))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bmm(a: Array, b: Array, preferred_element_type=None) -> Array:
    """Batched matmul a[..., M, K] . b[..., K, N] -> [..., M, N] (equal leading batch dims)."""
    nb = a.ndim - 2
    batch = tuple(range(nb))
    return jax.lax.dot_general(a, b, (((nb + 1,), (nb,)), (batch, batch)), preferred_element_type=preferred_element_type)


def _bmm_fwd(a, b, preferred_element_type):
    return bmm(a, b, preferred_element_type), (a, b)


def _bmm_bwd(preferred_element_type, residuals, dy):
    a, b = residuals
    nb = a.ndim - 2
    batch = tuple(range(nb))
    dy = dy.astype(a.dtype)  # one operand dtype per matmul (a no-op for float32 models)
    # da = dy . b^T: dy [M, N] is already canonical; b, contracted over its last axis, is transposed.
    da = jax.lax.dot_general(dy, b, (((nb + 1,), (nb + 1,)), (batch, batch)), preferred_element_type=jnp.float32)
    db = _contract_smaller(a, dy, batch, (nb,), preferred=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


bmm.defvjp(_bmm_fwd, _bmm_bwd)
