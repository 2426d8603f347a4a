"""Adapters as values: the trainable subtree + its config, applied onto any compatible base.

One frozen base serves many adapters: ``apply_adapter(base_params, adapter)`` builds the param tree
for one of them without copying the base, and ``add_weighted_adapter`` combines several (PEFT's
``add_weighted_adapter``, 'linear' and 'cat').
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from .config import LoraConfig
from .core.kinds import BROADCAST, delta, factor_layout
from .fingerprint import check_base_fingerprint
from .core.variants import ADAPTER_LEAVES, FACTOR_PAIRS
from .masking import adapter_mask, partition
from .merge import base_leaf_key
from .param_targets import param_path_of
from .targets import path_str

Params = Mapping[str, Any]


@dataclasses.dataclass
class Adapter:
    """The trainable leaves of a LoRA model (lora_A/lora_B, plus modules_to_save and biases),
    its config, and free-form metadata (base model name, lora_jax version, ...)."""

    params: dict
    config: LoraConfig
    metadata: dict = dataclasses.field(default_factory=dict)


def extract_adapter(params: Params, config: LoraConfig, metadata: dict | None = None) -> Adapter:
    """The adapter of a full LoRA param tree: its trainable partition under ``config``.

    >>> import numpy as np
    >>> params = {"fc": {"kernel": np.zeros((4, 3)), "lora_A": np.ones((4, 1)), "lora_B": np.ones((1, 3))}}
    >>> adapter = extract_adapter(params, LoraConfig(rank=1, targets=("fc",)))
    >>> sorted(adapter.params["fc"])
    ['lora_A', 'lora_B']
    >>> sorted(apply_adapter({"fc": {"kernel": np.ones((4, 3))}}, adapter)["fc"])
    ['kernel', 'lora_A', 'lora_B']
    """
    adapter, _ = partition(params, adapter_mask(params, config))
    return Adapter(adapter, config, dict(metadata or {}))


def check_adapter_fits(base_params: Params, adapter_params: Params) -> None:
    """Raise ValueError naming the leaf and both shapes if the adapter cannot sit on this base."""
    flat_base = traverse_util.flatten_dict(dict(base_params))
    flat = traverse_util.flatten_dict(dict(adapter_params))
    partners = {**FACTOR_PAIRS, **{b: a for a, b in FACTOR_PAIRS.items()}}
    for key, value in flat.items():
        module, leaf = key[:-1], key[-1]
        if leaf in ADAPTER_LEAVES and leaf not in partners:  # a variant's per-output leaf, e.g. lora_magnitude
            weight_key = base_leaf_key(flat_base, module)
            weight_shape = tuple(flat_base[weight_key].shape)
            if len(value.shape) != len(weight_shape) or any(d not in (1, w) for d, w in zip(value.shape, weight_shape)):
                raise ValueError(f"adapter leaf '{path_str(key)}' has shape {tuple(value.shape)}, which does not fit "
                                 f"the base leaf '{path_str(weight_key)}' of shape {weight_shape} (it needs that shape "
                                 f"with 1 on the contracted axes)")
        elif leaf in ADAPTER_LEAVES:  # a factor: it and its partner must give an update of the weight's shape
            weight_key = base_leaf_key(flat_base, module)
            weight = flat_base[weight_key]
            other = flat.get(module + (partners[leaf],))
            if other is None:
                raise ValueError(f"adapter leaf '{path_str(key)}' has no partner {partners[leaf]}")
            a, b = (value, other) if leaf in FACTOR_PAIRS else (other, value)
            a_name, b_name = (leaf, partners[leaf]) if leaf in FACTOR_PAIRS else (partners[leaf], leaf)
            try:
                jax.eval_shape(functools.partial(delta, shape=tuple(weight.shape)), a, b)
            except (TypeError, ValueError):
                raise ValueError(f"adapter leaf '{path_str(key)}' has shape {tuple(value.shape)} ({a_name} "
                                 f"{tuple(a.shape)}, {b_name} {tuple(b.shape)}), which does not fit the base leaf "
                                 f"'{path_str(weight_key)}' of shape {tuple(weight.shape)}") from None
        elif key not in flat_base:
            if any(k[:-1] == module for k in flat_base):  # a whole new module (a head) is fine; a stray leaf is not
                raise ValueError(f"adapter leaf '{path_str(key)}' has no counterpart in the base module "
                                 f"'{path_str(module)}'")
        elif tuple(flat_base[key].shape) != tuple(value.shape):
            raise ValueError(f"adapter leaf '{path_str(key)}' has shape {tuple(value.shape)}, but the base leaf has "
                             f"shape {tuple(flat_base[key].shape)}")


def check_targets_cover(adapter_params: Params, config: LoraConfig, source: str = "the adapter") -> None:
    """Raise ValueError if some lora_A/lora_B leaves sit at layers ``config.targets`` does not select
    (or ``config.exclude`` removes): the transformed model would silently ignore them."""
    flat = traverse_util.flatten_dict(dict(adapter_params))
    modules = sorted({k[:-1] for k in flat if k[-1] in ADAPTER_LEAVES})
    def selected(module: tuple[str, ...]) -> bool:  # a raw param's factors (P_lora) are selected as the param P
        param = param_path_of(module)
        return config.selects(path_str(module)) or (param is not None and config.selects_parameter(path_str(param)))

    stray = [path_str(m) for m in modules if not selected(m)]
    if stray:
        raise ValueError(f"{source} holds lora_A/lora_B for layers its config does not target ({stray[:5]}"
                         f"{' ...' if len(stray) > 5 else ''}; targets {list(config.targets)}, target_parameters "
                         f"{list(config.target_parameters)}, exclude "
                         f"{list(config.exclude)}): they would be ignored. Fix the config's targets.")


def apply_adapter(base_params: Params, adapter: Adapter | Params, *, strict: bool = True) -> dict:
    """Base params + adapter -> the LoRA model's param tree (adapter leaves win; base is not copied).

    Checks that every adapter leaf fits the base (an error names the leaf and both shapes) and, for
    an ``Adapter`` that records a base fingerprint, that this is the base it was trained on
    (``BaseMismatchError``; ``strict=False`` warns instead).

    Example::

        params = apply_adapter(base_params, load_adapter("adapters/laptops"))
    """
    if isinstance(adapter, Adapter):
        adapter_params = adapter.params
    elif isinstance(adapter, Mapping):
        adapter_params = adapter
    else:
        raise TypeError(f"apply_adapter takes an Adapter (from load_adapter / import_peft / extract_adapter) or a "
                        f"nested dict of adapter leaves, got {type(adapter).__name__}")
    if not isinstance(base_params, Mapping):
        raise TypeError(f"apply_adapter takes the base params as a nested dict, got {type(base_params).__name__}")
    check_adapter_fits(base_params, adapter_params)
    if isinstance(adapter, Adapter):
        check_base_fingerprint(base_params, adapter_params, adapter.metadata.get("base_fingerprint"), strict=strict)
    flat = traverse_util.flatten_dict(dict(base_params))
    flat.update(traverse_util.flatten_dict(dict(adapter_params)))
    return traverse_util.unflatten_dict(flat)


def add_weighted_adapter(adapters: Sequence[Adapter], weights: Sequence[float], combination_type: str = "linear",
                         base_params: Params | None = None, svd_rank: int | None = None) -> Adapter:
    """Combine adapters into one, as PEFT's ``add_weighted_adapter`` does, exactly.

    Each input's layer update is ``w_i · scale_i · A_i B_i`` with that adapter's own scale for that
    layer's rank (rsLoRA and ``rank_pattern`` included).

    * ``'cat'`` is exact: the factors are concatenated along the rank (ranks add up).
    * ``'svd'`` forms each layer's combined update and keeps its best rank-``svd_rank`` approximation
      (default: the largest input rank); the share of the update's energy (squared singular values)
      left out is reported per layer in ``metadata['svd_discarded_energy']``.
    * ``'linear'`` (equal ranks) sums the factors: A = sum_i sign_i sqrt(|w_i s_i|) A_i,
      B = sum_i sqrt(|w_i s_i|) B_i, which has cross terms A_i B_j (PEFT's 'linear').

    'cat' and 'svd' need ``base_params`` (each layer's kernel layout). The result computes its
    update with scale 1 on every layer (alpha = rank; layers of another rank get ``rank_pattern``
    entries and their B rescaled so their scale is 1 too). Only LoRA factors combine: DoRA adapters
    and adapters with other trained leaves (a head from ``modules_to_save``, biases) are refused
    (a weighted mix of heads is not what any of them learned; drop those leaves first if you mean
    it). Weights are finite real numbers; adapters' widths must agree layer by layer; a base
    fingerprint the inputs share is kept, and inputs trained on different bases are refused.

    >>> import numpy as np
    >>> config = LoraConfig(rank=1, alpha=1.0, targets=("fc",))
    >>> one = Adapter({"fc": {"lora_A": np.ones((3, 1)), "lora_B": np.ones((1, 2))}}, config)
    >>> both = add_weighted_adapter([one, one], [0.5, 0.5], "cat", base_params={"fc": {"kernel": np.zeros((3, 2))}})
    >>> both.params["fc"]["lora_A"].shape, both.config.rank
    ((3, 2), 2)
    """
    adapters, weights = _adapters_and_weights(adapters, weights)
    other = [i for i, a in enumerate(adapters) if not a.config.variant.combines_linearly]
    if other:
        raise ValueError(f"adapters {other} are {adapters[other[0]].config.variant.label} adapters, which do not "
                         f"combine linearly: add_weighted_adapter takes plain LoRA adapters only")
    if combination_type not in ("linear", "cat", "svd"):
        raise ValueError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
    if svd_rank is not None and (combination_type != "svd" or isinstance(svd_rank, bool)
                                 or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank (a positive int) goes with combination_type='svd', got {svd_rank!r} with "
                         f"{combination_type!r}")
    flats = [traverse_util.flatten_dict(dict(a.params)) for a in adapters]
    for i, f in enumerate(flats):
        others = sorted(path_str(k) for k in f if k[-1] not in ("lora_A", "lora_B"))
        if others:
            raise ValueError(f"adapter {i} also trained {others[:5]} (a head or biases): add_weighted_adapter combines "
                             f"LoRA factors only, and a weighted mix of heads is not what any adapter learned; "
                             f"remove those leaves from its params first if you want its factors alone")
    modules = sorted({k[:-1] for f in flats for k in f if k[-1] in ("lora_A", "lora_B")})
    for module in modules:
        if any(module + ("lora_A",) not in f or module + ("lora_B",) not in f for f in flats):
            raise ValueError(f"layer '{path_str(module)}' is adapted by some adapters but not all (or lacks lora_A "
                             f"or lora_B in one)")
        _check_widths(module, [f[module + ("lora_A",)] for f in flats], [f[module + ("lora_B",)] for f in flats])
    fingerprints = {a.metadata.get("base_fingerprint") for a in adapters} - {None, ""}
    if len(fingerprints) > 1:
        raise ValueError(f"the adapters were trained on {len(fingerprints)} different bases (their base_fingerprint "
                         f"metadata differ): their updates do not add up on one model")
    if combination_type in ("cat", "svd") and base_params is None:
        raise ValueError(f"'{combination_type}' needs base_params to know each layer's kernel layout")
    flat_base = traverse_util.flatten_dict(dict(base_params)) if base_params is not None else {}
    out: dict[tuple[str, ...], Any] = {}
    discarded: dict[str, float] = {}
    for module in modules:
        a_list = [jnp.asarray(f[module + ("lora_A",)], jnp.float32) for f in flats]
        b_list = [jnp.asarray(f[module + ("lora_B",)], jnp.float32) for f in flats]
        scales = [ad.config.scale_for(a.shape[-1]) * w for ad, a, w in zip(adapters, a_list, weights)]
        if combination_type == "linear":
            if len({a.shape for a in a_list}) != 1:
                raise ValueError(f"'linear' needs equal ranks; layer '{path_str(module)}' has "
                                 f"{[a.shape[-1] for a in a_list]} (use 'cat' or 'svd')")
            a_new = sum(math.copysign(math.sqrt(abs(s)), s) * a for s, a in zip(scales, a_list))
            b_new = sum(math.sqrt(abs(s)) * b for s, b in zip(scales, b_list))
        elif combination_type == "cat":
            weight = flat_base[base_leaf_key(flat_base, module)]
            b_axis = -1 if factor_layout(a_list[0].shape, weight.shape) == BROADCAST else -2  # einsum: r last
            a_new = jnp.concatenate([s * a for s, a in zip(scales, a_list)], axis=-1)
            b_new = jnp.concatenate(b_list, axis=b_axis)
        else:
            weight = flat_base[base_leaf_key(flat_base, module)]
            if factor_layout(a_list[0].shape, weight.shape) == BROADCAST:
                raise ValueError(f"'svd' works on matrix-shaped factors; layer '{path_str(module)}' is an Einsum "
                                 f"layer (use 'cat')")
            target = svd_rank or max(a.shape[-1] for a in a_list)
            a_new, b_new, lost = _truncated_sum(a_list, b_list, scales, target, path_str(module))
            discarded[path_str(module)] = lost
        out[module + ("lora_A",)], out[module + ("lora_B",)] = a_new, b_new
    config = _unit_scale_config(out, modules, adapters[0].config)
    metadata = {"combination_type": combination_type, "weights": list(map(float, weights))}
    if fingerprints:
        metadata["base_fingerprint"] = fingerprints.pop()
    if discarded:
        metadata["svd_discarded_energy"] = discarded
    return Adapter(traverse_util.unflatten_dict(out), config, metadata)


def _adapters_and_weights(adapters: Any, weights: Any) -> tuple[list[Adapter], list[float]]:
    """Lists of the adapters and their weights, checked: Adapters, one finite real weight each."""
    if not isinstance(adapters, Sequence) or not isinstance(weights, Sequence) or isinstance(weights, str):
        raise TypeError(f"add_weighted_adapter takes a list of adapters and a list of weights (numbers), got "
                        f"{type(adapters).__name__} and {type(weights).__name__}")
    adapters, weights = list(adapters), list(weights)
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, Adapter):
            raise TypeError(f"adapters[{i}] is a {type(adapter).__name__}, not an Adapter (load_adapter / import_peft / "
                            f"extract_adapter make them)")
    for i, w in enumerate(weights):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, float, np.integer, np.floating)) \
                or not math.isfinite(w):
            raise ValueError(f"weights[{i}] is {w!r}: each weight must be a finite real number")
    return adapters, [float(w) for w in weights]


def _check_widths(module: tuple, a_list: list, b_list: list) -> None:
    """The adapters' factors at ``module`` agree on every axis but the rank (the layer's widths)."""
    a_shapes = [tuple(np.shape(a)) for a in a_list]
    b_shapes = [tuple(np.shape(b)) for b in b_list]

    def fits(a: tuple, b: tuple) -> bool:  # against the first adapter's factors
        a0, b0 = a_shapes[0], b_shapes[0]
        if len(a) != len(a0) or len(b) != len(b0) or not a or a[:-1] != a0[:-1]:
            return False
        differ = [i for i, (d, d0) in enumerate(zip(b, b0)) if d != d0]
        return not differ or (len(differ) == 1 and b[differ[0]] == a[-1] and b0[differ[0]] == a0[-1])

    if not all(fits(a, b) for a, b in zip(a_shapes, b_shapes)):
        raise ValueError(f"layer '{path_str(module)}': the adapters' factors have lora_A {a_shapes} and lora_B "
                         f"{b_shapes}; only the rank may differ (adapters for another model?)")


def _truncated_sum(a_list, b_list, scales, rank: int, where: str):
    """The best rank-``rank`` factors of sum_i s_i A_i B_i (stacked layers: per layer), and the share of
    squared singular values left out."""
    lead = b_list[0].shape[:-2]
    stack = () if all(d == 1 for d in lead) else lead  # a conv's B is (1, ..., r, out); a stacked B (L, r, out)
    mats = [(a.reshape(stack + (-1, a.shape[-1])), b.reshape(stack + (b.shape[-2], -1))) for a, b in zip(a_list, b_list)]
    full = sum(s * a @ b for s, (a, b) in zip(scales, mats))
    n_in, n_out = full.shape[-2:]
    if rank > min(n_in, n_out):
        raise ValueError(f"svd_rank {rank} exceeds min(in, out) = min({n_in}, {n_out}) at layer '{where}'")
    u, sv, vh = jnp.linalg.svd(full, full_matrices=False)
    root = jnp.sqrt(sv[..., :rank])
    a_new = (u[..., :rank] * root[..., None, :]).reshape(a_list[0].shape[:-1] + (rank,))
    b_new = (root[..., :, None] * vh[..., :rank, :]).reshape(b_list[0].shape[:-2] + (rank, b_list[0].shape[-1]))
    energy = jnp.sum(sv ** 2)
    lost = float(jnp.sum(sv[..., rank:] ** 2) / energy) if float(energy) > 0 else 0.0
    return a_new, b_new, lost


def _unit_scale_config(out: dict, modules: list, like: LoraConfig) -> LoraConfig:
    """A config whose scale is 1 on every combined layer: alpha = the most common rank; a layer of
    another rank r gets a rank_pattern entry, and its B is multiplied by r / alpha (so alpha / r · A·B
    stays the combined update)."""
    ranks = {m: out[m + ("lora_A",)].shape[-1] for m in modules}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    rank = max(counts, key=lambda r: (counts[r], r))
    is_param = lambda m: param_path_of(m) is not None  # a raw param's factors: it is a parameter target
    name = lambda m: path_str(param_path_of(m) or m)
    pattern = {}
    for m, r in ranks.items():
        if r != rank:
            pattern["re:" + re.escape(name(m))] = r
            out[m + ("lora_B",)] = out[m + ("lora_B",)] * (r / rank)
    targets = tuple(dict.fromkeys(name(m) for m in modules if not is_param(m)))
    params = tuple(dict.fromkeys(name(m) for m in modules if is_param(m)))
    return LoraConfig(rank=rank, alpha=float(rank), targets=targets, dropout=like.dropout,
                      dropout_rng=like.dropout_rng, rank_pattern=pattern, target_parameters=params,
                      parameter_in_axis=like.parameter_in_axis)


def hotswap_adapter(params: Params, adapter: Adapter, config: LoraConfig, *, strict: bool = True) -> dict:
    """``params`` (a running model's tree, compiled for ``config``) with ``adapter`` in place of its
    adapter, every leaf keeping its shape and dtype, so jitted functions do not compile again.

    A lower-rank adapter is zero-padded along the rank axis to the slots ``params`` has, and its
    lora_B is multiplied by ``adapter_scale / config_scale`` per layer (rsLoRA and ``rank_pattern``
    included), so ``config`` computes exactly the adapter's update; layers the adapter does not adapt
    get a zero lora_B. Other trained leaves (a head) are replaced as they are. Only the rank may
    differ: other widths are an error, and so is an adapter whose recorded base fingerprint differs
    from ``params``' base (``BaseMismatchError``; ``strict=False`` warns instead).

    Given an NNX model (built with ``config``), the adapter is written into it in place, with the
    same padding and rescaling, and the model is returned.

    >>> import numpy as np
    >>> slots = LoraConfig(rank=4, alpha=4.0, targets=("fc",))
    >>> params = {"fc": {"kernel": np.zeros((3, 2)), "lora_A": np.zeros((3, 4)), "lora_B": np.zeros((4, 2))}}
    >>> small = Adapter({"fc": {"lora_A": np.ones((3, 1)), "lora_B": np.ones((1, 2))}},
    ...                 LoraConfig(rank=1, alpha=2.0, targets=("fc",)))
    >>> swapped = hotswap_adapter(params, small, slots)
    >>> swapped["fc"]["lora_A"].shape, swapped["fc"]["lora_B"][:, 0].tolist()
    ((3, 4), [2.0, 0.0, 0.0, 0.0])
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(f"hotswap_adapter takes an Adapter (from load_adapter / import_peft / extract_adapter), got "
                        f"{type(adapter).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"hotswap_adapter takes the running model's LoraConfig, got {type(config).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"hotswap_adapter takes the running model's params (a nested dict) or an NNX model, got "
                        f"{type(params).__name__}")
    if adapter.config.variant is not config.variant:
        raise ValueError(f"the adapter is a {adapter.config.variant.label} adapter and the running model's config "
                         f"{config.variant.label}: they cannot swap")
    check_base_fingerprint(params, adapter.params, adapter.metadata.get("base_fingerprint"), strict=strict)
    flat = traverse_util.flatten_dict(dict(params))
    new = traverse_util.flatten_dict(dict(adapter.params))
    out = dict(flat)
    for module in sorted({k[:-1] for k in flat if k[-1] == "lora_A"}):
        slot_a, slot_b = flat[module + ("lora_A",)], flat[module + ("lora_B",)]
        variant = config.variant
        if module + ("lora_A",) not in new:  # a layer the adapter leaves alone: zero B, the variant's neutral leaves
            out[module + ("lora_B",)] = jnp.zeros_like(slot_b)
            if variant.leaves:
                weight = meta.unbox(flat[base_leaf_key(flat, module)])
                neutral = variant.neutral_leaves(weight, {leaf: tuple(flat[module + (leaf,)].shape)
                                                          for leaf in variant.leaves})
                out.update({module + (leaf,): value.astype(flat[module + (leaf,)].dtype)
                            for leaf, value in neutral.items()})
            continue
        if module + ("lora_B",) not in new:
            raise ValueError(f"the adapter's layer '{path_str(module)}' has lora_A but no lora_B (an incomplete "
                             f"adapter)")
        a, b = jnp.asarray(new[module + ("lora_A",)]), jnp.asarray(new[module + ("lora_B",)])
        rank, slots = a.shape[-1], slot_a.shape[-1]
        if rank > slots:
            raise ValueError(f"layer '{path_str(module)}': the adapter has rank {rank}, the running model {slots} slots; "
                             f"start the model with at least the largest rank it will serve")
        ratio = adapter.config.scale_for(rank) / config.scale_for(slots)
        out[module + ("lora_A",)] = _pad_to(a, tuple(slot_a.shape), module, "lora_A", rank).astype(slot_a.dtype)
        out[module + ("lora_B",)] = _pad_to(ratio * b, tuple(slot_b.shape), module, "lora_B", rank).astype(slot_b.dtype)
        for leaf, role in variant.leaf_roles.items():  # a variant's own factors (scale-free): padded, not rescaled
            if role in ("a", "b") and module + (leaf,) in new:
                slot = flat[module + (leaf,)]
                value = jnp.asarray(new[module + (leaf,)])
                out[module + (leaf,)] = _pad_to(value, tuple(slot.shape), module, leaf, rank).astype(slot.dtype)
    padded = {"lora_A", "lora_B"} | {leaf for leaf, role in config.variant.leaf_roles.items() if role in ("a", "b")}
    for key, value in new.items():
        if key[-1] in padded:
            continue
        if key not in flat:
            raise ValueError(f"adapter leaf '{path_str(key)}' has no slot in the running model's params")
        if tuple(flat[key].shape) != tuple(value.shape):
            raise ValueError(f"adapter leaf '{path_str(key)}' has shape {tuple(value.shape)}, its slot "
                             f"{tuple(flat[key].shape)}")
        out[key] = jnp.asarray(value, flat[key].dtype)
    stray = sorted(path_str(k[:-1]) for k in new if k[-1] in ("lora_A", "lora_B") and k not in flat)
    if stray:
        raise ValueError(f"the adapter adapts layers {stray[:5]} that the running model has no LoRA slots for")
    return traverse_util.unflatten_dict(out)


def _pad_to(value: jax.Array, shape: tuple[int, ...], module: tuple, name: str, rank: int) -> jax.Array:
    """Zero-pad ``value`` at the end of its rank axis to its slot's ``shape``. Only the rank may be
    padded: every other axis (the layer's input and output widths) must match the slot exactly."""
    differ = [i for i, (v, s) in enumerate(zip(value.shape, shape)) if v != s]
    if value.ndim != len(shape) or len(differ) > 1 or any(value.shape[i] != rank or shape[i] < rank for i in differ):
        raise ValueError(f"{name} at '{path_str(module)}' has shape {tuple(value.shape)}, which does not fit its "
                         f"slot {shape}: only the rank ({rank}) may be smaller than the slot's; the layer's widths "
                         f"must be equal (an adapter for another model?)")
    return jnp.pad(value, [(0, s - v) for v, s in zip(value.shape, shape)])
