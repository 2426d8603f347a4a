"""``lora(model, config)``: the Flax module transform that adds LoRA beside targeted kernels.

The transformed module shares its scope with the wrapped one (``nn.share_scope``), so the param
tree is the base tree plus ``lora_A`` / ``lora_B`` leaves inside each targeted layer. Layers are
adapted by a method interceptor: it sees every module call, and for targeted layers returns
``base(x) + scale * f(dropout(x); A, B)`` (or the config's variant of it, e.g. DoRA) through
``layers.adapted_layer_output``. Base weights are
read, never written.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
from flax import traverse_util

from ..config import LoraConfig
from .layers import (ADAPTED_METHODS, SUPPORTED, adapted_layer_output, in_internal_call, layer_kind, quantized_base_output,
                     quantized_kernel)
from ..param_targets import AdaptedParam, box_parameter_targets, factors_key, init_parameter_factors, targeted_keys
from ..target_report import TargetReport, check_targets
from ..targets import matches, path_str


class LoraModule(nn.Module):
    """A Flax model with LoRA on the layers selected by ``config``; same call signature as ``base``.

    Attributes:
      base: the model to adapt (any linen Module).
      config: the LoRA hyper-parameters and targets.
    """

    base: nn.Module
    config: LoraConfig

    def setup(self) -> None:
        nn.share_scope(self, self.base)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call_method("__call__", *args, **kwargs)

    def call_method(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``base.<method>`` with LoRA active, e.g. ``model.apply(p, x, method='call_method',
        ...)``; ``__call__`` is ``call_method('__call__', ...)``."""
        record = TargetReport(hits={t: 0 for t in self.config.targets})
        dropout_on = self.config.dropout > 0 and self.scope.has_rng(self.config.dropout_rng)
        with nn.intercept_methods(self._interceptor(record, dropout_on)):
            if self.config.target_parameters:
                out = self._call_with_parameter_targets(method, args, kwargs)
            else:
                out = getattr(self.base, method)(*args, **kwargs)
        # Targets are resolved when the adapter is created; a later call may use only some layers (an
        # `encode` method), which is fine as long as the params hold an adapter at all.
        if self.config.targets and (self.scope.is_mutable_collection("params")
                                    or not (record.targeted or self._holds_adapter())):
            check_targets(self.config, record, ", ".join(c.__name__ for c in SUPPORTED))
        return out

    def _call_with_parameter_targets(self, method: str, args: tuple, kwargs: dict) -> Any:
        """Run the base model on this scope's variables with each targeted raw param read through its
        ``AdaptedParam`` box (``W + scale·A·B`` wherever the model reads it), in a nested apply that
        sees the same paths; at init, the parameter targets' factors are created beside their params
        and everything the nested call created is written into this scope."""
        scope = self.scope
        variables = flax.core.unfreeze(scope.variables())
        rngs = {name: self.make_rng(name) for name in scope.rngs}
        inner = self.base.clone(parent=None, name=None)
        creating = scope.is_mutable_collection("params")
        if creating and not variables.get("params"):  # model.init: the base's own params first
            out, new = inner.init_with_output(rngs, *args, method=method, **kwargs)
        else:
            params = variables.get("params", {})
            flat = traverse_util.flatten_dict(params)
            unadapted = [k for k in targeted_keys(flat, self.config) if factors_key(k) + ("lora_A",) not in flat]
            if unadapted and not creating:
                raise ValueError(f"parameters {[path_str(k) for k in unadapted][:5]} are LoRA parameter targets but "
                                 f"the params hold no factors for them: initialise the adapter with model.init(...) "
                                 f"or lora_jax.init_lora_params(model, base_params, rng, ...)")
            boxed = {**variables, "params": box_parameter_targets(params, self.config)}
            result = inner.apply(boxed, *args, rngs=rngs, method=method, mutable=scope.mutable, **kwargs)
            out, new = result if scope.mutable else (result, {})
        new = flax.core.unfreeze(new)
        if creating:
            params = jax.tree.map(lambda leaf: leaf.value if isinstance(leaf, AdaptedParam) else leaf,
                                  new.get("params", variables.get("params", {})),
                                  is_leaf=lambda leaf: isinstance(leaf, AdaptedParam))
            fresh = traverse_util.flatten_dict(params)
            missing = {k: v for k, v in init_parameter_factors(params, self.config, self.make_rng("params")).items()
                       if k not in fresh}
            new["params"] = traverse_util.unflatten_dict({**fresh, **missing})
        for collection, tree in new.items():
            for key, value in traverse_util.flatten_dict(tree).items():
                target = scope
                for name in key[:-1]:
                    target = target.push(name, reuse=True)
                target.put_variable(collection, key[-1], value)
        return out

    def _holds_adapter(self) -> bool:
        flat = traverse_util.flatten_dict(nn.meta.unbox(self.scope.variables().get("params", {})))
        return any(key[-1] == "lora_A" for key in flat)

    def _interceptor(self, record: TargetReport, dropout_on: bool):
        config = self.config

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if in_internal_call():
                return next_fun(*args, **kwargs)
            kind = layer_kind(module)
            if kind is None or module.scope is None or context.method_name not in ADAPTED_METHODS[kind]:
                return next_fun(*args, **kwargs)
            path = path_str(module.scope.path)
            record.adaptable[path] = kind
            selected = [t for t in config.targets if matches(t, path)]
            for t in selected:
                record.hits[t] += 1
            box = quantized_kernel(module, kind)
            base = next_fun if box is None else \
                (lambda *a, **k: quantized_base_output(module, kind, box, a, k, context.method_name))
            if not config.selects(path):
                return base(*args, **kwargs)
            record.targeted.add(path)
            out = base(*args, **kwargs)
            key = None
            if dropout_on:
                if not module.scope.has_rng(config.dropout_rng):
                    raise ValueError(
                        f"LoRA dropout is on (rate {config.dropout}) and the '{config.dropout_rng}' rng stream was "
                        f"passed to apply, but layer '{path}' cannot see it: it runs inside a lifted transform "
                        f"(nn.scan / nn.vmap) that does not split that stream, so its dropout would silently be "
                        f"off. Add it to the transform's split_rngs, e.g. nn.scan(..., split_rngs={{'params': "
                        f"True, '{config.dropout_rng}': True}}).")
                key = module.scope.make_rng(config.dropout_rng)
            return adapted_layer_output(module, kind, args, kwargs, config, path, key, out, method=context.method_name)

        return interceptor


def lora(model: Any, config: LoraConfig, *, rngs: Any = None) -> Any:
    """Return ``model`` with LoRA on the layers ``config.targets`` selects.

    ``lora_jax.lora`` also takes a ``flax.nnx`` model, adapted in place and returned (it needs
    ``rngs=nnx.Rngs(...)``; see ``lora_jax.nnx.transform.lora_nnx``). This is the linen form.

    The result is a linen Module with the same call signature; its params are ``model``'s params
    plus ``lora_A`` / ``lora_B`` beside each targeted kernel, and it computes exactly ``model``'s
    output while every ``lora_B`` is zero. LoRA dropout is active only when the
    ``config.dropout_rng`` stream is passed to ``apply`` (training); omit it for evaluation.

    Args:
      model: any linen Module (the base, untouched).
      config: rank, alpha, targets and the rest of the adapter's settings.

    Returns:
      A ``LoraModule``: call ``init`` / ``apply`` on it as on ``model``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> base = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> model = lora(base, LoraConfig(rank=2, alpha=4, targets=("layers_0",)))
    >>> params = model.init(jax.random.key(0), jnp.ones((5, 6)))["params"]
    >>> jax.tree.map(jnp.shape, params["layers_0"])
    {'bias': (8,), 'kernel': (6, 8), 'lora_A': (6, 2), 'lora_B': (2, 8)}
    >>> model.apply({"params": params}, jnp.ones((5, 6))).shape
    (5, 3)
    """
    if rngs is not None:
        raise TypeError("rngs= is for NNX models; a linen model takes its rngs at init / init_lora_params")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lora() takes a flax.linen Module or a flax.nnx Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora() takes a LoraConfig, got {type(config).__name__}")
    return LoraModule(base=model, config=config)


def init_lora_params(
    model: LoraModule,
    base_params: dict,
    rng: jax.Array,
    *args: Any,
    **kwargs: Any,
) -> dict:
    """Add fresh ``lora_A`` / ``lora_B`` leaves to an existing (e.g. pretrained) base param tree.

    Traces the transformed model once on example inputs ``*args`` with the base params given, so
    only the missing LoRA leaves are created (computed under ``jax.jit``, which keeps only the work
    they need); every base leaf is returned as the same array.

    Args:
      model: the ``lora(...)`` model.
      base_params: the base model's params (e.g. pretrained).
      rng: key for lora_A's initialiser.
      *args, **kwargs: example inputs of the model's ``__call__`` (their values do not matter).

    Returns:
      The param tree with ``lora_A`` / ``lora_B`` added beside each targeted kernel.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> base = nn.Sequential([nn.Dense(8), nn.Dense(3)])
    >>> base_params = base.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
    >>> model = lora(base, LoraConfig(rank=2, targets=("layers_1",)))
    >>> params = init_lora_params(model, base_params, jax.random.key(1), jnp.ones((1, 6)))
    >>> sorted(params["layers_1"]), params["layers_0"]["kernel"] is base_params["layers_0"]["kernel"]
    (['bias', 'kernel', 'lora_A', 'lora_B'], True)
    """
    base_keys = set(traverse_util.flatten_dict(base_params))

    def new_leaves(base: dict, rng: jax.Array) -> dict:
        _, variables = model.apply({"params": base}, *args, rngs={"params": rng}, mutable=["params"], **kwargs)
        return {key: value for key, value in traverse_util.flatten_dict(variables["params"]).items()
                if key not in base_keys}

    # jitted, and returning only the new leaves: XLA computes nothing of the forward pass they do not
    # need, so no activation or (on a quantized base) dequantized kernel is ever materialised here
    fresh = jax.jit(new_leaves)(base_params, rng)
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base_params), **fresh})
