"""Adapters as values: the trainable subtree + its config, applied onto any compatible base.

One frozen base serves many adapters: ``apply_adapter(base_params, adapter)`` builds the param tree
for one of them without copying the base, and ``add_weighted_adapter`` combines several (PEFT's
``add_weighted_adapter``, 'linear' and 'cat').
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from .config import LoraConfig
from .core.kinds import delta
from .fingerprint import check_base_fingerprint
from .masking import LORA_LEAVES, partition, trainable_mask
from .merge import base_leaf_key
from .nnx_transform import as_param_tree
from .targets import any_matches, path_str

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
    params = as_param_tree(params)
    trainable, _ = partition(params, trainable_mask(params, config))
    return Adapter(trainable, config, dict(metadata or {}))


def check_adapter_fits(base_params: Params, adapter_params: Params) -> None:
    """Raise ValueError naming the leaf and both shapes if the adapter cannot sit on this base."""
    flat_base = traverse_util.flatten_dict(dict(base_params))
    flat = traverse_util.flatten_dict(dict(adapter_params))
    for key, value in flat.items():
        module, leaf = key[:-1], key[-1]
        if leaf in LORA_LEAVES and leaf not in ("lora_A", "lora_B"):  # a variant's leaf, e.g. lora_magnitude
            weight_key = base_leaf_key(flat_base, module)
            weight_shape = tuple(flat_base[weight_key].shape)
            if len(value.shape) != len(weight_shape) or any(d not in (1, w) for d, w in zip(value.shape, weight_shape)):
                raise ValueError(f"adapter leaf '{path_str(key)}' has shape {tuple(value.shape)}, which does not fit "
                                 f"the base leaf '{path_str(weight_key)}' of shape {weight_shape} (it needs that shape "
                                 f"with 1 on the contracted axes)")
        elif leaf in LORA_LEAVES:
            weight_key = base_leaf_key(flat_base, module)
            weight = flat_base[weight_key]
            other = flat.get(module + ("lora_B" if leaf == "lora_A" else "lora_A",))
            if other is None:
                raise ValueError(f"adapter leaf '{path_str(key)}' has no partner lora_A/lora_B")
            a, b = (value, other) if leaf == "lora_A" else (other, value)
            try:
                jax.eval_shape(functools.partial(delta, shape=tuple(weight.shape)), a, b)
            except (TypeError, ValueError):
                raise ValueError(f"adapter leaf '{path_str(key)}' has shape {tuple(value.shape)} (lora_A "
                                 f"{tuple(a.shape)}, lora_B {tuple(b.shape)}), which does not fit the base leaf "
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
    modules = sorted({k[:-1] for k in flat if k[-1] in LORA_LEAVES})
    stray = [path_str(m) for m in modules
             if not any_matches(config.targets, path_str(m)) or any_matches(config.exclude, path_str(m))]
    if stray:
        raise ValueError(f"{source} holds lora_A/lora_B for layers its config does not target ({stray[:5]}"
                         f"{' ...' if len(stray) > 5 else ''}; targets {list(config.targets)}, exclude "
                         f"{list(config.exclude)}): they would be ignored. Fix the config's targets.")


def apply_adapter(base_params: Params, adapter: Adapter | Params, *, strict: bool = True) -> dict:
    """Base params + adapter -> the LoRA model's param tree (adapter leaves win; base is not copied).

    Checks that every adapter leaf fits the base (an error names the leaf and both shapes) and, for
    an ``Adapter`` that records a base fingerprint, that this is the base it was trained on
    (``BaseMismatchError``; ``strict=False`` warns instead).

    Example::

        params = apply_adapter(base_params, load_adapter("adapters/laptops"))
    """
    from flax import nnx

    if isinstance(base_params, nnx.Module):  # an NNX model with LoRA: the adapter is written into it in place
        from .nnx_transform import load_nnx_params, nnx_params

        merged = apply_adapter(nnx_params(base_params), adapter, strict=strict)
        wanted = adapter.params if isinstance(adapter, Adapter) else adapter
        keys = traverse_util.flatten_dict(dict(wanted)).keys()
        flat = traverse_util.flatten_dict(merged)
        return load_nnx_params(base_params, traverse_util.unflatten_dict({k: flat[k] for k in keys}))
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
                         base_params: Params | None = None) -> Adapter:
    """Combine adapters into one, as PEFT's ``add_weighted_adapter`` does.

    'cat' is exact: each layer's update is sum_i w_i · scale_i · A_i B_i (ranks add up; needs
    ``base_params`` to find each layer's rank axis). 'linear' (equal ranks) sums the factors:
    A = sum_i sign_i sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i, which has cross terms
    A_i B_j. The result has alpha = rank (scale 1), like PEFT's. Only LoRA leaves are combined.

    >>> import numpy as np
    >>> config = LoraConfig(rank=1, alpha=1.0, targets=("fc",))
    >>> one = Adapter({"fc": {"lora_A": np.ones((3, 1)), "lora_B": np.ones((1, 2))}}, config)
    >>> both = add_weighted_adapter([one, one], [0.5, 0.5], "cat", base_params={"fc": {"kernel": np.zeros((3, 2))}})
    >>> both.params["fc"]["lora_A"].shape, both.config.rank
    ((3, 2), 2)
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    dora = [i for i, a in enumerate(adapters) if a.config.use_dora]
    if dora:
        raise ValueError(f"adapters {dora} are DoRA adapters: their magnitudes do not combine linearly, so "
                         f"add_weighted_adapter takes plain LoRA adapters only")
    if combination_type not in ("linear", "cat"):
        raise ValueError(f"combination_type must be 'linear' or 'cat', got {combination_type!r}")
    flats = [traverse_util.flatten_dict(dict(a.params)) for a in adapters]
    modules = sorted({k[:-1] for f in flats for k in f if k[-1] == "lora_A"})
    for module in modules:
        if any(module + ("lora_A",) not in f for f in flats):
            raise ValueError(f"layer '{path_str(module)}' is adapted by some adapters but not all")
    if combination_type == "cat" and base_params is None:
        raise ValueError("'cat' needs base_params to know each layer's kernel layout")
    flat_base = traverse_util.flatten_dict(dict(base_params)) if base_params is not None else {}
    out: dict[tuple[str, ...], Any] = {}
    ranks = set()
    for module in modules:
        a_list = [f[module + ("lora_A",)] for f in flats]
        b_list = [f[module + ("lora_B",)] for f in flats]
        scales = [ad.config.scale_for(a.shape[-1]) * w for ad, a, w in zip(adapters, a_list, weights)]
        if combination_type == "linear":
            if len({a.shape for a in a_list}) != 1:
                raise ValueError(f"'linear' needs equal ranks; layer '{path_str(module)}' has "
                                 f"{[a.shape[-1] for a in a_list]} (use 'cat')")
            a_new = sum(math.copysign(math.sqrt(abs(s)), s) * a for s, a in zip(scales, a_list))
            b_new = sum(math.sqrt(abs(s)) * b for s, b in zip(scales, b_list))
        else:
            weight = flat_base[base_leaf_key(flat_base, module)]
            b_axis = -1 if a_list[0].ndim == weight.ndim + 1 else -2  # broadcast (Einsum) layout keeps r last
            a_new = jnp.concatenate([s * a for s, a in zip(scales, a_list)], axis=-1)
            b_new = jnp.concatenate(b_list, axis=b_axis)
        out[module + ("lora_A",)], out[module + ("lora_B",)] = a_new, b_new
        ranks.add(a_new.shape[-1])
    if len(ranks) != 1:
        raise ValueError(f"combined layers have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    targets = tuple(dict.fromkeys(path_str(m) for m in modules))
    config = LoraConfig(rank=rank, alpha=float(rank), targets=targets, dropout=adapters[0].config.dropout,
                        dropout_rng=adapters[0].config.dropout_rng)
    return Adapter(traverse_util.unflatten_dict(out), config,
                   {"combination_type": combination_type, "weights": list(map(float, weights))})
