"""A quantized frozen base (QLoRA): kernels stored as int8 or NF4 and dequantized when a layer reads them.

``quantize(params, config, "nf4")`` replaces the frozen kernels of the targeted layers (or of every
layer but ``modules_to_save``, with ``layers="all"``) by ``QuantizedKernel`` boxes. A box is flax
axis metadata whose ``unbox`` dequantizes: every linen layer reads its kernel through
``self.param``, which unboxes, so the model runs unchanged on the quantized tree, and XLA sees the
dequantization next to the matmul that uses it. LoRA factors stay in ``LoraConfig.param_dtype``;
the boxes sit in the frozen partition, so they are never differentiated or updated. ``merge``
returns the adapted kernels dequantized and merged (plain arrays); PEFT export is unchanged.

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

from typing import Any, Literal, Mapping

import jax
import numpy as np
from flax import struct, traverse_util
from flax.core import meta

from .config import LoraConfig
from .core.quant import Nf4Weight, dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4
from .targets import any_matches, path_str

Params = Mapping[str, Any]
Format = Literal["int8", "nf4"]


class QuantizedKernel(struct.PyTreeNode, meta.AxisMetadata):
    """A frozen kernel stored quantized; ``unbox()`` gives it back in ``dtype``."""

    weight: Any  # Int8Weight | Nf4Weight
    dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape) if isinstance(self.weight, Nf4Weight) else tuple(self.weight.data.shape)

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
        raise NotImplementedError("quantized kernels inside nn.scan / nn.vmap are not supported yet")

    def remove_axis(self, index: int, params: dict[Any, Any]) -> "QuantizedKernel":
        raise NotImplementedError("quantized kernels inside nn.scan / nn.vmap are not supported yet")


def quantize(params: Params, config: LoraConfig, format: Format = "nf4", layers: Literal["targets", "all"] = "targets",
             *, block: int = 64) -> dict:
    """``params`` with frozen kernels quantized (``format`` 'int8': per-output-channel absmax;
    'nf4': NormalFloat4, ``block`` weights per absmax, double-quantized scales).

    Args:
      params: a param tree (base or LoRA).
      config: selects the layers: its targets (minus exclude), or with ``layers='all'`` every layer
        with a kernel of two or more axes except ``modules_to_save`` (they train).
      format: 'int8' | 'nf4'.

    Returns:
      The tree with those kernels as ``QuantizedKernel`` boxes; every other leaf is the same array.
    """
    if format not in ("int8", "nf4"):
        raise ValueError(f"format must be 'int8' or 'nf4', got {format!r}")
    if layers not in ("targets", "all"):
        raise ValueError(f"layers must be 'targets' or 'all', got {layers!r}")
    flat = traverse_util.flatten_dict(dict(params))
    out = dict(flat)
    chosen = []
    for key, value in flat.items():
        if key[-1] != "kernel" or isinstance(value, QuantizedKernel) or np.ndim(value) < 2:
            continue
        where = path_str(key[:-1])
        if layers == "targets":
            selected = any_matches(config.targets, where) and not any_matches(config.exclude, where)
        else:
            selected = not any(any_matches(config.modules_to_save, path_str(key[:i])) for i in range(1, len(key)))
        if selected:
            weight = quantize_nf4(value, block) if format == "nf4" else quantize_int8(value)
            out[key] = QuantizedKernel(weight, str(np.dtype(value.dtype)))
            chosen.append(where)
    if not chosen:
        raise ValueError(f"quantize: no kernel matched ({layers}: targets {list(config.targets)}); "
                         f"nothing would be quantized")
    return traverse_util.unflatten_dict(out)


def is_quantized(leaf: Any) -> bool:
    """Whether ``leaf`` is a quantized kernel box."""
    return isinstance(leaf, QuantizedKernel)


def unbox_but_quantized(tree: Any) -> Any:
    """Unbox sharding boxes (``nn.Partitioned``), keep quantized kernels boxed (they stay small)."""
    def unbox(x: Any) -> Any:
        return x.unbox() if isinstance(x, meta.AxisMetadata) and not isinstance(x, QuantizedKernel) else x

    return jax.tree.map(unbox, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))

