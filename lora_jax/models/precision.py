"""Mixed precision for the models: matmuls take bfloat16 (or float16) inputs and give float32 results.

``mixed_dot_general(jnp.bfloat16)`` is a ``dot_general`` for ``flax.linen.Dense(dot_general=...)``:
the forward multiplies bf16 inputs with float32 accumulation and output, and its backward does the
same for the activation gradient (XLA's own transpose would multiply the float32 cotangent with an
upcast float32 kernel, doubling the cost of the backward matmuls). Weight gradients, when the kernel
trains, are float32 too. LayerNorm, softmax, the residual stream and LoRA factors stay float32.

    dense = nn.Dense(768, dtype=jnp.bfloat16, dot_general=mixed_dot_general(jnp.bfloat16))
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _contract_last(ndim: int) -> tuple:
    return (((ndim - 1,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_matmul(x: jax.Array, w: jax.Array, compute: Any) -> jax.Array:
    return lax.dot_general(x.astype(compute), w.astype(compute), _contract_last(x.ndim),
                           preferred_element_type=jnp.float32)


def _dense_matmul_fwd(x, w, compute):
    xc, wc = x.astype(compute), w.astype(compute)
    y = lax.dot_general(xc, wc, _contract_last(x.ndim), preferred_element_type=jnp.float32)
    return y, (xc, wc, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _dense_matmul_bwd(compute, residuals, g):
    xc, wc, x_like, w_like = residuals
    gc = g.astype(compute)
    # dx[..., i] = sum_o g[..., o] w[i, o];  dw[i, o] = sum_batch x[..., i] g[..., o]
    dx = lax.dot_general(gc, wc, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    batch_axes = tuple(range(g.ndim - 1))
    dw = lax.dot_general(xc, gc, ((batch_axes, batch_axes), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)  # dw is dead code (removed by XLA) for a frozen kernel


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def mixed_dot_general(compute: Any) -> Callable[..., jax.Array] | None:
    """A ``dot_general`` computing in ``compute`` with float32 results, or None (flax's default) for float32."""
    if jnp.dtype(compute) == jnp.float32:
        return None

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if dimension_numbers == _contract_last(lhs.ndim) and rhs.ndim == 2:
            return _dense_matmul(lhs, rhs, compute)
        return lax.dot_general(lhs.astype(compute), rhs.astype(compute), dimension_numbers, precision=precision,
                               preferred_element_type=jnp.float32)

    return dot_general
