"""A quantized frozen base (QLoRA): kernels stored as int8 or NF4 and dequantized when a layer reads them.

``quantize(params, config, "nf4")`` replaces the frozen kernels of the targeted layers (or of every
layer but ``modules_to_save``, with ``layers="all"``) by ``QuantizedKernel`` boxes. A box is flax
axis metadata whose ``unbox`` dequantizes: every linen layer reads its kernel through
``self.param``, which unboxes, so the model runs unchanged on the quantized tree, and XLA sees the
dequantization next to the matmul that uses it. Given an NNX model, ``quantize`` changes it in
place: each chosen kernel becomes a ``QuantizedParam`` holding the box, which dequantizes when the
layer reads ``kernel[...]``. LoRA factors stay in ``LoraConfig.param_dtype``; the boxes sit in the
frozen partition, so they are never differentiated or updated. ``merge`` returns the adapted
kernels dequantized and merged (plain arrays); ``merge_requantized`` quantizes them again in their
own format and reports the error that adds. PEFT export is unchanged (adapters only).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from lora_jax import LoraConfig, lora
    >>> config = LoraConfig(rank=2, targets=("layers_0",))
    >>> model = lora(nn.Sequential([nn.Dense(128), nn.Dense(2)]), config)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
    >>> small = quantize(params, config, "nf4")
    >>> type(small["layers_0"]["kernel"]).__name__, small["layers_0"]["kernel"].shape
    ('QuantizedKernel', (64, 128))
    >>> model.apply({"params": small}, jnp.ones((1, 64))).shape
    (1, 2)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct, traverse_util
from flax.core import meta
from flax.nnx import variablelib

from .config import LoraConfig
from .core.quant import (Int8Weight, Nf4Weight, dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4,
                         quantize_stacked)
from .targets import any_matches, path_str, validate_patterns

Params = Mapping[str, Any]
Format = Literal["int8", "nf4"]


class QuantizedKernel(struct.PyTreeNode, meta.AxisMetadata):
    """A frozen kernel stored quantized; ``unbox()`` gives it back in ``dtype``.

    A stack of layers (``nn.scan``, ``nnx.vmap``) is quantized layer by layer: every leaf carries the
    stack's leading axes, so a scan slices the box like a plain kernel and ``unbox`` of a slice gives
    one layer.
    """

    weight: Any  # Int8Weight | Nf4Weight
    dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def format(self) -> Format:
        return "nf4" if isinstance(self.weight, Nf4Weight) else "int8"

    @property
    def shape(self) -> tuple[int, ...]:
        if isinstance(self.weight, Nf4Weight):
            return tuple(self.weight.data.shape[:-1]) + tuple(self.weight.shape)
        return tuple(self.weight.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and scales."""
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(self.weight))

    def unbox(self) -> jax.Array:
        if isinstance(self.weight, Nf4Weight):
            return dequantize_nf4(self.weight, self.dtype)
        return dequantize_int8(self.weight, self.dtype)

    def replace_boxed(self, val: Any) -> Any:
        return val  # a new value (a merged kernel) is a plain array

    def add_axis(self, index: int, params: dict[Any, Any]) -> "QuantizedKernel":
        return self  # the leaves carry the stack's axes themselves (see the class docstring)

    def remove_axis(self, index: int, params: dict[Any, Any]) -> "QuantizedKernel":
        return self


class QuantizedParam(nnx.Variable):
    """An NNX kernel stored as a ``QuantizedKernel``: reading it (``variable[...]``) dequantizes, so
    the layer's own ``__call__`` runs unchanged. It is a frozen variable, not an ``nnx.Param``: an
    optimizer or ``nnx.grad`` over ``nnx.Param`` (full fine-tuning) leaves it alone."""

    def get_value(self, *, index: Any = variablelib.MISSING) -> Any:
        box = self.get_raw_value()
        if not isinstance(box, QuantizedKernel) or not all(isinstance(x, jax.Array) for x in jax.tree.leaves(box)):
            return box  # abstract or printed state: the box as it is
        value = box.unbox()
        return value if isinstance(index, variablelib.Missing) else value[index]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantized_weight(value: jax.Array, format: Format, block: int, n_stacked: int) -> Int8Weight | Nf4Weight:
    if format == "nf4":
        return quantize_stacked(quantize_nf4, value, n_stacked, block=block)
    return quantize_stacked(quantize_int8, value, n_stacked)


def _quantize_array(value: Any, format: Format, block: int, n_stacked: int) -> QuantizedKernel:
    return QuantizedKernel(_quantized_weight(value, format, block, n_stacked), str(np.dtype(value.dtype)))


def _selector(config: LoraConfig, layers: str) -> Callable[[tuple[str, ...]], bool]:
    def selected(module: tuple[str, ...]) -> bool:
        where = path_str(module)
        if layers == "targets":
            return any_matches(config.targets, where) and not any_matches(config.exclude, where)
        return not _under(config.modules_to_save, module)

    return selected


def _under(patterns: Sequence[str], module: tuple[str, ...]) -> bool:
    """Whether ``module`` or a module above it matches one of ``patterns``."""
    return any(any_matches(patterns, path_str(module[:i])) for i in range(1, len(module) + 1))


def quantize(params: Params | nnx.Module, config: LoraConfig, format: Format = "nf4",
             layers: Literal["targets", "all"] = "targets", *, block: int = 64, stacked: Sequence[str] = ()) -> Any:
    """``params`` with frozen kernels quantized (``format`` 'int8': per-output-channel absmax;
    'nf4': NormalFloat4, ``block`` weights per absmax, double-quantized scales).

    Args:
      params: a linen param tree (base or LoRA), or an NNX model (changed in place and returned).
      config: selects the layers: its targets (minus exclude), or with ``layers='all'`` every layer
        with a kernel of two or more axes except ``modules_to_save`` (they train).
      format: 'int8' | 'nf4'.
      block: NF4 weights per absmax scale.
      stacked: linen only: path patterns of ``nn.scan`` (or ``nn.vmap``) modules (e.g. 'blocks'): every
        kernel below one carries a leading axis of layers, and each layer is quantized on its own.
        NNX stacks are found from the layer's own shape.

    Returns:
      The tree with those kernels as ``QuantizedKernel`` boxes (every other leaf the same array), or
      the NNX model with those kernels as ``QuantizedParam``.
    """
    if format not in ("int8", "nf4"):
        raise ValueError(f"format must be 'int8' or 'nf4', got {format!r}")
    if layers not in ("targets", "all"):
        raise ValueError(f"layers must be 'targets' or 'all', got {layers!r}")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive integer (weights per NF4 scale), got {block!r}")
    validate_patterns(stacked)
    selected = _selector(config, layers)
    if isinstance(params, nnx.Module):
        if stacked:
            raise ValueError("stacked= is for linen param trees; an NNX layer's stack is read from its own shape")
        return _quantize_nnx(params, selected, format, block, layers, config)
    flat = traverse_util.flatten_dict(dict(params))
    out, chosen = dict(flat), []
    for key, value in flat.items():
        if key[-1] != "kernel" or isinstance(value, meta.AxisMetadata) or np.ndim(value) < 2:
            continue
        if selected(key[:-1]):
            n_stacked = int(_under(stacked, key[:-1]))
            if np.ndim(value) - n_stacked < 2:
                raise ValueError(f"'{path_str(key)}' has shape {np.shape(value)}: too few axes for a stack of kernels "
                                 f"(check stacked={list(stacked)})")
            out[key] = _quantize_array(value, format, block, n_stacked)
            chosen.append(path_str(key[:-1]))
    _check_chosen(chosen, layers, config)
    return traverse_util.unflatten_dict(out)


def _check_chosen(chosen: list, layers: str, config: LoraConfig) -> None:
    if not chosen:
        raise ValueError(f"quantize: no kernel matched ({layers}: targets {list(config.targets)}); "
                         f"nothing would be quantized")


def _quantize_nnx(model: nnx.Module, selected, format: Format, block: int, layers: str,
                  config: LoraConfig) -> nnx.Module:
    from .nnx_transform import nnx_layer_kind, one_layer_ndim

    chosen = []
    for path, module in nnx.iter_modules(model):
        kind = nnx_layer_kind(module)
        # a QuantizedParam is no nnx.Param: a layer quantized before is left as it is
        if kind in (None, "embed") or not isinstance(getattr(module, "kernel", None), nnx.Param):
            continue
        if not selected(tuple(str(p) for p in path)):
            continue
        kernel = module.kernel[...]
        n_stacked = kernel.ndim - one_layer_ndim(module, kind)
        module.kernel = QuantizedParam(_quantize_array(kernel, format, block, n_stacked))
        chosen.append(path)
    _check_chosen(chosen, layers, config)
    return model


def is_quantized(leaf: Any) -> bool:
    """Whether ``leaf`` is a quantized kernel box."""
    return isinstance(leaf, QuantizedKernel)


def unbox_but_quantized(tree: Any) -> Any:
    """Unbox sharding boxes (``nn.Partitioned``), keep quantized kernels boxed (they stay small)."""
    def unbox(x: Any) -> Any:
        return x.unbox() if isinstance(x, meta.AxisMetadata) and not isinstance(x, QuantizedKernel) else x

    return jax.tree.map(unbox, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def requantize_like(box: QuantizedKernel, value: jax.Array) -> QuantizedKernel:
    """``value`` (a kernel of ``box``'s shape) quantized in ``box``'s format, block and stacking."""
    weight = box.weight
    if isinstance(weight, Nf4Weight):
        n_stacked = weight.data.ndim - 1
        options = {"block": weight.block, "scale_block": weight.scale_block}
        return QuantizedKernel(quantize_stacked(quantize_nf4, value, n_stacked, **options), box.dtype)
    assert isinstance(weight, Int8Weight)
    contracted = tuple(i for i, n in enumerate(weight.scale.shape) if n == 1)  # the scale's size-one axes
    return QuantizedKernel(quantize_int8(value, axes=contracted), box.dtype)


def merge_requantized(params: Params, config: LoraConfig) -> tuple[dict, dict[str, dict[str, float]]]:
    """``merge`` on a quantized base, each merged kernel quantized again in its own format.

    Returns:
      ``(merged, added_error)``: the merged tree with ``QuantizedKernel`` boxes where ``params`` had
      them, and per layer the error re-quantization adds to the exactly merged kernel (dequantized
      base + update): ``relative`` = ||Q(W') - W'|| / ||W'|| (Frobenius) and ``max_abs``.

    >>> import jax.numpy as jnp
    >>> params = {"fc": {"kernel": jnp.linspace(-1, 1, 128).reshape(16, 8),
    ...                  "lora_A": jnp.ones((16, 1)), "lora_B": jnp.full((1, 8), 0.01)}}
    >>> config = LoraConfig(rank=1, alpha=1.0, targets=("fc",))
    >>> merged, error = merge_requantized(quantize(params, config, "int8"), config)
    >>> type(merged["fc"]["kernel"]).__name__, error["fc"]["relative"] < 0.01
    ('QuantizedKernel', True)
    """
    from .merge import merge

    boxes = {key[:-1]: value for key, value in traverse_util.flatten_dict(dict(params)).items()
             if isinstance(value, QuantizedKernel)}
    if not boxes:
        raise ValueError("merge_requantized: params hold no quantized kernel (lora_jax.quantize makes them); "
                         "use lora_jax.merge")
    flat = traverse_util.flatten_dict(merge(params, config))
    report = {}
    for module, box in boxes.items():
        exact = flat[module + ("kernel",)]
        if isinstance(exact, QuantizedKernel):
            continue  # not adapted: the box is unchanged
        again = requantize_like(box, exact)
        diff = again.unbox().astype(jnp.float32) - exact.astype(jnp.float32)
        report[path_str(module)] = {
            "relative": float(jnp.linalg.norm(diff.ravel()) / jnp.maximum(jnp.linalg.norm(exact.ravel()), 1e-30)),
            "max_abs": float(jnp.abs(diff).max())}
        flat[module + ("kernel",)] = again
    return traverse_util.unflatten_dict(flat), report
