"""Fast dropout: one random byte per element, four elements per 32-bit random word.

``jax.random.bernoulli`` draws a 32-bit uniform float per element and compares it; on CPU that is
most of the cost of dropout. Here each element gets one random byte (a uint32 word bit-cast to four
uint8 lanes) and is kept where the byte is below ``k``, so the keep probability is ``k / 256`` with
``k = round(256 · (1 − rate))``, and kept values are scaled by exactly ``256 / k``: the expectation
``E[dropout(x)] = x`` holds exactly, while the drop rate is quantised (rate 0.1 drops 26/256 =
0.1016 of the elements). A rate that 8 bits cannot express within 1/512 (below about 0.002, or
above 0.998) uses 16-bit lanes (k / 65536) instead.

    y = dropout(x, 0.1, key)             # same key, same mask; rate 0 or key None: x itself
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def keep_threshold(rate: float) -> tuple[int, int]:
    """(bits per element, k): an element is kept where its random ``bits``-bit lane is below ``k``
    (rate 0: ``(8, 256)``, every element kept)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}")
    if rate == 0.0:
        return 8, 256
    keep = 1.0 - rate
    for bits in (8, 16):
        k = round(keep * 2 ** bits)
        if 0 < k < 2 ** bits and abs(k / 2 ** bits - keep) <= 1 / 512:
            return bits, k
    return 16, min(max(round(keep * 65536), 1), 65535)


def keep_probability(rate: float) -> float:
    """The exact probability that ``dropout`` keeps an element: ``k / 2**bits``."""
    bits, k = keep_threshold(rate)
    return k / 2 ** bits


def keep_mask(key: Array, shape: tuple[int, ...], rate: float) -> Array:
    """Bool mask of ``shape``: True with probability ``keep_probability(rate)``, independently per element."""
    bits, k = keep_threshold(rate)
    if k == 2 ** bits:
        return jnp.ones(shape, bool)
    lane_type = jnp.uint8 if bits == 8 else jnp.uint16
    per_word = 32 // bits
    n = math.prod(shape)
    if shape and shape[-1] % per_word == 0:  # no padding: the lanes reshape straight to ``shape``
        words = jax.random.bits(key, tuple(shape[:-1]) + (shape[-1] // per_word,), jnp.uint32)
        lanes = lax.bitcast_convert_type(words, lane_type).reshape(shape)
    else:
        words = jax.random.bits(key, (-(-n // per_word),), jnp.uint32)
        lanes = lax.bitcast_convert_type(words, lane_type).reshape(-1)[:n].reshape(shape)
    return lanes < jnp.asarray(k, lane_type)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Zero each element of ``x`` with probability ~``rate`` and scale the rest so that E[out] = x.

    Args:
      x: any array (float).
      rate: drop probability in [0, 1); quantised as described in the module docstring.
      key: a PRNG key; ``None`` (evaluation) or ``rate == 0`` returns ``x`` unchanged.

    Example::

        h = dropout(h, 0.1, jax.random.key(0))   # (batch, seq, hidden) -> same shape
    """
    if key is None or rate == 0.0:
        return x
    bits, k = keep_threshold(rate)
    keep = keep_mask(key, x.shape, rate)
    scale = jnp.asarray(2 ** bits / k, x.dtype)
    return lax.select(keep, x * scale, jnp.zeros_like(x))
