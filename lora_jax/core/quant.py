"""Weight quantization for a frozen base: int8 (per-output-channel absmax) and NF4 (4-bit NormalFloat,
block-wise absmax, double-quantized scales, two codes per byte), as pure functions on arrays.

NF4 (Dettmers et al. 2023, QLoRA): each block of 64 weights is scaled by its absmax into [-1, 1]
and each value stored as the index of the nearest of 16 code values (quantiles of a normal
distribution, with an exact zero); the block absmaxes are themselves quantized to int8 in blocks
of 256 after subtracting their mean ("double quantization").

    >>> import jax.numpy as jnp
    >>> w = jnp.linspace(-1.0, 1.0, 128).reshape(16, 8)
    >>> q = quantize_nf4(w)
    >>> q.data.dtype, q.data.size                     # 128 codes, two per byte
    (dtype('uint8'), 64)
    >>> float(jnp.abs(dequantize_nf4(q) - w).max()) <= 0.1522   # half the widest code gap (-1 to -0.696)
    True
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The 16 NF4 code values of the QLoRA paper (Appendix E; bitsandbytes' table).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """int8 codes (the weight's shape) and a float32 scale per output (1 on contracted axes)."""

    data: Array
    scale: Array


def quantize_int8(weight: Array, out_ndim: int = 1, *, axes: tuple[int, ...] | None = None) -> Int8Weight:
    """Per-output-channel absmax int8: ``scale = max|w| / 127`` over the contracted axes (the leading
    ``ndim - out_ndim``, or ``axes``).

    >>> q = quantize_int8(jnp.array([[1.0, -2.0], [-0.5, 4.0]]))
    >>> q.data.tolist(), q.scale.tolist()
    ([[127, -64], [-64, 127]], [[0.007874015718698502, 0.031496062874794006]])
    """
    w = jnp.asarray(weight, jnp.float32)
    axes = tuple(range(w.ndim - out_ndim)) if axes is None else tuple(axes)
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return Int8Weight(jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale)


def dequantize_int8(q: Int8Weight, dtype=jnp.float32) -> Array:
    """``codes · scale``."""
    return (q.data.astype(jnp.float32) * q.scale).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Nf4Weight:
    """NF4 codes packed two per byte, with double-quantized block absmaxes.

    Attributes:
      data: uint8, ceil(size / 2) bytes (the first code of a pair in the high nibble).
      scale_codes: int8, one per block of ``block`` weights: (absmax - scale_mean) / scale_scale.
      scale_scale: float32, one per group of ``scale_block`` block absmaxes.
      scale_mean: float32 scalar, the mean block absmax.
      shape, block, scale_block: static layout.
    """

    data: Array
    scale_codes: Array
    scale_scale: Array
    scale_mean: Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    block: int = dataclasses.field(default=64, metadata={"static": True})
    scale_block: int = dataclasses.field(default=256, metadata={"static": True})


def _blocks(flat: Array, size: int) -> Array:
    pad = (-flat.shape[0]) % size
    return jnp.pad(flat, (0, pad)).reshape(-1, size)


def pack_nibbles(codes: Array) -> Array:
    """4-bit codes (uint8 values 0..15) -> bytes, two per byte, the first in the high nibble.

    >>> pack_nibbles(jnp.array([1, 2, 15], jnp.uint8)).tolist()
    [18, 240]
    """
    codes = jnp.asarray(codes, jnp.uint8)
    if codes.shape[0] % 2:
        codes = jnp.pad(codes, (0, 1))
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Array, size: int) -> Array:
    """Inverse of ``pack_nibbles``: the first ``size`` codes."""
    return jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:size]


def quantize_nf4(weight: Array, block: int = 64, scale_block: int = 256) -> Nf4Weight:
    """NF4 with block-wise absmax (``block`` weights per scale) and double-quantized scales."""
    w = jnp.asarray(weight, jnp.float32)
    blocks = _blocks(w.reshape(-1), block)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normalized = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    code = jnp.asarray(NF4_CODE)
    codes = jnp.argmin(jnp.abs(normalized[..., None] - code), axis=-1).astype(jnp.uint8).reshape(-1)[: w.size]
    mean = jnp.mean(absmax)
    groups = _blocks(absmax - mean, scale_block)
    group_max = jnp.max(jnp.abs(groups), axis=1)
    group_scale = jnp.where(group_max > 0, group_max / 127.0, 1.0)
    scale_codes = jnp.clip(jnp.round(groups / group_scale[:, None]), -127, 127).astype(jnp.int8).reshape(-1)
    return Nf4Weight(pack_nibbles(codes), scale_codes[: absmax.shape[0]], group_scale, mean, tuple(w.shape), block,
                     scale_block)


def dequantize_nf4(q: Nf4Weight, dtype=jnp.float32) -> Array:
    """The weight back from its codes and double-quantized scales; a stack of layers quantized one by
    one (``quantize_stacked``) comes back as a stack, whatever number of its leading axes remain."""
    if q.data.ndim > 1:  # leading axes of a stack of layers
        return jax.vmap(lambda one: dequantize_nf4(one, dtype))(q)
    size = math.prod(q.shape)
    n_blocks = q.scale_codes.shape[0]
    group = jnp.repeat(q.scale_scale, q.scale_block)[:n_blocks]
    absmax = q.scale_codes.astype(jnp.float32) * group + q.scale_mean
    if size % q.block == 0 and q.block % 2 == 0:  # whole blocks of whole bytes: one fused elementwise pass
        pairs, scale = q.data.reshape(n_blocks, q.block // 2), absmax[:, None]
        values = jnp.stack([nf4_values(pairs >> 4) * scale, nf4_values(pairs & 15) * scale], axis=-1)
        return values.reshape(q.shape).astype(dtype)
    codes = unpack_nibbles(q.data, size)
    values = _blocks(nf4_values(codes), q.block) * absmax[:, None]
    return values.reshape(-1)[:size].reshape(q.shape).astype(dtype)


def nf4_values(codes: Array) -> Array:
    """The NF4 code values of 4-bit codes (uint8 0..15), as float32.

    A tree of 15 selects on the code's bits rather than a gather from the table: it vectorizes and
    fuses with the scaling that follows (a gather does neither on CPU).

    >>> nf4_values(jnp.array([0, 7, 15], jnp.uint8)).tolist()
    [-1.0, 0.0, 1.0]
    """
    level = [jnp.float32(v) for v in NF4_CODE]
    for bit in range(4):
        on = ((codes >> bit) & 1).astype(bool)
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def quantize_stacked(quantize_one, weight: Array, n_stacked: int, **options) -> Int8Weight | Nf4Weight:
    """``quantize_one`` applied to each layer of a stack (``n_stacked`` leading axes, e.g. from
    ``nn.scan`` or ``nnx.vmap``): every leaf gains those leading axes, so a scan over the stack
    slices a quantized layer as it slices a plain kernel.

    >>> q = quantize_stacked(quantize_nf4, jnp.ones((3, 16, 8)), 1)
    >>> q.data.shape, q.shape, dequantize_nf4(q).shape
    ((3, 64), (16, 8), (3, 16, 8))
    """
    fn = lambda w: quantize_one(w, **options)
    for _ in range(n_stacked):
        fn = jax.vmap(fn)
    return fn(weight)
