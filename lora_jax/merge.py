"""merge / unmerge: fold a LoRA update into the base weights and back, as pure functions.

Both are jittable with the config static: ``jax.jit(merge, static_argnums=1)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import traverse_util

from .config import LoraConfig
from .layers import weight_delta
from .masking import LORA_LEAVES, NO_LORA_LEAVES
from .targets import path_str

Params = Mapping[str, Any]
_BASE_LEAVES = ("kernel", "embedding")


def _modules_with_lora(flat: dict) -> list[tuple[str, ...]]:
    return sorted({k[:-1] for k in flat if k[-1] == "lora_A"})


def base_leaf_key(flat: dict, module: tuple[str, ...]) -> tuple[str, ...]:
    """The key of the weight a LoRA pair adapts at ``module`` (its kernel, or an Embed's embedding)."""
    for name in _BASE_LEAVES:
        if module + (name,) in flat:
            return module + (name,)
    raise ValueError(f"LoRA leaves at '{path_str(module)}' have no kernel or embedding to adapt there")


def _scaled_delta(a, b, weight, config: LoraConfig):
    delta = weight_delta(a.astype(jnp.float32), b.astype(jnp.float32), weight.shape)
    return config.scale_for(a.shape[-1]) * delta  # the layer's own rank (rank_pattern)


def merge(params: Params, config: LoraConfig) -> dict:
    """W' = W + scale · A·B for every adapted layer, LoRA leaves removed.

    The result is a param tree the *untransformed* model accepts, so inference costs nothing extra.
    """
    flat = traverse_util.flatten_dict(dict(params))
    modules = _modules_with_lora(flat)
    if not modules:
        raise ValueError(f"merge: {NO_LORA_LEAVES} (already merged params need no merge)")
    for module in modules:
        key = base_leaf_key(flat, module)
        a, b = flat.pop(module + ("lora_A",)), flat.pop(module + ("lora_B",))
        w = flat[key]
        flat[key] = (w.astype(jnp.float32) + _scaled_delta(a, b, w, config)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def unmerge(params: Params, adapter: Params, config: LoraConfig) -> dict:
    """Inverse of ``merge``: W = W' - scale · A·B, with ``adapter``'s lora_A / lora_B put back.

    ``adapter`` may be a full LoRA param tree or just its trainable part; only its LoRA leaves are
    used (other trained leaves, e.g. a head, are already in ``params`` and stay as they are).
    """
    flat = traverse_util.flatten_dict(dict(params))
    flat_adapter = {k: v for k, v in traverse_util.flatten_dict(dict(adapter)).items() if k[-1] in LORA_LEAVES}
    modules = _modules_with_lora(flat_adapter)
    if not modules:
        raise ValueError("unmerge: the adapter holds no lora_A/lora_B leaves to subtract")
    for module in modules:
        if module + ("lora_A",) in flat:
            raise ValueError(f"module '{path_str(module)}' already holds LoRA leaves: these params are not merged")
        key = base_leaf_key(flat, module)
        a, b = flat_adapter[module + ("lora_A",)], flat_adapter[module + ("lora_B",)]
        w = flat[key]
        flat[key] = (w.astype(jnp.float32) - _scaled_delta(a, b, w, config)).astype(w.dtype)
        flat[module + ("lora_A",)], flat[module + ("lora_B",)] = a, b
    return traverse_util.unflatten_dict(flat)
