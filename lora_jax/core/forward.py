"""One adapted call of a layer, independent of the front end: dropout, the low-rank product, and
the variant's combination with the frozen layer's output.

A front end (linen, NNX) describes the call as a ``Plan`` (the factor shapes, the low-rank product
of an input, the input through the frozen weight) and hands over the factors it holds.

    >>> import jax.numpy as jnp
    >>> from lora_jax.core import kinds
    >>> from lora_jax.core.variants import LORA
    >>> w = jnp.zeros((3, 2))
    >>> plan = Plan(kinds.dense_shapes((3, 2), 1), lambda x, a, b: x @ a @ b, lambda x: x @ w)
    >>> adapted_output(plan, x=jnp.ones((1, 3)), base_out=jnp.zeros((1, 2)), weight=w, bias=None,
    ...                a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), leaves={}, scale=0.5, variant=LORA).tolist()
    [[1.5, 1.5]]
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from . import kinds
from .dropout import dropout
from .variants import Variant

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call of a layer is adapted.

    Attributes:
      shapes: the factor shapes of the layer.
      update: ``(x, A, B) -> f(x; A, B)``, the unscaled low-rank product in the layer's output layout.
      base_term: ``x -> x · W`` without bias (DoRA's base term), or None where a variant needing it
        is not supported.
      uses_dropout: whether LoRA dropout applies to the input (not to an embedding's ids).
      einsum_axes: the parsed spec of an einsum layer (for sharding names).
      layout: how the layer's factors hold its update (``kinds.MATRIX`` | BROADCAST | CONV).
    """

    shapes: kinds.FactorShapes
    update: Callable[[Array, Array, Array], Array]
    base_term: Callable[[Array], Array] | None
    uses_dropout: bool = True
    einsum_axes: kinds.EinsumAxes | None = None
    layout: str = kinds.MATRIX


def split_input(args: tuple, kwargs: dict) -> tuple[Array, tuple, dict]:
    """``(x, other positional args, other keyword args)`` of a layer call: the first positional
    argument, or else the keyword flax layers name it by ('inputs'; an Embed's attend, 'query').

    >>> split_input((), {"inputs": 1, "einsum_str": "ab,bc->ac"})
    (1, (), {'einsum_str': 'ab,bc->ac'})
    """
    if args:
        return args[0], args[1:], dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("inputs" if "inputs" in rest else next(iter(rest))), (), rest


def check_variant_supported(plan: Plan, variant: Variant, where: str, what: str) -> None:
    """NotImplementedError naming the layer if ``variant`` does not support its factor layout or
    needs a base term this call cannot give."""
    if plan.layout not in variant.layouts or (variant.uses_base_term and plan.base_term is None):
        supported = [name for name, kind in kinds.KIND.items() if kind.layout in variant.layouts]
        raise NotImplementedError(f"LoRA variant '{variant.name}' is not supported on layer '{where}' ({what}); it "
                                  f"supports {', '.join(supported)} layers"
                                  f"{' (an Embed through attend excepted)' if variant.uses_base_term else ''}")


def adapted_output(plan: Plan, *, x: Array, base_out: Array, weight: Array, bias: Array | None, a: Array, b: Array,
                   leaves: Mapping[str, Array], scale: float, variant: Variant, dropout_rate: float = 0.0,
                   dropout_key: Array | None = None) -> Array:
    """The adapted layer's output for input ``x`` given the frozen layer's own output ``base_out``.

    Dropout (``dropout_rate`` with ``dropout_key``; none without a key) applies to the adapter's
    input; where the input is not dropped, DoRA's base term reuses ``base_out`` less ``bias``.
    """
    dropped = dropout(x, dropout_rate, dropout_key) if plan.uses_dropout and dropout_key is not None else x
    update = scale * plan.update(dropped, a, b)
    out_ndim = plan.shapes.out_ndim
    low_rank = lambda a_, b_: plan.update(x, a_, b_)  # other factors on the undropped input
    if not variant.leaves:  # plain LoRA needs neither the weight update nor the base term
        return variant.output(base_out, update, leaves=leaves, weight=weight, scaled_delta=None, base_term=None,
                              low_rank=low_rank, out_ndim=out_ndim)

    def base_term() -> Array:
        if dropped is x:  # the frozen layer already saw this input: reuse its output, less the bias
            return base_out if bias is None else base_out - bias.astype(base_out.dtype)
        return plan.base_term(dropped)

    def scaled_delta() -> Array:
        return scale * kinds.delta(a.astype(jnp.float32), b.astype(jnp.float32), tuple(weight.shape))

    return variant.output(base_out, update, leaves=leaves, weight=weight, scaled_delta=scaled_delta,
                          base_term=base_term, low_rank=low_rank, out_ndim=out_ndim)
