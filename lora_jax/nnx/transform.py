"""The Flax NNX front end: ``lora(model, config, rngs=...)`` adds LoRA to an ``nnx.Module`` in place.

Each targeted layer (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``,
``nnx.Embed`` and its ``attend``) keeps its own params and gains ``lora_A`` / ``lora_B`` (and DoRA's
``lora_magnitude``) as ``nnx.LoRAParam`` beside its kernel, so the param paths are those of the
linen transform (``.../query/kernel``, ``.../query/lora_A``) and adapters, merges and PEFT files
move between the two APIs. The layer's class becomes a subclass of its own (``LoraLinear`` for
``nnx.Linear``, still an ``nnx.Linear``) whose call adds the update through ``core.forward``;
``merge`` returns a copy of the model with the original classes and the update folded in.

LoRA dropout draws from the ``rngs`` given to ``lora`` (stream ``config.dropout_rng``, else
``default``) while the layer's ``deterministic`` is False: ``model.eval()`` turns it off,
``model.train()`` on.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lora_jax import LoraConfig
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.query = nnx.Linear(6, 4, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.query(x)
    >>> model = Net(nnx.Rngs(0))
    >>> before = model(jnp.ones((2, 6)))
    >>> _ = lora_nnx(model, LoraConfig(rank=2, targets=("query",)), rngs=nnx.Rngs(1))
    >>> type(model.query).__name__, model.query.lora_A.shape, bool((model(jnp.ones((2, 6))) == before).all())
    ('LoraLinear', (6, 2), True)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

from ..config import LoraConfig
from ..core import kinds
from ..core.forward import adapted_output, check_variant_supported, split_input
from ..core.plans import LayerReading, einsum_spec_of_call, plan_call
from ..core.init import a_initializer
from ..masking import trainable_mask
from ..target_report import TargetReport, check_targets
from ..targets import matches, path_str
from .param_targets import add_parameter_targets, has_parameter_targets, merge_parameter_targets
from .variables import QuantizedParam
from .trees import nnx_params

Array = jax.Array

# most specific first: LinearGeneral and Linear are unrelated in nnx, LoRALinear is a Linear
_KINDS = ((nnx.Embed, "embed"), (nnx.Conv, "conv"), (nnx.Einsum, "einsum"), (nnx.LinearGeneral, "dense_general"),
          (nnx.Linear, "dense"))
_BASE_OF: dict[type, type] = {}  # adapted class -> the user's layer class
_ADAPTED: dict[type, type] = {}  # the user's layer class -> adapted class


def nnx_layer_kind(module: Any) -> str | None:
    """'dense' | 'dense_general' | 'einsum' | 'conv' | 'embed' for an NNX layer LoRA can adapt, else None."""
    return next((kind for cls, kind in _KINDS if isinstance(module, cls)), None)


def is_adapted(module: Any) -> bool:
    """Whether ``module`` is a layer ``lora`` has adapted."""
    return type(module) in _BASE_OF


def lora_nnx(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Add LoRA to the layers of ``model`` that ``config`` targets, in place; returns ``model``.

    Args:
      model: an ``nnx.Module`` (its params, e.g. pretrained, are kept as they are).
      config: the adapter's settings, as for linen.
      rngs: ``nnx.Rngs`` for lora_A's initialiser (stream ``params``, else ``default``) and, while
        training, LoRA dropout (stream ``config.dropout_rng``, else ``default``).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora() takes a LoraConfig, got {type(config).__name__}")
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError("lora() on an NNX model adds params in place and needs rngs=nnx.Rngs(...) for them "
                        f"(got {type(rngs).__name__})")
    if "params" not in rngs and "default" not in rngs:
        raise ValueError("lora(): rngs has no 'params' stream (nor a default one) to initialise lora_A from: pass "
                         "nnx.Rngs(0), or nnx.Rngs(params=0, ...) beside your other streams")
    record = TargetReport(hits={t: 0 for t in config.targets})
    chosen = []
    for path, module in nnx.iter_modules(model):
        kind = nnx_layer_kind(module)
        if kind is None:
            continue
        where = path_str(path)
        if is_adapted(module):
            raise ValueError(f"layer '{where}' already has LoRA: lora() was applied to this model before; merge it "
                             f"(lora_jax.merge) or start from the base model")
        record.adaptable[where] = kind
        selected = [t for t in config.targets if matches(t, where)]
        for t in selected:
            record.hits[t] += 1
        if config.selects(where):
            if isinstance(module, nnx.LoRALinear):
                raise ValueError(f"layer '{where}' is flax's nnx.LoRALinear, which carries its own LoRA (read, merged "
                                 f"and exported as it is): exclude it from the targets")
            record.targeted.add(where)
            chosen.append((where, module, kind))
    if config.targets:
        check_targets(config, record, "nnx." + ", nnx.".join(cls.__name__ for cls, _ in _KINDS))
    for where, module, kind in chosen:
        _adapt(module, kind, where, config, rngs)
    if config.target_parameters:
        add_parameter_targets(model, config, rngs)
    return model


def _weight(module: Any, kind: str) -> Array:
    return (module.embedding if kind == "embed" else module.kernel)[...]


def one_layer_ndim(module: Any, kind: str) -> int:
    """The rank of one layer's weight (a module made under nnx.vmap holds more, stacked in front)."""
    if kind == "dense_general":
        return len(module.in_features) + len(module.out_features)
    if kind == "conv":
        return len(module.kernel_size) + 2
    if kind == "einsum":
        return len(module.kernel_shape)
    return 2


def _adapt(module: Any, kind: str, where: str, config: LoraConfig, rngs: nnx.Rngs) -> None:
    rank = config.rank_for(where)
    weight = _weight(module, kind)
    n_stack = weight.ndim - one_layer_ndim(module, kind)  # leading axes of layers made under nnx.vmap / scan
    stack = tuple(weight.shape[:n_stack])
    one_layer = weight[(0,) * n_stack]
    plan = plan_call(_reading(module, kind, one_layer), rank, where)
    check_variant_supported(plan, config.variant, where, kind)
    kinds.check_rank(rank, plan.shapes.n_in, plan.shapes.n_out, where)
    dtype = jnp.dtype(config.param_dtype)
    init = a_initializer(config.init, plan.shapes.fan_in, rank, lookup_table=kinds.KIND[kind].lookup_table)
    a = init(rngs.params(), stack + plan.shapes.a, dtype)
    b = jnp.zeros(stack + plan.shapes.b, dtype)
    variant, scale = config.variant, config.scale_for(rank)

    def layer_init(w: Array, a: Array, b: Array) -> tuple:  # one layer's factors and leaves at init
        a, b = variant.init_factors(w, a, b, scale)
        return a.astype(dtype), b.astype(dtype), variant.init_leaves(w, a, b, scale, plan.shapes.out_ndim)

    for _ in range(n_stack):  # layers stacked by nnx.vmap / scan: each its own
        layer_init = jax.vmap(layer_init)
    a, b, extra = layer_init(weight, a, b)
    module.lora_A, module.lora_B = nnx.LoRAParam(a), nnx.LoRAParam(b)
    for name, value in extra.items():
        setattr(module, name, nnx.LoRAParam(value.astype(dtype)))
    module.lora_config = config.replace(rank=rank, rank_pattern=())
    module.lora_path = where
    module.lora_rngs = rngs if config.dropout > 0 else None
    module.deterministic = False
    module.__class__ = _adapted_class(type(module))


def _adapted_class(cls: type) -> type:
    if cls not in _ADAPTED:
        members = {"__call__": _adapted_call, "__module__": __name__,
                   "__doc__": f"{cls.__name__} with a LoRA adapter (added by lora_jax.lora)."}
        if issubclass(cls, nnx.Embed):
            members["attend"] = _adapted_attend
        adapted = type(f"Lora{cls.__name__}", (cls,), members)
        _ADAPTED[cls], _BASE_OF[adapted] = adapted, cls
        _PLAIN_OF[adapted] = plain_class(cls)
    return _ADAPTED[cls]


def _adapted_call(self, *args: Any, **kwargs: Any) -> Array:
    out = base_call(self, "__call__", args, kwargs)
    return _output(self, "__call__", args, kwargs, out)


def _adapted_attend(self, *args: Any, **kwargs: Any) -> Array:
    out = base_call(self, "attend", args, kwargs)
    return _output(self, "attend", args, kwargs, out)


# --------------------------------------------------------------------------- a quantized frozen kernel

_QUANTIZED: dict[type, type] = {}  # the user's layer class -> its class with a quantized kernel
_PLAIN_OF: dict[type, type] = {}  # a class made here (adapted, quantized) -> the user's layer class


def plain_class(cls: type) -> type:
    """The user's layer class under the classes ``lora`` and ``quantize`` put on a layer."""
    return _PLAIN_OF.get(cls, cls)


def quantized_class(cls: type) -> type:
    """``cls`` (a user's layer class) as a layer whose kernel is a ``QuantizedParam``: its call
    dequantizes at the point of use (``base_call``)."""
    if cls not in _QUANTIZED:
        members = {"__call__": lambda self, *args, **kwargs: base_call(self, "__call__", args, kwargs),
                   "__module__": __name__,
                   "__doc__": f"{cls.__name__} on a quantized kernel (made by lora_jax.quantize)."}
        _QUANTIZED[cls] = type(f"Quantized{cls.__name__}", (cls,), members)
        _PLAIN_OF[_QUANTIZED[cls]] = cls
    return _QUANTIZED[cls]


def base_call(module: Any, method: str, args: tuple, kwargs: dict) -> Array:
    """What the user's layer class computes in ``method`` on ``module``'s weights; a quantized kernel
    (``QuantizedParam``) is dequantized at the point of use, in the forward and the backward pass
    (``QuantizedKernel.apply``), by running the layer's own code on a twin that holds the kernel."""

    plain = plain_class(type(module))
    variable = getattr(module, "kernel", None)
    if not isinstance(variable, QuantizedParam) or not isinstance(variable.get_raw_value(), meta.AxisMetadata):
        return getattr(plain, method)(module, *args, **kwargs)
    box = variable.get_raw_value()
    x, rest, kwargs = split_input(args, kwargs)
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias[...]

    def fn(x: Array, kernel: Array, bias: Array | None) -> Array:
        twin = object.__new__(plain)  # a shallow copy of the layer with plain params: nothing of it is kept
        twin.__dict__.update(vars(module))
        object.__setattr__(twin, "kernel", nnx.Param(kernel))
        if bias is not None:
            object.__setattr__(twin, "bias", nnx.Param(bias))
        return getattr(plain, method)(twin, x, *rest, **kwargs)

    return box.apply(fn, x, bias)


def _output(module: Any, method: str, args: tuple, kwargs: dict, out: Array) -> Array:
    config: LoraConfig = module.lora_config
    kind = nnx_layer_kind(module)
    x, rest, call_kwargs = split_input(args, kwargs)
    plan = plan_call(_reading(module, kind, _weight(module, kind), rest, call_kwargs), config.rank,
                     module.lora_path, method)
    check_variant_supported(plan, config.variant, module.lora_path, f"{kind}.{method}")
    key = None
    if config.dropout > 0 and not module.deterministic and module.lora_rngs is not None:
        key = getattr(module.lora_rngs, config.dropout_rng)()
    bias = getattr(module, "bias", None)
    leaves = {name: getattr(module, name)[...] for name in config.variant.leaves}
    return adapted_output(plan, x=x, base_out=out, weight=_weight(module, kind),
                          bias=None if bias is None else bias[...], a=module.lora_A[...], b=module.lora_B[...],
                          leaves=leaves, scale=config.scale, variant=config.variant, dropout_rate=config.dropout,
                          dropout_key=key)


def _reading(module: Any, kind: str, weight: Array, rest: tuple = (), kwargs: dict | None = None) -> LayerReading:
    """The NNX layer's own attributes for ``core.plans``; ``rest`` / ``kwargs``: the call's arguments
    after the input (an Einsum's ``einsum_str``)."""
    precision = getattr(module, "precision", None)
    if kind == "dense_general":
        return LayerReading(kind, weight, module.dtype, precision, axis=module.axis, batch_axes=bool(module.batch_axis))
    if kind == "einsum":
        return LayerReading(kind, weight, module.dtype, precision,
                            einsum_spec=einsum_spec_of_call(rest, kwargs or {}, module.einsum_str))
    if kind == "conv":
        def conv(x, kernel):  # nnx.Conv's own code (padding modes, strides, dilation) on another kernel
            plain = nnx.Conv(module.in_features, kernel.shape[-1], module.kernel_size, module.strides,
                             padding=module.padding, input_dilation=module.input_dilation,
                             kernel_dilation=module.kernel_dilation, use_bias=False, dtype=module.dtype,
                             precision=precision, rngs=nnx.Rngs(0))
            plain.kernel = nnx.Param(kernel)
            return plain(x)

        return LayerReading(kind, weight, module.dtype, precision, conv=conv,
                            grouped=module.feature_group_count != 1 or module.mask is not None)
    return LayerReading(kind, weight, module.dtype, precision)


# --------------------------------------------------------------------------- merge and params


def merge_nnx(model: nnx.Module, config: LoraConfig) -> nnx.Module:
    """A copy of ``model`` with each adapted layer back in its original class, the update folded into
    its weight (``config.variant.merge``) and the LoRA params gone; ``model`` is unchanged."""
    del config  # each layer carries its own resolved config
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    adapted = [module for _, module in nnx.iter_modules(merged) if is_adapted(module)]
    flax_lora = [module for _, module in nnx.iter_modules(merged) if isinstance(module, nnx.LoRALinear)]
    with_params = any(has_parameter_targets(module) for _, module in nnx.iter_modules(merged))
    merge_parameter_targets(merged)
    if not adapted and not flax_lora and not with_params:
        raise ValueError("merge: this NNX model has no LoRA layers (lora_jax.lora(model, config, rngs=...) adds them)")
    for module in flax_lora:  # flax's own LoRALinear: y = x W + b + x a b, no scale
        delta = module.lora.lora_a[...].astype(jnp.float32) @ module.lora.lora_b[...].astype(jnp.float32)
        module.kernel[...] = (module.kernel[...].astype(jnp.float32) + delta).astype(module.kernel[...].dtype)
        del module.lora
        module.__class__ = nnx.Linear
    for module in adapted:
        layer_config: LoraConfig = module.lora_config
        kind = nnx_layer_kind(module)
        weight = _weight(module, kind)
        a, b = module.lora_A[...].astype(jnp.float32), module.lora_B[...].astype(jnp.float32)
        scaled = layer_config.scale * kinds.delta(a, b, tuple(weight.shape))
        leaves = {name: getattr(module, name)[...] for name in layer_config.variant.leaves}
        new = layer_config.variant.merge(weight.astype(jnp.float32), scaled, leaves).astype(weight.dtype)
        name = kinds.base_leaf_name(kind)
        was_quantized = isinstance(getattr(module, name).get_raw_value(), meta.AxisMetadata)  # a box: now plain
        if was_quantized:
            setattr(module, name, nnx.Param(new))
        else:
            getattr(module, name)[...] = new
        for name in ("lora_A", "lora_B", *layer_config.variant.leaves, "lora_config", "lora_path", "lora_rngs",
                     "deterministic"):
            delattr(module, name)
        module.__class__ = plain_class(type(module)) if was_quantized else _BASE_OF[type(module)]
    return merged


def nnx_functional(model: nnx.Module) -> tuple[Any, dict]:
    """``(apply, params)``: the model as a pure function of a linen-shaped param tree, for
    ``lora_jax.TrainState`` / ``make_train_step`` (or any jax transform).

    ``params`` is ``nnx_params(model)``; ``apply(params, *args, rng=None, **kwargs)`` runs a copy of
    the model whose params are ``params`` and returns its output; LoRA dropout draws from ``rng``
    when one is given (training) and is off otherwise. The model itself is not changed.

        apply, params = nnx_functional(model)
        loss_fn = lambda p, batch, rng: loss(apply(p, batch["x"], rng=rng), batch["y"])
        step = lora_jax.make_train_step(loss_fn, tx, lora_jax.trainable_mask(params, config))
    """
    from flax import traverse_util

    graphdef, state = nnx.split(model)

    def apply(params: dict, *args: Any, rng: Array | None = None, **kwargs: Any) -> Any:
        flat = {tuple(str(k) for k in key): value for key, value in traverse_util.flatten_dict(dict(params)).items()}

        found: set = set()

        def pick(path: tuple, leaf: Any) -> Any:
            names = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
            names = names[:-1] if names and names[-1] == "value" else names
            found.add(names)
            value = flat.get(names, leaf)
            if value is not leaf and np.shape(value) != np.shape(leaf) and not isinstance(leaf, meta.AxisMetadata):
                raise ValueError(f"params['{'/'.join(names)}'] has shape {tuple(np.shape(value))}, the model's "
                                 f"variable {tuple(np.shape(leaf))}: give params shaped like nnx_params(model)")
            return value

        copy = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(  # a box (quantized kernel) is one leaf
            pick, state, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)))
        unknown = sorted("/".join(k) for k in flat.keys() - found)
        if unknown:
            raise ValueError(f"params {unknown[:5]} are not variables of this NNX model")
        streams = None
        for _, module in nnx.iter_modules(copy):
            if is_adapted(module):
                module.deterministic = rng is None or module.lora_rngs is None
                if rng is not None and module.lora_rngs is not None:
                    streams = streams or nnx.Rngs(**{module.lora_config.dropout_rng: rng})
                    module.lora_rngs = streams  # one stream for the model: each layer draws its own key
        return copy(*args, **kwargs)

    return apply, nnx_params(model)


def nnx_trainable(model: nnx.Module, config: LoraConfig) -> Any:
    """An NNX filter for what trains under ``config``: the LoRA params, biases per ``config.bias`` and
    every param of ``config.modules_to_save`` (the same leaves as ``trainable_mask``). Without
    modules to save or bias training, ``nnx.LoRAParam`` alone is the same filter.

        optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx_trainable(model, config))
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx_trainable(model, config)))(model)
    """
    from flax import traverse_util


    flat = traverse_util.flatten_dict(trainable_mask(nnx_params(model), config))
    chosen = frozenset(key for key, trains in flat.items() if trains)

    def selects(path: tuple, value: Any) -> bool:
        return isinstance(value, nnx.Param) and tuple(str(p) for p in path) in chosen

    return selects
