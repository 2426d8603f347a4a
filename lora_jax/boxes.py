"""Boxed param leaves (flax ``AxisMetadata``): sharding boxes are unboxed for training, while a box
that stores its value in another form (a quantized kernel) stays boxed and places its own leaves.

A box stays boxed when its class sets ``stays_boxed = True``; such a box offers
``leaf_shardings(sharding)``: a tree like itself of shardings for its leaves, from the sharding the
value it stands for would have, and ``apply(fn, x)``: ``fn(x, value, None)`` with the value formed
at the point of use only. Train code and parameter targets read only this protocol, never the
quantizer.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> unbox_but_stored({"w": nn.Partitioned(jnp.ones(2), names=("model",))})["w"].shape
    (2,)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec, Sharding


def stays_boxed(leaf: Any) -> bool:
    """Whether ``leaf`` is a box that keeps its stored form through training (``stays_boxed``)."""
    return isinstance(leaf, meta.AxisMetadata) and bool(getattr(leaf, "stays_boxed", False))


def unbox_but_stored(tree: Any) -> Any:
    """Unbox sharding boxes (``nn.Partitioned``); keep boxes that stay boxed (quantized kernels stay small)."""
    def unbox(x: Any) -> Any:
        return x.unbox() if isinstance(x, meta.AxisMetadata) and not stays_boxed(x) else x

    return jax.tree.map(unbox, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def replicated_like(sharding: Sharding) -> Sharding:
    """The fully replicated sharding over the devices of ``sharding``."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    return NamedSharding(jax.sharding.Mesh(devices, ("devices",)), PartitionSpec())
