"""Per layer kind: the shapes of lora_A / lora_B, the weight update A·B, and the low-rank product.

Pure functions on arrays, no flax: the linen front end (``lora_jax.linen``) and any other front
end call these. ``r`` is the rank; a leading stacked axis (from ``nn.scan``) is allowed in
``delta``.

=================  ==============================  ===============================  =========
layer              lora_A                          lora_B                           base leaf
=================  ==============================  ===============================  =========
dense              (in, r)                         (r, out)                         kernel
dense_general      (prod(in_shape), r)             (r, prod(features))              kernel
conv               kernel_size + (in, r)           (1,) * n_spatial + (r, out)      kernel
embed              (num_embeddings, r)             (r, features)                    embedding
einsum             kernel shape, out axes -> 1,    kernel shape, in axes -> 1,      kernel
                   + (r,)                          + (r,)
=================  ==============================  ===============================  =========

Every layout but einsum's gives the weight update as ``A @ B`` reshaped to the base leaf; einsum's
"broadcast" layout (``A.ndim == kernel.ndim + 1``) gives it as ``sum_r A[..., r] * B[..., r]``,
which keeps any order of contracted and output axes in the kernel.

    >>> import jax.numpy as jnp
    >>> shapes = dense_shapes((6, 4), rank=2)
    >>> shapes.a, shapes.b
    ((6, 2), (2, 4))
    >>> delta(jnp.ones(shapes.a), jnp.ones(shapes.b), (6, 4)).shape
    (6, 4)
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
MATRIX, BROADCAST, CONV = "matrix", "broadcast", "conv"  # how lora_A / lora_B hold a layer's update


@dataclasses.dataclass(frozen=True)
class Kind:
    """One layer kind: what it holds and how its factors are laid out.

    Attributes:
      name: 'dense' | 'dense_general' | 'einsum' | 'conv' | 'embed'.
      base_leaf: the frozen weight's leaf name ('kernel', an Embed's 'embedding').
      layout: MATRIX (A (in, r) @ B (r, out), reshaped to the weight), BROADCAST (einsum: A and B
        keep the kernel's axes, size one where the other factor's axes are, rank last) or CONV
        (A (spatial..., in, r), B (1, ..., 1, r, out)).
      peft_module: the torch module PEFT adapts for it ('Linear', 'Embedding', 'Conv').
      lookup_table: whether A is read by ids (rows initialised from a normal distribution).
    """

    name: str
    base_leaf: str
    layout: str
    peft_module: str
    lookup_table: bool = False


KIND = {k.name: k for k in (Kind("dense", "kernel", MATRIX, "Linear"),
                            Kind("dense_general", "kernel", MATRIX, "Linear"),
                            Kind("einsum", "kernel", BROADCAST, "Linear"),
                            Kind("conv", "kernel", CONV, "Conv"),
                            Kind("embed", "embedding", MATRIX, "Embedding", lookup_table=True))}
KINDS = tuple(KIND)
BASE_LEAVES = tuple(dict.fromkeys(k.base_leaf for k in KIND.values()))  # the weights an adapted layer may hold


def base_leaf_name(kind: str) -> str:
    """The name of the weight a layer of ``kind`` holds: an Embed's ``embedding``, else ``kernel``.

    >>> base_leaf_name("embed"), base_leaf_name("conv")
    ('embedding', 'kernel')
    """
    if kind not in KIND:
        raise ValueError(f"unknown layer kind {kind!r}; the kinds are {KINDS}")
    return KIND[kind].base_leaf


def factor_layout(a_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str:
    """The layout (MATRIX | BROADCAST) stored factors hold an update in, read off the factors: the
    one place a tree function tells them apart. The layouts are made to be told apart: BROADCAST
    factors carry every axis of the weight plus the rank axis; MATRIX and CONV factors (CONV's
    update is A·B like MATRIX's) carry at most the weight's axes.

    >>> factor_layout((4, 1, 1, 2), (4, 3, 5)), factor_layout((6, 2), (6, 4))
    ('broadcast', 'matrix')
    """
    return BROADCAST if len(a_shape) == len(weight_shape) + 1 else MATRIX


@dataclasses.dataclass(frozen=True)
class FactorShapes:
    """The factor shapes of one adapted layer.

    Attributes:
      a: lora_A's shape.
      b: lora_B's shape.
      fan_in: inputs feeding one output (A's kaiming bound is 1/sqrt(fan_in)).
      n_in: the flattened contracted size of the kernel (the rank may not exceed min(n_in, n_out)).
      n_out: the flattened output size of the kernel.
      out_ndim: how many trailing kernel axes are output axes (einsum: its output axes, in order).
    """

    a: tuple[int, ...]
    b: tuple[int, ...]
    fan_in: int
    n_in: int
    n_out: int
    out_ndim: int


def check_rank(rank: int, n_in: int, n_out: int, where: str) -> None:
    """Raise ValueError if ``rank`` exceeds min(n_in, n_out) of the layer named ``where``."""
    if rank > min(n_in, n_out):
        raise ValueError(
            f"LoRA rank {rank} exceeds min(in, out) = min({n_in}, {n_out}) at layer '{where}'; "
            f"a low-rank update cannot have a larger rank than the weight it adapts"
        )


def dense_shapes(kernel_shape: tuple[int, ...], rank: int) -> FactorShapes:
    """Dense kernel (in, out): A (in, r), B (r, out).

    >>> dense_shapes((8, 3), 2).a
    (8, 2)
    """
    n_in, n_out = kernel_shape
    return FactorShapes((n_in, rank), (rank, n_out), n_in, n_in, n_out, 1)


def dense_general_shapes(kernel_shape: tuple[int, ...], n_in_axes: int, rank: int) -> FactorShapes:
    """DenseGeneral kernel (in_shape + features): A (prod(in_shape), r), B (r, prod(features)).

    >>> dense_general_shapes((2, 3, 4, 5), n_in_axes=2, rank=2).b
    (2, 20)
    """
    n_in = math.prod(kernel_shape[:n_in_axes])
    n_out = math.prod(kernel_shape[n_in_axes:])
    return FactorShapes((n_in, rank), (rank, n_out), n_in, n_in, n_out, len(kernel_shape) - n_in_axes)


def conv_shapes(kernel_shape: tuple[int, ...], rank: int) -> FactorShapes:
    """Conv kernel (spatial..., in, out): A is a conv into r channels with the base's geometry
    (spatial..., in, r); B is a 1×…×1 conv (1,..., r, out).

    >>> conv_shapes((3, 3, 4, 8), 2).a, conv_shapes((3, 3, 4, 8), 2).b
    ((3, 3, 4, 2), (1, 1, 2, 8))
    """
    spatial, (n_in, n_out) = tuple(kernel_shape[:-2]), kernel_shape[-2:]
    fan_in = math.prod(spatial) * n_in
    return FactorShapes(spatial + (n_in, rank), (1,) * len(spatial) + (rank, n_out), fan_in, fan_in, n_out, 1)


def embed_shapes(table_shape: tuple[int, ...], rank: int) -> FactorShapes:
    """Embedding table (vocab, features): A (vocab, r), a lookup table; B (r, features).

    >>> embed_shapes((100, 16), 4).a
    (100, 4)
    """
    n_in, n_out = table_shape
    return FactorShapes((n_in, rank), (rank, n_out), n_in, n_in, n_out, 1)


@dataclasses.dataclass(frozen=True)
class EinsumAxes:
    """An ``'x,kernel->out'`` einsum spec split into its parts.

    Attributes:
      lhs, rhs, out: the input's, the kernel's and the output's letters.
      in_axes: kernel axes contracted with the input.
      out_axes: kernel axes that appear in the output.
    """

    lhs: str
    rhs: str
    out: str
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]


def parse_einsum(spec: str, where: str) -> EinsumAxes:
    """Split an explicit ``'x,kernel->out'`` spec; NotImplementedError names ``where`` for the
    forms LoRA cannot adapt ('...', more than two operands, kernel axes that are also batch axes).

    >>> parse_einsum("btd,dhk->bthk", "attn").out_axes
    (1, 2)
    """
    compact = spec.replace(" ", "")
    if "..." in compact or compact.count(",") != 1 or "->" not in compact:
        raise NotImplementedError(f"LoRA on nn.Einsum needs an explicit 'x,kernel->out' spec without '...' "
                                  f"(layer '{where}' has {spec!r})")
    lhs, rest = compact.split(",")
    rhs, out = rest.split("->")
    in_axes = tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
    out_axes = tuple(i for i, c in enumerate(rhs) if c in out and c not in lhs)
    if len(in_axes) + len(out_axes) != len(rhs):
        raise NotImplementedError(f"LoRA on nn.Einsum '{spec}' at '{where}': kernel axes that are both batch and "
                                  f"weight axes are not supported")
    return EinsumAxes(lhs, rhs, out, in_axes, out_axes)


def einsum_shapes(kernel_shape: tuple[int, ...], axes: EinsumAxes, rank: int) -> FactorShapes:
    """Einsum kernel: A keeps the kernel's shape with output axes set to 1, B with contracted axes
    set to 1, each with a trailing rank axis.

    >>> einsum_shapes((4, 2, 3), parse_einsum("bd,dhk->bhk", "x"), 2).a
    (4, 1, 1, 2)
    """
    n_in = math.prod(kernel_shape[i] for i in axes.in_axes)
    n_out = math.prod(kernel_shape[i] for i in axes.out_axes)
    a = tuple(1 if i in axes.out_axes else d for i, d in enumerate(kernel_shape)) + (rank,)
    b = tuple(1 if i in axes.in_axes else d for i, d in enumerate(kernel_shape)) + (rank,)
    return FactorShapes(a, b, n_in, n_in, n_out, len(axes.out_axes))


# --------------------------------------------------------------------------- sharding names


AxisNames = tuple  # one mesh-axis name (or None) per array axis


def _flattened_name(names: tuple) -> Any:
    """The name of axes flattened in C order: the outermost axis's name if no other axis is named
    (its blocks stay contiguous), else None (replicated)."""
    if not names or any(n is not None for n in names[1:]):
        return None
    return names[0]


def factor_axis_names(kind: str, kernel_names: AxisNames, shapes: FactorShapes,
                      einsum_axes: EinsumAxes | None = None) -> tuple[AxisNames, AxisNames, AxisNames]:
    """Sharding names of (lora_A, lora_B, a per-output magnitude) from the base weight's names: A
    keeps the weight's input-axis names, B its output-axis names, the rank axis is replicated.

    >>> factor_axis_names("dense", ("embed", "mlp"), dense_shapes((8, 16), 2))
    (('embed', None), (None, 'mlp'), (None, 'mlp'))
    """
    names = tuple(kernel_names)
    if kind == "einsum":
        assert einsum_axes is not None
        a = tuple(None if i in einsum_axes.out_axes else n for i, n in enumerate(names)) + (None,)
        b = tuple(None if i in einsum_axes.in_axes else n for i, n in enumerate(names)) + (None,)
        return a, b, tuple(None if i in einsum_axes.in_axes else n for i, n in enumerate(names))
    n_in = len(names) - shapes.out_ndim
    magnitude = (None,) * n_in + names[n_in:]
    if kind == "conv":
        return names[:-1] + (None,), (None,) * (len(names) - 1) + names[-1:], magnitude
    return ((_flattened_name(names[:n_in]), None), (None, _flattened_name(names[n_in:])), magnitude)


# --------------------------------------------------------------------------- the weight update


def delta(lora_a: Array, lora_b: Array, shape: tuple[int, ...]) -> Array:
    """The dense weight update A·B in the base leaf's ``shape`` (unscaled).

    ``A (..., in, r) @ B (..., r, out)`` reshaped to ``shape``, or for einsum's broadcast layout
    (``A.ndim == len(shape) + 1``) ``sum_r A[..., r] * B[..., r]``.

    >>> delta(jnp.ones((3, 1)), jnp.full((1, 2), 2.0), (3, 2)).tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    if factor_layout(lora_a.shape, shape) == BROADCAST:
        return _broadcast_delta(lora_a, lora_b, shape)
    return jnp.matmul(lora_a, lora_b).reshape(shape)


def _broadcast_delta(lora_a: Array, lora_b: Array, shape: tuple[int, ...]) -> Array:
    letters = iter(string.ascii_letters)
    rank_letter = next(letters)
    a_spec, b_spec, out_spec = [], [], []
    for a_dim, b_dim, dim in zip(lora_a.shape[:-1], lora_b.shape[:-1], shape):
        shared = next(letters)
        out_spec.append(shared)
        if a_dim == dim and b_dim == dim:  # stacked axis, or an axis of size one
            a_spec.append(shared)
            b_spec.append(shared)
        elif a_dim == dim:
            a_spec.append(shared)
            b_spec.append(next(letters))
        else:
            a_spec.append(next(letters))
            b_spec.append(shared)
    spec = f"{''.join(a_spec)}{rank_letter},{''.join(b_spec)}{rank_letter}->{''.join(out_spec)}"
    return jnp.einsum(spec, lora_a, lora_b)


# --------------------------------------------------------------------------- low-rank products


def accumulation_dtype(dtype: Any) -> Any:
    """The dtype products of ``dtype`` inputs accumulate in: float32 for bf16 / fp16, else ``dtype``.

    >>> accumulation_dtype(jnp.bfloat16)
    <class 'jax.numpy.float32'>
    """
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def low_rank_matmul(x: Array, a: Array, b: Array, dtype: Any, precision: Any = None) -> Array:
    """``(x @ A) @ B``: x (..., in), A (in, r), B (r, out) -> (..., out), inputs cast to ``dtype``,
    accumulated in ``accumulation_dtype(dtype)``.

    >>> low_rank_matmul(jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 4)), jnp.float32).shape
    (2, 4)
    """
    acc = accumulation_dtype(dtype)
    h = jnp.matmul(x.astype(dtype), a.astype(dtype), precision=precision, preferred_element_type=acc)
    return jnp.matmul(h.astype(dtype), b.astype(dtype), precision=precision, preferred_element_type=acc)


def low_rank_dense_general(x: Array, a: Array, b: Array, axes: tuple[int, ...], out_shape: tuple[int, ...],
                           dtype: Any, precision: Any = None) -> Array:
    """DenseGeneral's update: x's ``axes`` flattened and contracted with A (n_in, r), B (r, n_out)
    reshaped to ``out_shape``; x (batch..., in...) -> (batch..., *out_shape).

    >>> low_rank_dense_general(jnp.ones((5, 2, 3)), jnp.ones((6, 1)), jnp.ones((1, 8)), (1, 2), (2, 4),
    ...                        jnp.float32).shape
    (5, 2, 4)
    """
    moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    batch_shape = moved.shape[: x.ndim - len(axes)]
    flat = moved.reshape(batch_shape + (a.shape[0],))
    return low_rank_matmul(flat, a, b, dtype, precision).reshape(batch_shape + tuple(out_shape))


def low_rank_einsum(x: Array, a: Array, b: Array, kernel_shape: tuple[int, ...], axes: EinsumAxes,
                    dtype: Any, precision: Any = None) -> Array:
    """Einsum's update: ``einsum(axes, x, A·B)`` computed through the rank axis, without forming A·B.

    >>> ax = parse_einsum("bd,dk->bk", "x")
    >>> low_rank_einsum(jnp.ones((2, 3)), jnp.ones((3, 1, 1)), jnp.ones((1, 4, 1)), (3, 4), ax, jnp.float32).shape
    (2, 4)
    """
    rank = a.shape[-1]
    free = iter(c for c in string.ascii_letters if c not in axes.lhs + axes.rhs + axes.out)
    rank_letter = next(free)
    a_in = a.reshape([kernel_shape[i] for i in axes.in_axes] + [rank]).astype(dtype)
    b_out = jnp.moveaxis(b.reshape([kernel_shape[i] for i in axes.out_axes] + [rank]), -1, 0).astype(dtype)
    in_letters = "".join(axes.rhs[i] for i in axes.in_axes)
    out_letters = "".join(axes.rhs[i] for i in axes.out_axes)
    hidden = "".join(c for c in axes.lhs if c not in in_letters) + rank_letter
    h = jnp.einsum(f"{axes.lhs},{in_letters}{rank_letter}->{hidden}", x.astype(dtype), a_in, precision=precision)
    return jnp.einsum(f"{hidden},{rank_letter}{out_letters}->{axes.out}", h, b_out, precision=precision)


def low_rank_conv(x: Array, a: Array, b: Array, conv: Callable[[Array, Array], Array], precision: Any = None) -> Array:
    """Conv's update: ``conv(x, A)`` (the base layer's own geometry, into r channels) then the 1×…×1
    conv B as a matmul over channels; x (batch, spatial..., in) -> (batch, spatial'..., out).

    >>> import jax
    >>> same = lambda x, k: jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    >>> low_rank_conv(jnp.ones((1, 5, 2)), jnp.ones((3, 2, 1)), jnp.ones((1, 1, 4)), same).shape
    (1, 5, 4)
    """
    h = conv(x, a)
    rank, n_out = b.shape[-2:]
    return jnp.matmul(h, b.reshape(rank, n_out).astype(h.dtype), precision=precision)


def low_rank_embed(ids: Array, a: Array, b: Array, dtype: Any) -> Array:
    """Embed's update: rows of A (vocab, r) looked up by ``ids``, times B (r, features).

    >>> low_rank_embed(jnp.array([0, 2]), jnp.eye(3, 1), jnp.ones((1, 4)), jnp.float32).shape
    (2, 4)
    """
    return jnp.matmul(jnp.take(a, ids, axis=0).astype(dtype), b.astype(dtype))


def low_rank_attend(query: Array, a: Array, b: Array, dtype: Any) -> Array:
    """The update of a tied embedding's ``attend``: query (..., features) @ (A·B).T -> (..., vocab).

    >>> low_rank_attend(jnp.ones((2, 4)), jnp.ones((10, 1)), jnp.ones((1, 4)), jnp.float32).shape
    (2, 10)
    """
    h = jnp.matmul(query.astype(dtype), b.astype(dtype).T)
    return jnp.matmul(h, a.astype(dtype).T)
