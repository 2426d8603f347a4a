"""Initialisers of lora_A (lora_B always starts at zero, so an adapter starts as the identity).

Each returns ``init(key, shape, dtype) -> array``, the signature flax's ``param`` expects.

    >>> import jax
    >>> init = a_initializer("kaiming_uniform", fan_in=16, rank=4)
    >>> float(abs(init(jax.random.key(0), (16, 4))).max()) <= 0.25
    True
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]


def kaiming_uniform(fan_in: int) -> Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PEFT's ``kaiming_uniform_(a=sqrt(5))`` for lora_A."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def gaussian(std: float) -> Initializer:
    """N(0, std²)."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return std * jax.random.normal(key, shape, dtype)

    return init


def a_initializer(mode: str, fan_in: int, rank: int, lookup_table: bool = False) -> Initializer:
    """lora_A's initialiser for ``LoraConfig.init`` ``mode`` ('kaiming_uniform' | 'gaussian').

    ``lookup_table`` (an Embed's A, read by row) draws N(0, 1) whatever the mode, as PEFT does;
    'gaussian' is N(0, 1/r²) (PEFT's ``init_lora_weights='gaussian'``).
    """
    if lookup_table:
        return gaussian(1.0)
    if mode == "gaussian":
        def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
            return jax.random.normal(key, shape, dtype) / rank

        return init
    if mode in ("kaiming_uniform", "pissa"):  # PiSSA's factors are then set from the weight (core.variants)
        return kaiming_uniform(fan_in)
    raise ValueError(f"unknown lora_A init {mode!r}: use 'kaiming_uniform' or 'gaussian'")
