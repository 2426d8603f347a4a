"""``quantize_nnx``: an NNX model's chosen kernels stored quantized in place, each as a
``QuantizedParam`` (a frozen variable holding a ``QuantizedKernel``).

    quantize_nnx(model, config, "nf4")      # lora_jax.quantize(model, ...) comes here
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from flax import nnx

from ..config import LoraConfig, require_config
from ..quantize import VARIANT_LEAVES, Format, KernelQuantizer, check_chosen, quantize_array, variant_before_quantize
from .param_targets import raw_params
from .transform import is_adapted, nnx_layer_kind, one_layer_ndim, quantized_class
from .variables import QuantizedParam


def quantize_nnx(model: nnx.Module, config: LoraConfig, format: Format = "nf4",
                 layers: Literal["targets", "all"] = "targets", *, block: int = 64, stacked: Sequence[str] = (),
                 errors: dict | None = None) -> nnx.Module:
    """``lora_jax.quantize`` for an NNX model: each chosen kernel becomes a ``QuantizedParam`` in place
    (a stack made under ``nnx.vmap`` is found from the layer's own shape), and the model is returned."""
    require_config(config, "quantize")
    if stacked:
        raise ValueError("stacked= is for linen param trees; an NNX layer's stack is read from its own shape")
    quantizer = KernelQuantizer(config, format, layers, block=block, stacked=stacked, measure=True)
    _quantize_layers(model, quantizer, layers, config)
    if errors is not None:
        errors.update(quantizer.errors)
    return model


def _quantize_layers(model: nnx.Module, quantizer: KernelQuantizer, layers: str, config: LoraConfig) -> nnx.Module:
    chosen, already = [], False
    for path, module in nnx.iter_modules(model):
        kind = nnx_layer_kind(module)
        already = already or isinstance(getattr(module, "kernel", None), QuantizedParam)
        # a QuantizedParam is no nnx.Param: a layer quantized before is left as it is
        if kind in (None, "embed") or not isinstance(getattr(module, "kernel", None), nnx.Param):
            continue
        if not quantizer.selected(tuple(str(p) for p in path)):
            continue
        where = "/".join(str(p) for p in path)
        held = [leaf for leaf in VARIANT_LEAVES if hasattr(module, leaf)]
        if held:
            raise variant_before_quantize(where, held)
        chosen.append((where, module, kind))
    for where, module, kind in chosen:
        kernel = module.kernel[...]
        n_stacked = kernel.ndim - one_layer_ndim(module, kind)
        box, figures = quantize_array(kernel, quantizer.format, quantizer.block, n_stacked,
                                       config.quantized_compute_dtype, quantizer.measure)
        quantizer.record(where, figures)
        module.kernel = QuantizedParam(box)
        if not is_adapted(module):  # an adapted layer's call already dequantizes at the point of use
            module.__class__ = quantized_class(type(module))
    already = _quantize_parameter_targets(model, quantizer, config) or already
    check_chosen(quantizer.chosen, layers, config, already)
    return model


def _quantize_parameter_targets(model: nnx.Module, quantizer: KernelQuantizer, config: LoraConfig) -> bool:
    """Each raw ``nnx.Param`` that ``config.target_parameters`` selects (experts (E, p, q): codes per
    expert) becomes a ``QuantizedParam``; reading it dequantizes, and ``lora_jax.ragged_dot`` /
    ``einsum`` dequantize it at the point of use. Returns whether one was quantized before."""
    if not config.target_parameters:
        return False
    already = False
    for key, module, variable in raw_params(model):
        if not quantizer.parameter_target(key):
            continue
        if isinstance(variable, QuantizedParam):
            already = True
            continue
        value = variable[...]
        quantized = quantizer(key, value)  # the tree quantizer's rule for a parameter target: codes per expert
        if quantized is not value:
            setattr(module, key[-1], QuantizedParam(quantized))
    return already
