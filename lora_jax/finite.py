"""Finiteness of param trees: one jittable flag for a train step, and the named leaves for an error.

A diverged adapter (inf or NaN in a factor) computes NaN for every input it touches; these checks
let the train step report it and the save / load / export paths refuse it by name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool array: every floating leaf of ``tree`` is free of inf and NaN (jittable; one
    reduction per leaf, fused by XLA into the step that produced the leaves).

    >>> import numpy as np
    >>> bool(all_finite({"a": np.ones(3), "b": {"c": np.array([1.0, np.nan])}}))
    False
    """
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.asarray(True)


def nonfinite_leaves(tree: Any) -> list[str]:
    """The '/'-joined paths of the floating leaves of ``tree`` holding inf or NaN (read on the host).

    >>> import numpy as np
    >>> nonfinite_leaves({"fc": {"lora_A": np.ones((2, 1)), "lora_B": np.full((1, 2), np.inf)}})
    ['fc/lora_B']
    """
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if not bool(jnp.isfinite(leaf).all()):
            bad.append(jax.tree_util.keystr(path, simple=True, separator="/"))
    return bad
