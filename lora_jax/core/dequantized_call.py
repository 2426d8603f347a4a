"""A frozen quantized weight applied at the point of use: no dequantized copy outlives the call that reads it.

``dequantized_call(fn, weight, dequantize, x, bias)`` computes ``fn(x, dequantize(weight), bias)``
for a function ``fn`` that is affine in ``(x, bias)`` (a matmul, dot_general, einsum or conv, the
bias added or not). Plain autodiff would save ``dequantize(weight)`` for the backward pass (it
depends on no differentiated input, so linearization computes it once and keeps it): a model of L
quantized layers then holds L dequantized kernels at once, more than the fp32 base it replaces.
Here the call has its own VJP: it saves the quantized ``weight`` (codes and scales) and dequantizes
again for the input gradient. Each dequantization is also tied to the data flow (its input in the
forward pass, the incoming cotangent in the backward), so XLA cannot hoist all of them to the
start of the program, where they would again be alive together.

The weight gets no gradient (it is frozen); ``x`` and ``bias`` get theirs.

    >>> import jax, jax.numpy as jnp
    >>> from lora_jax.core.quant import quantize_int8, dequantize_int8
    >>> w = quantize_int8(jnp.arange(12.0).reshape(3, 4) - 6.0)
    >>> fn = lambda x, kernel, bias: x @ kernel + bias
    >>> x, bias = jnp.ones((2, 3)), jnp.zeros(4)
    >>> out = dequantized_call(fn, w, dequantize_int8, x, bias)
    >>> bool(jnp.allclose(out, fn(x, dequantize_int8(w), bias)))
    True
    >>> dx = jax.grad(lambda x: dequantized_call(fn, w, dequantize_int8, x, bias).sum())(x)
    >>> bool(jnp.allclose(dx, dequantize_int8(w).sum(1)))
    True
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@jax.custom_batching.custom_vmap
def tie_to(weight: Any, anchor: Array) -> Any:
    """``weight`` unchanged in value, but computed after ``anchor``: zero (built from one element of
    ``anchor``, finite or not) is added to each of its floating leaves (the scales).

    XLA runs work that reads only parameters as early as it likes; a dequantization whose scales
    read the layer's input (or the cotangent arriving at it) cannot run before that value exists.
    The codes need no tie as long as the dequantization applies the scales in the same fusion that
    decodes them (``core.quant`` does), so nothing code-only and kernel-sized can be hoisted. Under
    ``jax.vmap`` (an adapter bank's rows) a weight shared by the rows stays shared: the tie reads
    one element of the whole batch, so the kernel is dequantized once, not once per row.

    >>> from lora_jax.core.quant import quantize_int8
    >>> w = quantize_int8(jnp.ones((2, 2)))
    >>> tied = tie_to(w, jnp.array([jnp.nan, 1.0]))
    >>> bool((tied.scale == w.scale).all()) and bool((tied.data == w.data).all())
    True
    """
    return _tie(weight, anchor)


@tie_to.def_vmap
def _tie_batched(axis_size: int, in_batched: Any, weight: Any, anchor: Array) -> tuple[Any, Any]:
    return _tie(weight, anchor), in_batched[0]  # a shared weight stays shared


def _tie(weight: Any, anchor: Array) -> Any:
    first = jnp.reshape(anchor, (-1,))[0] if anchor.size else jnp.zeros((), jnp.float32)
    first = first.astype(jnp.float32) if jnp.issubdtype(first.dtype, jnp.number) else jnp.zeros((), jnp.float32)
    zero = jnp.where(jnp.isfinite(first), first, 0.0) * 0.0

    def tie(leaf: Array) -> Array:
        return leaf + zero.astype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(tie, weight)


def dequantized_call(fn: Callable[[Array, Array, Array | None], Array], weight: Any,
                     dequantize: Callable[[Any], Array], x: Array, bias: Array | None = None) -> Array:
    """``fn(x, dequantize(weight), bias)``, whose backward pass dequantizes ``weight`` again.

    Args:
      fn: ``(x, kernel, bias) -> y``, affine in ``(x, bias)`` for a fixed kernel (any layer's
        product with its weight: its VJP does not depend on the point it is taken at).
      weight: the quantized weight, a pytree of arrays (codes and scales); it gets no gradient.
      dequantize: ``weight -> kernel`` (e.g. ``lambda w: dequantize_nf4(w, jnp.bfloat16)``).
      x: the layer's input, float (…, in).
      bias: the layer's bias or None; passed to ``fn`` as it is.

    Returns:
      ``fn``'s output. Saved for the backward pass: ``weight`` only (``fn`` is affine, so the input
      gradient needs neither ``x`` nor ``bias``).
    """
    x_like = jax.ShapeDtypeStruct(x.shape, x.dtype)
    bias_like = None if bias is None else jax.ShapeDtypeStruct(bias.shape, bias.dtype)

    @jax.custom_vjp
    def call(x: Array, bias: Array | None, weight: Any) -> Array:
        return fn(x, dequantize(tie_to(weight, x)), bias)

    def forward(x, bias, weight):
        return call(x, bias, weight), weight

    def backward(weight, cotangent):
        kernel = dequantize(tie_to(weight, cotangent))
        zeros = lambda like: None if like is None else jnp.zeros(like.shape, like.dtype)
        _, pullback = jax.vjp(lambda x, bias: fn(x, kernel, bias), zeros(x_like), zeros(bias_like))
        dx, dbias = pullback(cotangent)
        return dx, dbias, jax.tree.map(_zero_cotangent, weight)

    call.defvjp(forward, backward)
    return call(x, bias, weight)


def _zero_cotangent(leaf: Array) -> Array:
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.zeros(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, jax.dtypes.float0)
