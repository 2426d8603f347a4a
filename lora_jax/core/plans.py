"""One plan per layer kind: what a front end reads off a layer, and how a call of it is adapted.

A front end (linen, NNX) reads a layer's own attributes into a ``LayerReading`` (its kind, weight,
compute dtype, precision, contracted axes, einsum spec, its conv code) and ``plan_call`` turns that
into a ``core.forward.Plan``: the factor shapes, the low-rank product and the input through the
frozen weight (DoRA's base term). The compute-dtype rule, the base terms, DenseGeneral's axes and
the conv re-run are written here once for every front end.

    >>> import jax.numpy as jnp
    >>> reading = LayerReading("dense", jnp.ones((6, 4)))
    >>> plan = plan_call(reading, rank=2, where="fc")
    >>> plan.shapes.a, plan.update(jnp.ones((3, 6)), jnp.ones((6, 2)), jnp.ones((2, 4))).shape
    ((6, 2), (3, 4))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import kinds
from .forward import Plan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerReading:
    """A layer's own attributes, read by a front end, framework-free.

    Attributes:
      kind: 'dense' | 'dense_general' | 'einsum' | 'conv' | 'embed' (``kinds.KINDS``).
      weight: one layer's frozen weight (kernel or embedding table; a stacked module's one layer).
      dtype: the layer's compute dtype; None promotes the input's and the weight's dtypes.
      precision: the layer's matmul precision.
      axis: dense_general: the input axes contracted with the kernel's leading axes (may be negative).
      einsum_spec: einsum: the ``'x,kernel->out'`` spec of this call.
      conv: conv: ``(x, kernel) -> y``, the layer's own conv code (padding, strides, dilation) on
        another kernel, without bias.
      batch_axes: dense_general: whether the layer has batch axes (``batch_dims`` / ``batch_axis``).
      grouped: conv: whether the layer has feature groups or a kernel mask.
    """

    kind: str
    weight: Array
    dtype: Any = None
    precision: Any = None
    axis: tuple[int, ...] | int = -1
    einsum_spec: str | None = None
    conv: Callable[[Array, Array], Array] | None = None
    batch_axes: bool = False
    grouped: bool = False


def einsum_spec_of_call(rest: tuple, kwargs: dict, layer_spec: str | None) -> str | None:
    """The spec an Einsum call uses: its ``einsum_str`` argument (second positional or keyword),
    else the layer's own.

    >>> einsum_spec_of_call((), {"einsum_str": "ab,bc->ac"}, "x,y->z"), einsum_spec_of_call((), {}, "x,y->z")
    ('ab,bc->ac', 'x,y->z')
    """
    return kwargs.get("einsum_str") or (rest[0] if rest else None) or layer_spec


def compute_dtype(reading: LayerReading, x: Array) -> Any:
    """The dtype the layer computes in: its own ``dtype``, else the promotion of input and weight."""
    return jnp.result_type(x, reading.weight) if reading.dtype is None else reading.dtype


def plan_call(reading: LayerReading, rank: int, where: str, method: str = "__call__") -> Plan:
    """The ``Plan`` of one call of the layer ``where`` (``method``: '__call__', or an Embed's 'attend').

    NotImplementedError names the layer for forms LoRA cannot adapt (DenseGeneral batch axes,
    grouped or masked conv, einsum specs with '...').
    """
    if reading.kind not in kinds.KINDS:
        raise ValueError(f"unknown layer kind {reading.kind!r} at '{where}'; the kinds are {kinds.KINDS}")
    return _PLANNERS[reading.kind](reading, rank, where, method)


def _dense(reading: LayerReading, rank: int, where: str, method: str) -> Plan:
    weight, precision = reading.weight, reading.precision

    def update(x, a, b):
        return kinds.low_rank_matmul(x, a, b, compute_dtype(reading, x), precision)

    def base_term(x):
        dtype = compute_dtype(reading, x)
        return jnp.matmul(x.astype(dtype), weight.astype(dtype), precision=precision)

    return Plan(kinds.dense_shapes(tuple(weight.shape), rank), update, base_term)


def _dense_general(reading: LayerReading, rank: int, where: str, method: str) -> Plan:
    if reading.batch_axes:
        raise NotImplementedError(f"LoRA on a DenseGeneral / LinearGeneral layer with batch axes is not supported "
                                  f"(layer '{where}')")
    weight, precision = reading.weight, reading.precision
    axis = reading.axis if isinstance(reading.axis, (tuple, list)) else (reading.axis,)
    n_in = len(axis)
    out_shape = tuple(weight.shape[n_in:])

    def contracted(x: Array) -> tuple[int, ...]:
        return tuple(ax % x.ndim for ax in axis)

    def update(x, a, b):
        return kinds.low_rank_dense_general(x, a, b, contracted(x), out_shape, compute_dtype(reading, x), precision)

    def base_term(x):
        dtype = compute_dtype(reading, x)
        dims = ((contracted(x), tuple(range(n_in))), ((), ()))
        return jax.lax.dot_general(x.astype(dtype), weight.astype(dtype), dims, precision=precision)

    return Plan(kinds.dense_general_shapes(tuple(weight.shape), n_in, rank), update, base_term)


def _einsum(reading: LayerReading, rank: int, where: str, method: str) -> Plan:
    weight, precision = reading.weight, reading.precision
    shape = tuple(weight.shape)
    axes = kinds.parse_einsum(reading.einsum_spec or "", where)

    def update(x, a, b):
        return kinds.low_rank_einsum(x, a, b, shape, axes, compute_dtype(reading, x), precision)

    return Plan(kinds.einsum_shapes(shape, axes, rank), update, None, einsum_axes=axes, layout=kinds.BROADCAST)


def _conv(reading: LayerReading, rank: int, where: str, method: str) -> Plan:
    if reading.grouped:
        raise NotImplementedError(f"LoRA on a grouped or masked Conv layer is not supported (layer '{where}')")
    weight, conv = reading.weight, reading.conv
    assert conv is not None, "a conv reading carries the layer's conv code"

    def update(x, a, b):
        return kinds.low_rank_conv(x, a, b, conv, reading.precision)

    return Plan(kinds.conv_shapes(tuple(weight.shape), rank), update, lambda x: conv(x, weight), layout=kinds.CONV)


def _embed(reading: LayerReading, rank: int, where: str, method: str) -> Plan:
    weight = reading.weight
    dtype = reading.dtype or weight.dtype
    shapes = kinds.embed_shapes(tuple(weight.shape), rank)
    if method == "attend":  # a tied output embedding: query @ (table + A·B).T
        return Plan(shapes, lambda query, a, b: kinds.low_rank_attend(query, a, b, dtype), None)
    # no LoRA dropout on ids: the base term (the looked-up rows) is the layer's own output
    return Plan(shapes, lambda ids, a, b: kinds.low_rank_embed(ids, a, b, dtype),
                lambda ids: jnp.take(weight, ids, axis=0), uses_dropout=False)


_PLANNERS: dict[str, Callable[[LayerReading, int, str, str], Plan]] = {
    "dense": _dense, "dense_general": _dense_general, "einsum": _einsum, "conv": _conv, "embed": _embed}
