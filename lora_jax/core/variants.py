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

* ``PISSA`` (``init='pissa'``): A and B start as the weight's principal part, which the layer
  subtracts through frozen copies of them (``Pissa``).

A variant declares its leaves (which of them train, and their roles: factor-like or per-output),
its neutral value (a bank's "no adapter" row), whether adapters combine linearly, the layouts it
supports, its config flag (``selected_by``) and its plain-LoRA form for PEFT files; front ends,
merge, banks, hotswap and PEFT IO read these and never a variant's name. A quantized base passes
the dequantized weight as ``weight``.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[3.0], [4.0]])              # (in=2, out=1): column norm 5
    >>> leaves = DORA.init_leaves(w, jnp.zeros((2, 1)), jnp.zeros((1, 1)), scale=1.0, out_ndim=1)
    >>> leaves["lora_magnitude"].tolist()
    [[5.0]]
    >>> DORA.merge(w, jnp.zeros_like(w), leaves).tolist()   # m = ||W||: merge is the identity
    [[3.0], [4.0]]
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp

from .kinds import BROADCAST, CONV, MATRIX, delta

Array = jax.Array
Lazy = Callable[[], Array]
LowRank = Callable[[Array, Array], Array]


class Variant(Protocol):
    """What a LoRA variant defines; see the module docstring."""

    name: str
    label: str  # for messages: "plain LoRA", "DoRA"
    flag: str  # the LoraConfig setting that selects it, for messages: "use_dora=True"
    leaves: tuple[str, ...]  # adapter leaves beside lora_A / lora_B (saved with the adapter)
    frozen: tuple[str, ...]  # those of ``leaves`` that do not train
    leaf_roles: Mapping[str, str]  # leaf -> 'a' | 'b' (shaped like lora_A / lora_B) | 'magnitude'
    combines_linearly: bool  # a weighted sum of adapters is an adapter (add_weighted_adapter)
    layouts: tuple[str, ...]  # the factor layouts it supports (``kinds.MATRIX`` ...)
    uses_base_term: bool  # its output needs dropout(x) through the frozen weight
    peft_config: Mapping[str, Any] | None  # adapter_config.json settings of its PEFT files; None: plain LoRA form
    peft_names: Mapping[str, str]  # its per-output leaves' names in PEFT files (DoRA: lora_magnitude_vector)

    def selected_by(self, config: Any) -> bool:
        """Whether a ``LoraConfig`` asks for this variant."""
        ...

    def init_factors(self, weight: Array, a: Array, b: Array, scale: float) -> tuple[Array, Array]:
        """lora_A / lora_B at init, given the frozen weight and the default ones (A drawn, B zero)."""
        ...

    def init_leaves(self, weight: Array, a: Array, b: Array, scale: float, out_ndim: int) -> dict[str, Array]:
        """The extra leaves' initial values, given the frozen weight and the factors at init."""
        ...

    def neutral_leaves(self, weight: Array, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Array]:
        """The extra leaves' values that, with zero factors, leave the layer exactly its base (an
        adapter bank's "no adapter" row); ``shapes`` gives each leaf's shape."""
        ...

    def output(self, base_out: Array, update: Array, *, leaves: Mapping[str, Array], weight: Array,
               scaled_delta: Lazy, base_term: Lazy, low_rank: LowRank | None = None, out_ndim: int) -> Array:
        """The adapted layer's output. ``base_term()`` is dropout(x) through ``weight`` without bias;
        ``low_rank(a, b)`` the unscaled low-rank product of the undropped input with other factors."""
        ...

    def merge(self, weight: Array, scaled_delta: Array, leaves: Mapping[str, Array]) -> Array:
        """The weight the untransformed layer needs to compute what the adapted one does (no dropout)."""
        ...

    def unmerge(self, merged: Array, scaled_delta: Array, leaves: Mapping[str, Array]) -> Array:
        """Inverse of ``merge``."""
        ...

    def as_plain_lora(self, a: Array, b: Array, leaves: Mapping[str, Array], scale: float) -> tuple[Array, Array]:
        """Plain LoRA factors (A', B') with ``scale · A'·B'`` the variant's weight update (a PEFT file
        of plain LoRA); ValueError where the variant's update is not low-rank."""
        ...


class PlainLora:
    """``y = base(x) + scale · f(dropout(x); A, B)``; merged ``W + scale · A·B``."""

    name = "lora"
    label = "plain LoRA"
    flag = "use_dora=False, init='kaiming_uniform' or 'gaussian'"
    leaves: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    leaf_roles: Mapping[str, str] = {}
    combines_linearly = True
    layouts = (MATRIX, BROADCAST, CONV)
    uses_base_term = False
    peft_config: Mapping[str, Any] | None = {"use_dora": False}
    peft_names: Mapping[str, str] = {}

    def selected_by(self, config: Any) -> bool:
        return not config.use_dora and config.init != "pissa"

    def init_factors(self, weight, a, b, scale):
        return a, b

    def init_leaves(self, weight, a, b, scale, out_ndim):
        return {}

    def neutral_leaves(self, weight: Array, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Array]:
        return {}

    def output(self, base_out, update, *, leaves, weight, scaled_delta, base_term, low_rank=None, out_ndim):
        return base_out + update.astype(base_out.dtype)

    def merge(self, weight, scaled_delta, leaves):
        return weight + scaled_delta

    def unmerge(self, merged, scaled_delta, leaves):
        return merged - scaled_delta

    def as_plain_lora(self, a, b, leaves, scale):
        return a, b


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
    flag = "use_dora=True"
    leaves: tuple[str, ...] = ("lora_magnitude",)
    frozen: tuple[str, ...] = ()
    leaf_roles: Mapping[str, str] = {"lora_magnitude": "magnitude"}
    combines_linearly = False  # a magnitude rescales its own W + ΔW: mixes of them are no DoRA update
    layouts = (MATRIX, CONV)  # an einsum layer has no base term (dropout(x) through W) to rescale
    uses_base_term = True
    peft_config: Mapping[str, Any] | None = {"use_dora": True}
    peft_names: Mapping[str, str] = {"lora_magnitude": "lora_magnitude_vector"}

    def selected_by(self, config: Any) -> bool:
        return bool(config.use_dora)

    def init_factors(self, weight, a, b, scale):
        return a, b

    def init_leaves(self, weight, a, b, scale, out_ndim):
        like = magnitude_shape(tuple(weight.shape), out_ndim)
        scaled = scale * delta(a.astype(jnp.float32), b.astype(jnp.float32), tuple(weight.shape))
        return {"lora_magnitude": output_norm(weight.astype(jnp.float32) + scaled, like)}

    def neutral_leaves(self, weight, shapes):
        return {"lora_magnitude": output_norm(weight, tuple(shapes["lora_magnitude"]))}  # m = ||W||: gain 1

    def _gain(self, weight, scaled_delta, magnitude):
        norm = output_norm(weight.astype(jnp.float32) + scaled_delta.astype(jnp.float32), magnitude.shape)
        norm = jnp.where(norm > 0, norm, 1.0)  # an all-zero column: gain m, output m·0 (not 0/0 = NaN)
        return magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)

    def output(self, base_out, update, *, leaves, weight, scaled_delta, base_term, low_rank=None, out_ndim):
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

    def as_plain_lora(self, a, b, leaves, scale):
        raise ValueError("a DoRA update rescales W + ΔW per output: it is no low-rank update, so it has no plain "
                         "LoRA form (export it with PEFT's use_dora instead)")


class Pissa:
    """PiSSA (Meng et al. 2024; PEFT's ``init_lora_weights='pissa'``): A and B start as the weight's
    top-r singular directions, ``scale · A₀·B₀ = U_r S_r V_rᵀ``, so training moves the principal part.

    PEFT subtracts ``scale · A₀·B₀`` from the base weight; here the base stays untouched and the
    layer keeps ``lora_A_init = A₀`` and ``lora_B_init = scale · B₀`` (frozen, saved with the
    adapter): ``y = base(x) + scale · f(dropout(x); A, B) - f(x; A₀, scale · B₀)``, which is PEFT's
    model exactly (its residual weight receives the undropped input). Merged:
    ``W + scale · A·B - A₀ · scale·B₀``; as plain LoRA of twice the rank (PEFT's conversion):
    ``A' = [A, A₀]``, ``B' = [B; -B₀]``. Matrix-shaped kernels only (Dense, DenseGeneral, Embed).
    """

    name = "pissa"
    label = "PiSSA"
    flag = "init='pissa'"
    leaves: tuple[str, ...] = ("lora_A_init", "lora_B_init")
    frozen: tuple[str, ...] = ("lora_A_init", "lora_B_init")
    leaf_roles: Mapping[str, str] = {"lora_A_init": "a", "lora_B_init": "b"}
    combines_linearly = False  # each adapter carries its own subtracted principal part
    layouts = (MATRIX,)
    uses_base_term = False
    peft_config: Mapping[str, Any] | None = None  # PEFT's own PiSSA files need its residual base: export as LoRA
    peft_names: Mapping[str, str] = {}

    def selected_by(self, config: Any) -> bool:
        return config.init == "pissa"

    def init_factors(self, weight, a, b, scale):
        rank, n_in, n_out = a.shape[-1], a.shape[-2], b.shape[-1]
        u, s, vh = jnp.linalg.svd(weight.astype(jnp.float32).reshape(n_in, n_out), full_matrices=False)
        root = jnp.sqrt(s[:rank] / scale)
        return (u[:, :rank] * root).astype(a.dtype), (root[:, None] * vh[:rank]).astype(b.dtype)

    def init_leaves(self, weight, a, b, scale, out_ndim):
        return {"lora_A_init": a, "lora_B_init": scale * b}

    def neutral_leaves(self, weight, shapes):
        return {name: jnp.zeros(shapes[name], jnp.float32) for name in shapes if name in self.leaves}

    def _initial(self, leaves, shape):
        return delta(leaves["lora_A_init"].astype(jnp.float32), leaves["lora_B_init"].astype(jnp.float32), shape)

    def output(self, base_out, update, *, leaves, weight, scaled_delta, base_term, low_rank=None, out_ndim):
        initial = low_rank(leaves["lora_A_init"], leaves["lora_B_init"])
        return base_out + (update - initial).astype(base_out.dtype)

    def merge(self, weight, scaled_delta, leaves):
        return weight + scaled_delta - self._initial(leaves, tuple(weight.shape))

    def unmerge(self, merged, scaled_delta, leaves):
        return merged - scaled_delta + self._initial(leaves, tuple(merged.shape))

    def as_plain_lora(self, a, b, leaves, scale):
        a_init, b_init = leaves["lora_A_init"].astype(a.dtype), leaves["lora_B_init"].astype(b.dtype)
        return jnp.concatenate([a, a_init], axis=-1), jnp.concatenate([b, -b_init / scale], axis=-2)


LORA = PlainLora()
DORA = Dora()
PISSA = Pissa()
VARIANTS = (LORA, DORA, PISSA)
ADAPTER_LEAVES: tuple[str, ...] = ("lora_A", "lora_B") + tuple(leaf for v in VARIANTS for leaf in v.leaves)
FROZEN_ADAPTER_LEAVES: frozenset[str] = frozenset(leaf for v in VARIANTS for leaf in v.frozen)
# per-output leaves (role 'magnitude') and their names in PEFT files, over every variant
PER_OUTPUT_LEAVES: dict[str, str] = {leaf: v.peft_names[leaf] for v in VARIANTS
                                     for leaf, role in v.leaf_roles.items() if role == "magnitude"}
# factor pairs (A-like, B-like) of every variant: lora_A / lora_B, PiSSA's lora_A_init / lora_B_init
FACTOR_PAIRS: dict[str, str] = {"lora_A": "lora_B", **{
    a: b for v in VARIANTS for a, b in zip([k for k, r in v.leaf_roles.items() if r == "a"],
                                           [k for k, r in v.leaf_roles.items() if r == "b"])}}


def variant_of(config: Any) -> Variant:
    """The variant a ``LoraConfig`` selects; ValueError if its settings ask for more than one."""
    chosen = [v for v in VARIANTS if v.selected_by(config)]
    if len(chosen) != 1:
        raise ValueError(f"LoraConfig selects {[v.label for v in chosen] or 'no'} variants ("
                         f"{', '.join(v.flag for v in chosen)}): choose one")
    return chosen[0]


def foreign_leaves(variant: Variant, has: Callable[[str], bool]) -> list[str]:
    """The leaves of other variants that a layer holds (``has(name)``): a DoRA magnitude under a plain
    config, say, which ``variant`` would silently ignore.

    >>> foreign_leaves(LORA, lambda name: name in ("lora_A", "lora_B", "lora_magnitude"))
    ['lora_magnitude']
    """
    return [leaf for leaf in ADAPTER_LEAVES[2:] if leaf not in variant.leaves and has(leaf)]
