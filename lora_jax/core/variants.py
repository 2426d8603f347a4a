"""The variant seam: how an adapter's low-rank update becomes a layer's output and a merged weight.

A variant is told, for one adapted layer, the base output, the scaled low-rank update
``scale · f(dropout(x); A, B)``, the frozen weight and (lazily) the scaled weight update
``scale · A·B`` and the input through the frozen weight; it returns the layer's output. It also
names the extra adapter leaves it keeps beside ``lora_A`` / ``lora_B`` and how it merges into the
weight. The front ends (linen and NNX), ``merge`` and adapter banks call only this protocol, so a new variant is a new
class here plus its tests.

* ``LORA``: ``y = base(x) + update``; merged ``W + ΔW``.
* ``DORA`` (weight-decomposed LoRA, Liu et al. 2024; PEFT's ``use_dora``): a trainable magnitude
  ``m`` per output; ``y = base(x) + (g - 1) · (dropout(x) ⋅ W) + g · update`` with
  ``g = m / ||W + ΔW||``, the norm taken per output over the contracted axes and treated as a
  constant in the gradient, as the paper and PEFT do. Merged: ``g · (W + ΔW)``, which loses
  ``||W + ΔW||``: DoRA's merge cannot be undone from the merged weight alone. An all-zero output
  column of ``W + ΔW`` (where PEFT computes 0/0 = NaN) is given norm 1, so its output stays 0.

``lora_magnitude`` has the weight's rank with size 1 on the contracted axes (Dense (in, out) ->
(1, out); Conv (kh, kw, in, out) -> (1, 1, 1, out)), so it broadcasts against the weight, stacked
(``nn.scan``) layers included.

Where the next variants plug in: a quantized base passes the dequantized weight as ``weight``
(and its own ``base_term``); an adapter bank (one adapter per example) gathers each row's A / B
before the front end computes ``update``, and reuses ``LORA.output`` unchanged.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[3.0], [4.0]])              # (in=2, out=1): column norm 5
    >>> leaves = DORA.init_leaves(w, jnp.zeros_like(w), out_ndim=1)
    >>> leaves["lora_magnitude"].tolist()
    [[5.0]]
    >>> DORA.merge(w, jnp.zeros_like(w), leaves).tolist()   # m = ||W||: merge is the identity
    [[3.0], [4.0]]
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
Lazy = Callable[[], Array]


class Variant(Protocol):
    """What a LoRA variant defines; see the module docstring."""

    name: str
    label: str  # for messages: "plain LoRA", "DoRA"
    leaves: tuple[str, ...]  # adapter leaves beside lora_A / lora_B
    combines_linearly: bool  # a weighted sum of adapters is an adapter (add_weighted_adapter)

    def init_leaves(self, weight: Array, scaled_delta: Array, out_ndim: int) -> dict[str, Array]:
        """The extra leaves' initial values, given the frozen weight and scale·A·B at init."""
        ...

    def neutral_leaves(self, weight: Array, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Array]:
        """The extra leaves' values that, with zero factors, leave the layer exactly its base (an
        adapter bank's "no adapter" row); ``shapes`` gives each leaf's shape."""
        ...

    def output(self, base_out: Array, update: Array, *, leaves: Mapping[str, Array], weight: Array,
               scaled_delta: Lazy, base_term: Lazy, out_ndim: int) -> Array:
        """The adapted layer's output. ``base_term()`` is dropout(x) through ``weight`` without bias."""
        ...

    def merge(self, weight: Array, scaled_delta: Array, leaves: Mapping[str, Array]) -> Array:
        """The weight the untransformed layer needs to compute what the adapted one does (no dropout)."""
        ...

    def unmerge(self, merged: Array, scaled_delta: Array, leaves: Mapping[str, Array]) -> Array:
        """Inverse of ``merge``."""
        ...


class PlainLora:
    """``y = base(x) + scale · f(dropout(x); A, B)``; merged ``W + scale · A·B``."""

    name = "lora"
    label = "plain LoRA"
    leaves: tuple[str, ...] = ()
    combines_linearly = True

    def init_leaves(self, weight: Array, scaled_delta: Array, out_ndim: int) -> dict[str, Array]:
        return {}

    def neutral_leaves(self, weight: Array, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Array]:
        return {}

    def output(self, base_out, update, *, leaves, weight, scaled_delta, base_term, out_ndim):
        return base_out + update.astype(base_out.dtype)

    def merge(self, weight, scaled_delta, leaves):
        return weight + scaled_delta

    def unmerge(self, merged, scaled_delta, leaves):
        return merged - scaled_delta


def magnitude_shape(weight_shape: tuple[int, ...], out_ndim: int) -> tuple[int, ...]:
    """The weight's shape with each contracted axis set to 1: (in, out) -> (1, out).

    >>> magnitude_shape((3, 3, 4, 8), out_ndim=1)
    (1, 1, 1, 8)
    """
    n_in = len(weight_shape) - out_ndim
    return (1,) * n_in + tuple(weight_shape[n_in:])


def output_norm(weight: Array, like_shape: tuple[int, ...]) -> Array:
    """The L2 norm of ``weight`` over the axes where ``like_shape`` is 1, kept as size-1 axes.

    >>> output_norm(jnp.array([[3.0, 1.0], [4.0, 0.0]]), (1, 2)).tolist()
    [[5.0, 1.0]]
    """
    if len(like_shape) != weight.ndim:
        raise ValueError(f"lora_magnitude of shape {tuple(like_shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)}: it needs the weight's rank with 1 on the contracted axes")
    axes = tuple(i for i, d in enumerate(like_shape) if d == 1)
    w = weight.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True))


class Dora:
    """Weight-decomposed LoRA: a trainable magnitude per output times the normalised ``W + ΔW``."""

    name = "dora"
    label = "DoRA"
    leaves: tuple[str, ...] = ("lora_magnitude",)
    combines_linearly = False  # a magnitude rescales its own W + ΔW: mixes of them are no DoRA update

    def init_leaves(self, weight, scaled_delta, out_ndim):
        like = magnitude_shape(tuple(weight.shape), out_ndim)
        return {"lora_magnitude": output_norm(weight.astype(jnp.float32) + scaled_delta, like)}

    def neutral_leaves(self, weight, shapes):
        return {"lora_magnitude": output_norm(weight, tuple(shapes["lora_magnitude"]))}  # m = ||W||: gain 1

    def _gain(self, weight, scaled_delta, magnitude):
        norm = output_norm(weight.astype(jnp.float32) + scaled_delta.astype(jnp.float32), magnitude.shape)
        norm = jnp.where(norm > 0, norm, 1.0)  # an all-zero column: gain m, output m·0 (not 0/0 = NaN)
        return magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)

    def output(self, base_out, update, *, leaves, weight, scaled_delta, base_term, out_ndim):
        gain = self._gain(weight, scaled_delta(), leaves["lora_magnitude"])
        gain = gain.reshape(gain.shape[gain.ndim - out_ndim:])  # the output axes, trailing in the layer's output
        dora = (gain - 1.0) * base_term().astype(jnp.float32) + gain * update.astype(jnp.float32)
        return base_out + dora.astype(base_out.dtype)

    def merge(self, weight, scaled_delta, leaves):
        adapted = weight.astype(jnp.float32) + scaled_delta
        return self._gain(weight, scaled_delta, leaves["lora_magnitude"]) * adapted

    def unmerge(self, merged, scaled_delta, leaves):
        raise ValueError("a DoRA merge cannot be undone from the merged weight: it rescales W + ΔW to the learned "
                         "magnitude and drops ||W + ΔW||. merge is pure, so keep the unmerged params it was given "
                         "(or reload the base) instead of calling unmerge")


LORA = PlainLora()
DORA = Dora()
VARIANTS = (LORA, DORA)
ADAPTER_LEAVES: tuple[str, ...] = ("lora_A", "lora_B") + tuple(leaf for v in VARIANTS for leaf in v.leaves)


def foreign_leaves(variant: Variant, has: Callable[[str], bool]) -> list[str]:
    """The leaves of other variants that a layer holds (``has(name)``): a DoRA magnitude under a plain
    config, say, which ``variant`` would silently ignore.

    >>> foreign_leaves(LORA, lambda name: name in ("lora_A", "lora_B", "lora_magnitude"))
    ['lora_magnitude']
    """
    return [leaf for leaf in ADAPTER_LEAVES[2:] if leaf not in variant.leaves and has(leaf)]
