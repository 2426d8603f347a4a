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

import dataclasses
import functools
import warnings
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from .boxes import replicated_like
from .config import LoraConfig, require_config
from .merge import merge
from .core.dequantized_call import dequantized_call
from .core.variants import ADAPTER_LEAVES
from .safetensors_io import release_freed_memory
from .core.quant import (Int8Weight, Nf4Weight, dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4,
                         quantize_stacked)
from .targets import any_matches, path_str, validate_patterns

VARIANT_LEAVES = ADAPTER_LEAVES[2:]  # every variant's leaves beside lora_A / lora_B

Params = Mapping[str, Any]
Format = Literal["int8", "nf4"]


class QuantizedKernel(struct.PyTreeNode, meta.AxisMetadata):
    """A frozen kernel stored quantized; ``unbox()`` gives it back in ``dtype``.

    A stack of layers (``nn.scan``, ``nnx.vmap``) is quantized layer by layer: every leaf carries the
    stack's leading axes, so a scan slices the box like a plain kernel and ``unbox`` of a slice gives
    one layer.
    """

    weight: Any  # Int8Weight | Nf4Weight
    dtype: str = struct.field(pytree_node=False, default="float32")  # the original kernel's: unbox, merge
    compute_dtype: str | None = struct.field(pytree_node=False, default=None)  # a layer's matmul; None: dtype

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
        """The kernel dequantized into its original dtype (what ``merge`` and a plain read see)."""
        return dequantize(self.weight, self.dtype)

    def dequantizer(self) -> Callable[[Any], jax.Array]:
        """``weight -> kernel`` in the compute dtype, for ``core.dequantized_call`` (a layer's matmul)."""
        return functools.partial(dequantize, dtype=self.compute_dtype or self.dtype)

    def apply(self, fn: Callable[[jax.Array, jax.Array, Any], jax.Array], x: jax.Array, bias: Any = None) -> jax.Array:
        """``fn(x, kernel, bias)`` with the kernel dequantized at the point of use, in the forward and
        the backward pass (``core.dequantized_call``): nothing kernel-sized is kept between them."""
        return dequantized_call(fn, self.weight, self.dequantizer(), x, bias)

    stays_boxed = True  # lora_jax.boxes: training keeps the codes, not the float kernel

    def leaf_shardings(self, sharding: Sharding) -> "QuantizedKernel":
        """Shardings for the codes and scales, from the kernel's own: int8 codes (the kernel's shape)
        take it as it is and the per-output scales its output axes; NF4's flat packed codes and block
        scales have no kernel axes and are replicated (at 4 bits, 1/8 of the float32 kernel)."""
        if self.format == "int8" and isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(self.shape) - len(sharding.spec))
            scale_spec = PartitionSpec(*(None if d == 1 else s for d, s in zip(self.weight.scale.shape, spec)))
            return self.replace(weight=dataclasses.replace(self.weight, data=sharding,
                                                           scale=NamedSharding(sharding.mesh, scale_spec)))
        replicated = replicated_like(sharding)
        return jax.tree.map(lambda _: replicated, self)

    def replace_boxed(self, val: Any) -> Any:
        return val  # a new value (a merged kernel) is a plain array

    def add_axis(self, index: int, params: dict[Any, Any]) -> "QuantizedKernel":
        return self  # the leaves carry the stack's axes themselves (see the class docstring)

    def remove_axis(self, index: int, params: dict[Any, Any]) -> "QuantizedKernel":
        return self


def dequantize(weight: Int8Weight | Nf4Weight, dtype: Any = jnp.float32) -> jax.Array:
    """An int8 or NF4 weight (one layer, or a stack of them) back as an array of ``dtype``."""
    if isinstance(weight, Nf4Weight):
        return dequantize_nf4(weight, dtype)
    return dequantize_int8(weight, dtype)


MAX_BLOCK = 4096  # NF4 weights per absmax: larger blocks only pad small layers and lose precision
# The relative error of the ordinary weights (|w| up to 6 rms) that a Gaussian-like kernel takes, and
# above which a layer's weights are not what the format expects (one outlier sets the scale of its
# column, block and group of blocks, and the rest is rounded coarsely): quantize warns.
_USUAL_ERROR = {"int8": 0.008, "nf4": 0.09}
ERROR_WARNING = {"int8": 0.04, "nf4": 0.15}


def _quantized_weight(value: jax.Array, format: Format, block: int, n_stacked: int) -> Int8Weight | Nf4Weight:
    if format == "nf4":
        return quantize_stacked(quantize_nf4, value, n_stacked, block=block)
    return quantize_stacked(quantize_int8, value, n_stacked)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantized_and_checked(value: jax.Array, format: Format, block: int, n_stacked: int, errors: bool) -> tuple:
    """The quantized weight and ``_check``'s figures (with ``errors`` False: only whether the kernel is
    finite, NaN for the rest), in one compiled program per kernel shape."""
    weight = _quantized_weight(value, format, block, n_stacked)
    if errors:
        return weight, _check(value, weight)
    nan = jnp.float32(jnp.nan)
    return weight, (jnp.isfinite(value).all(), nan, nan, nan)


def _check(value: jax.Array, weight: Int8Weight | Nf4Weight) -> tuple[jax.Array, ...]:
    """(all finite, ||Q(W) - W|| / ||W||, max |Q(W) - W|, the same relative error on the ordinary weights:
    those within 6 rms, which leaves out outliers that dominate the norm and hide what they cost the rest)."""
    w = value.astype(jnp.float32)
    diff = dequantize(weight) - w
    square = jnp.sum(w * w)
    ordinary = jnp.abs(w) <= 6.0 * jnp.sqrt(square / w.size)
    ordinary_square = jnp.sum(jnp.where(ordinary, w * w, 0.0))
    return (jnp.isfinite(w).all(), jnp.sqrt(jnp.sum(diff * diff) / jnp.maximum(square, 1e-30)), jnp.abs(diff).max(),
            jnp.sqrt(jnp.sum(jnp.where(ordinary, diff * diff, 0.0)) / jnp.maximum(ordinary_square, 1e-30)))


def quantize_array(value: Any, format: Format, block: int, n_stacked: int,
                    compute_dtype: str | None = None, errors: bool = True) -> tuple[QuantizedKernel, tuple]:
    """The kernel as a ``QuantizedKernel`` box, and ``_check``'s figures for it."""
    weight, figures = _quantized_and_checked(value, format, block, n_stacked, errors)
    return QuantizedKernel(weight, str(np.dtype(value.dtype)), compute_dtype), figures


def _selector(config: LoraConfig, layers: str) -> Callable[[tuple[str, ...]], bool]:
    def selected(module: tuple[str, ...]) -> bool:
        where = path_str(module)
        if layers == "targets":
            return config.selects(where)
        return not _under(config.modules_to_save, module)

    return selected


def _under(patterns: Sequence[str], module: tuple[str, ...]) -> bool:
    """Whether ``module`` or a module above it matches one of ``patterns``."""
    return any(any_matches(patterns, path_str(module[:i])) for i in range(1, len(module) + 1))


def quantize(params: Params, config: LoraConfig, format: Format = "nf4",
             layers: Literal["targets", "all"] = "targets", *, block: int = 64, stacked: Sequence[str] = (),
             errors: dict | None = None) -> Any:
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

      errors: a dict to fill with each quantized layer's error, ``{path: {'relative': ||Q(W) - W|| /
        ||W||, 'max_abs': ..., 'relative_ordinary': the relative error of the weights within 6 rms}}`` (a
        layer whose ordinary weights change by more than ``ERROR_WARNING`` is also warned of).

    Returns:
      The tree with those kernels as ``QuantizedKernel`` boxes (every other leaf the same array), or
      the NNX model with those kernels as ``QuantizedParam``.

    Raises:
      ValueError: a chosen kernel holds NaN or inf; a chosen layer already has variant leaves (a DoRA magnitude, PiSSA's initial factors)
        (computed from the float kernel: quantize first, then add the adapter); ``params`` are
        already quantized; a kernel looks stacked (``nn.scan``) but ``stacked=`` does not name it.
    """
    require_config(config, "quantize")
    quantizer = KernelQuantizer(config, format, layers, block=block, stacked=stacked, measure=True)
    flat = traverse_util.flatten_dict(dict(params))
    for key, value in flat.items():
        if quantizer.wants(key, np.shape(value)) and not isinstance(value, meta.AxisMetadata):
            _check_layer(key[:-1], value, flat, quantizer)
    out = {key: quantizer(key, value) for key, value in flat.items()}
    check_chosen(quantizer.chosen, layers, config, any(isinstance(v, QuantizedKernel) for v in flat.values()))
    params = traverse_util.unflatten_dict(out)
    if errors is not None:
        errors.update(quantizer.errors)
    return params


class KernelQuantizer:
    """``(key, leaf) -> leaf``: a kernel that ``quantize`` would choose, quantized; any other leaf as it is.

    One leaf at a time, so a loader can quantize each kernel as it reads it and drop the float copy
    before reading the next (``lora_jax.models.from_pretrained(..., quantize='nf4')``). ``chosen``
    lists the layer paths quantized so far. A non-finite kernel is refused. With ``measure``
    (``quantize`` sets it), ``errors`` holds the error each kernel took (``||Q(W) - W|| / ||W||``,
    the largest change, the error of the ordinary weights) and a large one is warned of; a loader
    leaves it off: the dequantized copy it needs would weigh on the load's peak memory.

    >>> import jax.numpy as jnp
    >>> from lora_jax import LoraConfig
    >>> q = KernelQuantizer(LoraConfig(rank=2, targets=("fc",)), "int8")
    >>> type(q(("fc", "kernel"), jnp.ones((4, 4)))).__name__, q(("fc", "bias"), jnp.ones(4)).shape, q.chosen
    ('QuantizedKernel', (4,), ['fc'])
    """

    def __init__(self, config: LoraConfig, format: Format = "nf4", layers: Literal["targets", "all"] = "targets", *,
                 block: int = 64, stacked: Sequence[str] = (), measure: bool = False):
        if format not in ("int8", "nf4"):
            raise ValueError(f"format must be 'int8' or 'nf4', got {format!r}")
        if layers not in ("targets", "all"):
            raise ValueError(f"layers must be 'targets' or 'all', got {layers!r}")
        if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= MAX_BLOCK:
            raise ValueError(f"block must be an integer from 1 to {MAX_BLOCK} (weights per NF4 scale; 64 is the "
                             f"QLoRA paper's), got {block!r}")
        validate_patterns(stacked)
        self.config, self.format, self.block, self.stacked = config, format, block, tuple(stacked)
        self.measure = measure
        self.selected = _selector(config, layers)
        self.chosen: list[str] = []
        self.errors: dict[str, dict[str, float]] = {}  # per layer: relative and max_abs error of quantizing

    def wants(self, key: tuple[str, ...], shape: tuple[int, ...]) -> bool:
        """Whether the leaf at ``key`` of ``shape`` is a kernel to quantize: a selected layer's kernel,
        or a raw param ``config.target_parameters`` selects (experts)."""
        if len(shape) < 2:
            return False
        return (key[-1] == "kernel" and self.selected(key[:-1])) or self.parameter_target(key)

    def parameter_target(self, key: tuple[str, ...]) -> bool:
        """Whether the leaf at ``key`` is a raw param ``config.target_parameters`` selects."""
        return key[-1] not in ("lora_A", "lora_B") and self.config.selects_parameter(path_str(key))

    def __call__(self, key: tuple[str, ...], value: Any) -> Any:
        if isinstance(value, meta.AxisMetadata) or not self.wants(key, np.shape(value)):
            return value
        if self.parameter_target(key) and key[-1] != "kernel":  # experts (E, p, q): codes per expert
            n_stacked, where = np.ndim(value) - 2, path_str(key)
        else:  # a layer's kernel, named by its layer
            n_stacked, where = int(_under(self.stacked, key[:-1])), path_str(key[:-1])
            if np.ndim(value) - n_stacked < 2:
                raise ValueError(f"'{path_str(key)}' has shape {np.shape(value)}: too few axes for a stack of kernels "
                                 f"(check stacked={list(self.stacked)})")
        box, figures = quantize_array(value, self.format, self.block, n_stacked, self.config.quantized_compute_dtype,
                                       self.measure)
        self.record(where, figures)
        # waited for (record reads it): with jax's asynchronous dispatch a loader would otherwise read
        # ahead, every queued quantization holding its float kernel alive
        return box

    def record(self, where: str, figures: tuple) -> None:
        """Check a kernel just quantized (``_check``'s figures: finite, its errors) and note it in
        ``chosen`` and ``errors``."""
        finite, relative, max_abs, ordinary = (float(v) for v in figures)
        if not finite:
            raise ValueError(f"the kernel at '{where}' holds NaN or inf values; quantizing would hide them (int8) or "
                             f"spread them over their block (NF4). Fix or reload the weights first")
        self.chosen.append(where)
        if not self.measure:
            return
        self.errors[where] = {"relative": relative, "max_abs": max_abs, "relative_ordinary": ordinary}
        if ordinary > ERROR_WARNING[self.format]:
            warnings.warn(f"quantize: {self.format} changes the ordinary weights (within 6 rms) of the kernel at "
                          f"'{where}' by {ordinary:.1%} (a Gaussian kernel: about {_USUAL_ERROR[self.format]:.1%}):"
                          f" outliers set the scale of their {'block' if self.format == 'nf4' else 'column'} and the "
                          f"rest is rounded coarsely. Leave the layer out, or use int8 / a smaller block",
                          stacklevel=3)


def _check_layer(module: tuple[str, ...], kernel: Any, flat: dict, quantizer: KernelQuantizer) -> None:
    """Refuse, before anything is quantized, a layer whose variant leaves (a DoRA magnitude, PiSSA's
    initial factors) came from the float kernel, and a kernel that carries a stack's leading axis (its
    bias does too) without ``stacked=`` naming it."""
    where = path_str(module)
    held = [leaf for leaf in VARIANT_LEAVES if module + (leaf,) in flat]
    if held:
        raise variant_before_quantize(where, held)
    bias = flat.get(module + ("bias",))
    shape = np.shape(kernel)
    if bias is not None and not _under(quantizer.stacked, module):
        b = np.shape(meta.unbox(bias))
        if len(b) >= 2 and len(b) == len(shape) - 1 and b[0] == shape[0] and b != tuple(shape[-len(b):]):
            raise ValueError(f"the kernel at '{where}' {tuple(shape)} and its bias {b} share a leading axis of "
                             f"{shape[0]}: a stack of layers (nn.scan / nn.vmap). Name the stacked module in "
                             f"stacked=, e.g. stacked=('{module[0]}',), so that each layer is quantized on its own")


def variant_before_quantize(where: str, leaves: list[str]) -> ValueError:
    return ValueError(f"layer '{where}' has {leaves} (a DoRA magnitude, PiSSA's initial factors), computed from its "
                      f"float kernel: on the quantized kernel the model would no longer start from the base. Quantize the base first, then add the adapter "
                      f"(linen: init_lora_params or apply_adapter on the quantized tree; NNX: lora(...) on the "
                      f"quantized model)")


def check_chosen(chosen: list, layers: str, config: LoraConfig, already: bool = False) -> None:
    if not chosen and already:
        raise ValueError("quantize: these params are already quantized (they hold QuantizedKernel boxes and no "
                         "float kernel to choose); quantize the float params once")
    if not chosen:
        raise ValueError(f"quantize: no kernel matched ({layers}: targets {list(config.targets)}); "
                         f"nothing would be quantized")


def requantize_like(box: QuantizedKernel, value: jax.Array) -> QuantizedKernel:
    """``value`` (a kernel of ``box``'s shape) quantized in ``box``'s format, block and stacking."""
    weight = box.weight
    if isinstance(weight, Nf4Weight):
        n_stacked = weight.data.ndim - 1
        options = {"block": weight.block, "scale_block": weight.scale_block}
        return QuantizedKernel(quantize_stacked(quantize_nf4, value, n_stacked, **options), box.dtype,
                               box.compute_dtype)
    assert isinstance(weight, Int8Weight)
    contracted = tuple(i for i, n in enumerate(weight.scale.shape) if n == 1)  # the scale's size-one axes
    return QuantizedKernel(quantize_int8(value, axes=contracted), box.dtype, box.compute_dtype)


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
    require_config(config, "merge_requantized")
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
