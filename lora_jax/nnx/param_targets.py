"""Parameter targets on an NNX model: LoRA on raw ``nnx.Param`` attributes (a mixture of experts'
stacked weights), wherever the module reads them.

``lora`` gives the module owning a targeted param ``P`` a child ``P_lora`` holding ``lora_A`` /
``lora_B`` (``nnx.LoRAParam``, so the param tree is the linen one: ``moe/w_in_lora/lora_A``) and
makes its class a subclass of its own whose attribute read of ``P`` returns an ``AdaptedView``:
``view[...]`` (and ``.value``) is ``W + scale·A·B``, ``view.get_raw_value()`` the
``param_targets.AdaptedParam`` box that ``lora_jax.ragged_dot`` / ``lora_jax.einsum`` take for the
grouped path. The stored variable itself is untouched (graph operations read ``vars(module)``).

    >>> import jax.numpy as jnp
    >>> from lora_jax import LoraConfig, lora
    >>> class Experts(nnx.Module):
    ...     def __init__(self):
    ...         self.w = nnx.Param(jnp.ones((2, 3, 4)))               # (experts, in, out)
    >>> model = lora(Experts(), LoraConfig(rank=1, targets=(), target_parameters=("w",)), rngs=nnx.Rngs(0))
    >>> model.w_lora.lora_A[...].shape, type(model.w).__name__, model.w[...].shape
    ((2, 3, 1), 'AdaptedView', (2, 3, 4))
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.nnx import variablelib

from ..config import LoraConfig
from ..param_targets import FACTORS_SUFFIX, AdaptedParam, init_parameter_factors, param_path_of
from ..targets import path_str
from .variables import QuantizedParam

_ADAPTED: dict[type, type] = {}  # the user's module class -> its class with parameter targets
_BASE_OF: dict[type, type] = {}


class LoraFactors(nnx.Module):
    """The factors of one raw param: ``lora_A`` (..., p, r), ``lora_B`` (..., r, q) in its axis order."""

    def __init__(self, lora_a: jax.Array, lora_b: jax.Array):
        self.lora_A, self.lora_B = nnx.LoRAParam(lora_a), nnx.LoRAParam(lora_b)


class AdaptedView(nnx.Variable):
    """A targeted param as its module reads it: ``[...]`` is ``W + scale·A·B``; the raw value is the
    ``AdaptedParam`` box (the grouped path's input)."""

    def get_value(self, *, index: Any = variablelib.MISSING) -> Any:
        value = self.get_raw_value().unbox()
        return value if isinstance(index, variablelib.Missing) else value[index]


def _read(self: Any, name: str) -> Any:
    value = object.__getattribute__(self, name)
    targets = object.__getattribute__(self, "__dict__").get("lora_param_targets")
    if not targets or name not in targets:
        return value
    scale, in_axis = targets[name]
    factors = object.__getattribute__(self, name + FACTORS_SUFFIX)
    return AdaptedView(AdaptedParam.of(value.get_raw_value(), factors.lora_A[...], factors.lora_B[...], scale, in_axis))


def _adapted_class(cls: type) -> type:
    if cls in _BASE_OF:  # already adapted (a second param of the same module)
        return cls
    if cls not in _ADAPTED:
        members = {"__getattribute__": _read, "__module__": __name__,
                   "__doc__": f"{cls.__name__} with LoRA on raw params (added by lora_jax.lora)."}
        adapted = type(f"ParamLora{cls.__name__}", (cls,), members)
        _ADAPTED[cls], _BASE_OF[adapted] = adapted, cls
    return _ADAPTED[cls]


def raw_params(model: nnx.Module) -> list[tuple[tuple[str, ...], Any, nnx.Variable]]:
    """(key, owning module, variable) of every raw param of ``model``: an ``nnx.Param`` that is no
    LoRA factor, or a param stored quantized (``QuantizedParam``); the candidates for parameter targets."""
    return [(tuple(str(p) for p in path) + (name,), module, variable)
            for path, module in list(nnx.iter_modules(model)) for name, variable in list(vars(module).items())
            if (isinstance(variable, nnx.Param) and not isinstance(variable, nnx.LoRAParam))
            or isinstance(variable, QuantizedParam)]


def add_parameter_targets(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> None:
    """Give every raw ``nnx.Param`` that ``config.target_parameters`` selects its factors (in place)."""
    owners, params = {}, {}
    for key, module, variable in raw_params(model):
        owners[key] = module
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = variable.get_raw_value()  # a quantized param: its box (codes), only measured
    factors = init_parameter_factors(params, config, rngs.params())
    for key in factors:
        if key[-1] != "lora_A":
            continue
        param_key = param_path_of(key[:-1])
        module, name = owners[param_key], param_key[-1]
        if module.__dict__.get("lora_param_targets", {}).get(name):
            raise ValueError(f"param '{path_str(param_key)}' already has LoRA: lora() was applied to this model "
                             f"before")
        setattr(module, name + FACTORS_SUFFIX, LoraFactors(factors[key], factors[key[:-1] + ("lora_B",)]))
        where = path_str(param_key)
        targets = dict(module.__dict__.get("lora_param_targets") or {})
        targets[name] = (config.scale_for(config.rank_for(where)), config.in_axis_for(where))
        module.lora_param_targets = targets
        module.__class__ = _adapted_class(type(module))


def merge_parameter_targets(model: nnx.Module) -> None:
    """Fold every parameter target's update into its param, in place: W ← W + scale·A·B, the factors
    and the adapted class gone."""
    for _, module in list(nnx.iter_modules(model)):
        targets = module.__dict__.get("lora_param_targets")
        if not targets:
            continue
        for name, (scale, in_axis) in targets.items():
            variable = module.__dict__[name]
            factors = module.__dict__[name + FACTORS_SUFFIX]
            merged = AdaptedParam.of(variable[...], factors.lora_A[...], factors.lora_B[...], scale, in_axis).unbox()
            variable[...] = merged
            delattr(module, name + FACTORS_SUFFIX)
        del module.lora_param_targets
        module.__class__ = _BASE_OF[type(module)]


def has_parameter_targets(module: Any) -> bool:
    """Whether ``module`` holds a raw param ``lora`` adapted."""
    return type(module) in _BASE_OF
