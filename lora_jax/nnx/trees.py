"""NNX models' params as linen-shaped nested dicts, and back: what lets masking, adapters,
checkpoints and PEFT export take an NNX model wherever they take a param tree."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import meta

from ..targets import path_str


def nnx_params(model: nnx.Module) -> dict:
    """The model's ``nnx.Param`` leaves (LoRA params included) and quantized kernels (as their
    ``QuantizedKernel`` boxes) as a nested dict with string keys, the layout of a linen param tree:
    what masking, adapters, checkpoints and PEFT export read. Flax's
    own ``nnx.LoRALinear`` layers are read the same way: their ``lora/lora_a`` and ``lora/lora_b``
    appear as ``lora_A`` / ``lora_B`` beside the kernel (they apply no scale: describe them with a
    config whose alpha equals its rank).

    >>> import jax
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.layers = nnx.List([nnx.Linear(3, 2, rngs=rngs)])
    >>> jax.tree.map(jnp.shape, nnx_params(Net(nnx.Rngs(0))))
    {'layers': {'0': {'bias': (2,), 'kernel': (3, 2)}}}
    """
    params = _string_keys(nnx.state(model, nnx.Param).to_pure_dict())
    for path, variable in nnx.iter_graph(model):  # a frozen stored box (a quantized kernel): boxed, not read out
        if isinstance(variable, nnx.Variable) and isinstance(variable.get_raw_value(), meta.AxisMetadata):
            node = params
            for key in path[:-1]:
                node = node.setdefault(str(key), {})
            node[str(path[-1])] = variable.get_raw_value()
    for path, module in nnx.iter_modules(model):  # flax's own nnx.LoRALinear: its lora/lora_a, lora/lora_b
        if isinstance(module, nnx.LoRALinear) and path:
            node = params
            for key in path:
                node = node[str(key)]
            flax_lora = node.pop("lora")
            node["lora_A"], node["lora_B"] = flax_lora["lora_a"], flax_lora["lora_b"]
    return params


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def load_nnx_params(model: nnx.Module, params: dict) -> nnx.Module:
    """Write ``params`` (a nested dict as ``nnx_params`` returns, e.g. an adapter) into ``model``'s
    variables in place; every leaf must name an existing variable of the same shape."""
    by_path = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Variable):
            by_path[tuple(str(p) for p in path)] = variable
    for key, value in traverse_util.flatten_dict(dict(params)).items():
        variable = by_path.get(tuple(str(k) for k in key))
        if variable is None:
            raise ValueError(f"'{path_str(key)}' is not a variable of this NNX model (did you call "
                             f"lora_jax.lora(model, config, rngs=...) with the adapter's config first?)")
        if tuple(variable[...].shape) != tuple(value.shape):
            raise ValueError(f"'{path_str(key)}' has shape {tuple(value.shape)}, the model's variable "
                             f"{tuple(variable[...].shape)}")
        variable[...] = jnp.asarray(value, variable[...].dtype)
    return model
