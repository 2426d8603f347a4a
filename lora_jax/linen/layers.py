"""The linen front end of LoRA's per-layer math: which flax layers are adapted, and how.

For a targeted layer this module reads the frozen weight from the layer's scope, creates or reads
``lora_A`` / ``lora_B`` (and a variant's extra leaves) beside it, reads the layer's own attributes
(axes, precision, dtype, conv code) into a ``core.plans.LayerReading`` whose plan (the same for
the NNX front end) ``core.forward`` combines with the frozen output through the config's variant.
All array math lives in ``core``; what is here is flax: scopes, params, attribute reading.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..config import LoraConfig
from ..core import forward, kinds
from ..core.forward import Plan, check_variant_supported, split_input
from ..core.plans import LayerReading, einsum_spec_of_call, plan_call
from ..core.kinds import base_leaf_name
from ..core.init import a_initializer
from ..core.variants import foreign_leaves
from ..quantize import QuantizedKernel

Array = jax.Array

SUPPORTED = (nn.Embed, nn.Conv, nn.Einsum, nn.DenseGeneral, nn.Dense)


def layer_kind(module: nn.Module) -> str | None:
    """'dense' | 'dense_general' | 'einsum' | 'conv' | 'embed', or None for layers LoRA cannot adapt."""
    if isinstance(module, nn.Embed):
        return "embed"
    if isinstance(module, nn.Conv):
        return "conv"
    if isinstance(module, nn.Einsum):
        return "einsum"
    if isinstance(module, nn.DenseGeneral):
        return "dense_general"
    if isinstance(module, nn.Dense):
        return "dense"
    return None


# The methods that apply a layer's weight: an Embed's table is also used, transposed, by ``attend``
# (tied input/output embeddings), so a targeted Embed adapts both and ``merge`` stays exact.
ADAPTED_METHODS = {"dense": ("__call__",), "dense_general": ("__call__",), "einsum": ("__call__",),
                   "conv": ("__call__",), "embed": ("__call__", "attend")}


# --------------------------------------------------------------------------- a quantized frozen kernel


def quantized_kernel(module: nn.Module, kind: str) -> Any:
    """The layer's frozen weight if it is stored quantized (a ``QuantizedKernel`` box), else None."""
    name = base_leaf_name(kind)
    if module.scope is None or not module.scope.has_variable("params", name):
        return None
    leaf = module.scope.get_variable("params", name)
    return leaf if isinstance(leaf, QuantizedKernel) else None


def quantized_base_output(module: nn.Module, kind: str, box: Any, args: tuple, kwargs: dict,
                          method: str = "__call__") -> Array:
    """What the layer's own ``method`` returns, its quantized kernel dequantized at the point of use.

    The layer's own code runs (a copy of the module, unbound, given the dequantized kernel and its
    bias), so padding, precision, dtype promotion and injected ``dot_general`` are the layer's; the
    call goes through ``QuantizedKernel.apply``, whose backward pass dequantizes again instead of
    keeping the kernel from the forward pass.
    """
    x, rest, kwargs = split_input(args, kwargs)
    scope = module.scope
    bias = nn.meta.unbox(scope.get_variable("params", "bias")) if scope.has_variable("params", "bias") else None
    name = base_leaf_name(kind)

    def fn(x: Array, kernel: Array, bias: Array | None) -> Array:
        params = {name: kernel} if bias is None else {name: kernel, "bias": bias}
        plain = module.clone(parent=None, name=None)
        with _internal_call():
            return plain.apply({"params": params}, x, *rest, method=method, **kwargs)

    return box.apply(fn, x, bias)


# --------------------------------------------------------------------------- one adapted call


def adapted_layer_output(module: nn.Module, kind: str, args: tuple, kwargs: dict, config: LoraConfig, path: str,
                   dropout_key: Array | None, base_out: Array, method: str = "__call__") -> Array:
    """The output of one call of a targeted layer with its adapter: ``base_out`` (the frozen layer's
    own output for this call) combined with ``scale · f(dropout(x); A, B)`` by ``config.variant``,
    creating lora_A / lora_B (and the variant's leaves) in the layer's scope at init.

    ``method`` is the layer method being called: ``'attend'`` on an Embed adapts
    ``query @ embedding.T`` with ``query @ (A·B).T``.
    """
    rank = config.rank_for(path)
    scale = config.scale_for(rank)
    weight = nn.meta.unbox(module.scope.get_variable("params", base_leaf_name(kind)))
    x = split_input(args, kwargs)[0]
    plan = plan_call(_reading(module, kind, weight, args, kwargs), rank, path, method)
    check_variant_supported(plan, config.variant, path, f"{kind}{'.attend' if method == 'attend' else ''}")
    kinds.check_rank(rank, plan.shapes.n_in, plan.shapes.n_out, path)
    a, b, extra = _adapter_params(module, config, path, plan, kind, rank, scale, weight)
    bias = module.scope.get_variable("params", "bias") if module.scope.has_variable("params", "bias") else None
    return forward.adapted_output(plan, x=x, base_out=base_out, weight=weight,
                                  bias=None if bias is None else nn.meta.unbox(bias), a=a, b=b, leaves=extra,
                                  scale=scale, variant=config.variant, dropout_rate=config.dropout,
                                  dropout_key=dropout_key)


def _adapter_params(module, config, path, plan: Plan, kind, rank, scale, weight):
    """lora_A, lora_B and the variant's leaves of this layer: read if present, created at init.

    When the base weight is boxed with sharding names (``nn.Partitioned`` / ``nn.LogicallyPartitioned``,
    e.g. from ``nn.with_partitioning``), the new leaves are boxed the same way: A carries the weight's
    input-axis names, B its output-axis names, the rank axis none (``core.kinds.factor_axis_names``).
    """
    shapes = plan.shapes
    scope = module.scope
    variant = config.variant
    dtype = jnp.dtype(config.param_dtype)
    if not scope.has_variable("params", "lora_A") and not scope.is_mutable_collection("params"):
        raise ValueError(
            f"layer '{path}' is a LoRA target but its params hold no lora_A/lora_B: initialise the "
            f"adapter with model.init(...) or lora_jax.init_lora_params(model, base_params, rng, ...)"
        )
    for name, want in (("lora_A", shapes.a), ("lora_B", shapes.b)):
        if scope.has_variable("params", name):
            have = tuple(nn.meta.unbox(scope.get_variable("params", name)).shape)
            if have != tuple(want):
                raise ValueError(f"{name} at '{path}' has shape {have}, but this layer needs {tuple(want)}")
    if scope.has_variable("params", "lora_A") != scope.has_variable("params", "lora_B"):
        raise ValueError(f"layer '{path}' holds only one of lora_A / lora_B; an adapter needs both")
    stray = foreign_leaves(variant, lambda leaf: scope.has_variable("params", leaf))
    if stray:
        raise ValueError(f"layer '{path}' holds {stray}, leaves of another LoRA variant than '{variant.name}': "
                         f"set the config's use_dora / init to match the adapter")
    read = lambda name: nn.meta.unbox(scope.get_variable("params", name))
    if scope.has_variable("params", "lora_A"):  # read, not re-declared: a layer may run twice per call
        a, b = read("lora_A"), read("lora_B")
    else:
        box = _boxer(scope.get_variable("params", base_leaf_name(kind)), kind, shapes, plan.einsum_axes)
        default_a = a_initializer(config.init, shapes.fan_in, rank, lookup_table=kinds.KIND[kind].lookup_table)

        made = {}  # the variant's factors at init, from the default ones (A drawn, B zero), made once for both

        def init_a(key, shape, dtype):
            made["a"], made["b"] = variant.init_factors(weight, default_a(key, shape, dtype),
                                                        jnp.zeros(shapes.b, dtype), scale)
            return made["a"].astype(dtype)

        a = scope.param("lora_A", box(init_a, "a"), shapes.a, dtype)
        b = scope.param("lora_B", box(lambda key, shape, dtype: made["b"].astype(dtype), "b"), shapes.b, dtype)
    extra, initial = {}, None
    for name in variant.leaves:
        if scope.has_variable("params", name):
            extra[name] = read(name)
        elif scope.is_mutable_collection("params"):
            box = _boxer(scope.get_variable("params", base_leaf_name(kind)), kind, shapes, plan.einsum_axes)
            initial = initial or variant.init_leaves(weight, a, b, scale, shapes.out_ndim)  # once for all leaves
            value = initial[name].astype(dtype)
            extra[name] = scope.param(name, box(lambda *_: value, variant.leaf_roles[name]))
        else:
            raise ValueError(f"layer '{path}' is a {variant.label} target but its params hold no {name}: the "
                             f"adapter was trained without it; set the config's {variant.flag} only to match it")
    return a, b, extra


def _boxer(base_leaf: Any, kind: str, shapes: kinds.FactorShapes, einsum_axes: kinds.EinsumAxes | None):
    """``box(init, role)``: ``init`` wrapped to box its value like ``base_leaf`` (role 'a' | 'b' |
    'magnitude' picks the axis names), or ``init`` itself when the base leaf carries no names."""
    names = getattr(base_leaf, "names", None)
    if not isinstance(base_leaf, nn.meta.AxisMetadata) or names is None:
        return lambda init, role: init
    roles = dict(zip(("a", "b", "magnitude"), kinds.factor_axis_names(kind, tuple(names), shapes, einsum_axes)))

    def box(init, role):
        def boxed(*args, **kwargs):
            return dataclasses.replace(base_leaf, value=init(*args, **kwargs), names=roles[role])
        return boxed

    return box


def _reading(module: nn.Module, kind: str, weight: Array, args: tuple, kwargs: dict) -> LayerReading:
    """The linen layer's own attributes for ``core.plans``: compute dtype, precision, DenseGeneral's
    axes, this call's einsum spec and the layer's conv code."""
    _, rest, call_kwargs = split_input(args, kwargs)
    if kind == "dense_general":
        return LayerReading(kind, weight, module.dtype, module.precision, axis=module.axis,
                            batch_axes=bool(module.batch_dims))
    if kind == "einsum":
        return LayerReading(kind, weight, module.dtype, module.precision,
                            einsum_spec=einsum_spec_of_call(rest, call_kwargs, module.einsum_str))
    if kind == "conv":
        def conv(x, kernel):  # the module's own conv code (padding modes, strides, dilation) on another kernel
            plain = module.clone(parent=None, features=kernel.shape[-1], use_bias=False, name=None)
            with _internal_call():
                return plain.apply({"params": {"kernel": kernel}}, x)

        return LayerReading(kind, weight, module.dtype, module.precision, conv=conv,
                            grouped=module.feature_group_count != 1 or module.mask is not None)
    return LayerReading(kind, weight, module.dtype, getattr(module, "precision", None))


# --------------------------------------------------------------------------- re-entrancy guard

_INTERNAL = contextvars.ContextVar("lora_jax_internal_call", default=False)


@contextlib.contextmanager
def _internal_call():
    """Calls made while computing an update (e.g. A's conv) must not be intercepted again."""
    token = _INTERNAL.set(True)
    try:
        yield
    finally:
        _INTERNAL.reset(token)


def in_internal_call() -> bool:
    return _INTERNAL.get()
