"""The variable kinds the NNX front end adds to a model: ``QuantizedParam``, a frozen kernel stored
quantized."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.nnx import variablelib

from ..quantize import QuantizedKernel


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
