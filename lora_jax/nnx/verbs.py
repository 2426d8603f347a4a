"""The tree verbs for NNX models: each reads the model into a param tree (``nnx_params``) at this
boundary, runs the tree function on it, and, where the verb changes the model, writes the result back
in place and returns the model. ``lora_jax``'s public verbs send an NNX model here.

    lora_jax.apply_adapter(model, adapter)    # -> apply_adapter(model, adapter) below, in place
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from flax import nnx, traverse_util

from .. import adapters, bank
from ..adapters import Adapter
from ..config import LoraConfig
from ..targets import path_str
from .transform import is_adapted, nnx_functional
from .trees import load_nnx_params, nnx_params


def tree_of(params_or_model: Any) -> Any:
    """A model's params as a tree (``nnx_params``); a tree as it is."""
    return nnx_params(params_or_model) if isinstance(params_or_model, nnx.Module) else params_or_model


def on_params(tree_verb: Callable[..., Any]) -> Callable[..., Any]:
    """``tree_verb`` for a verb that only reads its tree: the model's params in its place."""
    def verb(model: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        return tree_verb(nnx_params(model), *args, **kwargs)

    return verb


def apply_adapter(model: nnx.Module, adapter: Adapter | dict, *, strict: bool = True) -> nnx.Module:
    """The adapter written into an NNX model with LoRA, in place, after the tree checks (fit, base
    fingerprint); an ``Adapter``'s own scale (alpha, rsLoRA, rank) is given to the layers it loads."""
    adapters.apply_adapter(nnx_params(model), adapter, strict=strict)
    if isinstance(adapter, Adapter):
        _adopt_scales(model, adapter)
    return load_nnx_params(model, adapter.params if isinstance(adapter, Adapter) else adapter)


def _adopt_scales(model: Any, adapter: Adapter) -> None:
    """Give each adapted NNX layer the adapter loads into the adapter's own scale (alpha, rsLoRA, its
    rank there), as linen's apply under the adapter's config computes; a variant that differs (DoRA
    or not) is refused before anything is written."""
    flat = traverse_util.flatten_dict(dict(adapter.params))
    layers = []
    for path, module in nnx.iter_modules(model):
        key = tuple(str(p) for p in path)
        if not is_adapted(module) or key + ("lora_A",) not in flat:
            continue
        if module.lora_config.variant is not adapter.config.variant:
            raise ValueError(f"layer '{path_str(key)}' of the model is {module.lora_config.variant.label} and the "
                             f"adapter is {adapter.config.variant.label}: build the model with the adapter's config")
        layers.append((module, int(np.shape(flat[key + ("lora_A",)])[-1])))
    for module, rank in layers:
        module.lora_config = module.lora_config.replace(rank=rank, alpha=adapter.config.alpha,
                                                        rslora=adapter.config.rslora)


def hotswap_adapter(model: nnx.Module, adapter: Adapter, config: LoraConfig, *, strict: bool = True) -> nnx.Module:
    """``hotswap_adapter`` into a running NNX model, in place: its LoRA slots (and the leaves the
    adapter trained) take the padded, rescaled adapter; every variable keeps its shape."""
    tree = nnx_params(model)
    swapped = traverse_util.flatten_dict(adapters.hotswap_adapter(tree, adapter, config, strict=strict))
    brought = traverse_util.flatten_dict(dict(adapter.params))
    changed = {k: v for k, v in swapped.items() if k[-1] in ("lora_A", "lora_B") or k in brought}
    return load_nnx_params(model, traverse_util.unflatten_dict(changed))


def bank_apply(model: nnx.Module, params: dict | None, bank_: dict, index: Any, *args: Any, **kwargs: Any) -> Any:
    """``bank_apply`` with the model run as a pure function of its params (``nnx_functional``; the
    model is not changed); ``params`` None: the model's own."""
    apply_fn, own = nnx_functional(model)
    return bank.bank_apply_fn(apply_fn, own if params is None else params, bank_, index, *args, **kwargs)


def merge_requantized(model: nnx.Module, config: LoraConfig) -> Any:
    raise TypeError("merge_requantized takes a linen param tree; for an NNX model, lora_jax.merge(model, config) "
                    "gives a merged copy, and lora_jax.quantize(merged, config, format, layers='all') quantizes it "
                    "again")
