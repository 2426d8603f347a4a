"""Which leaves train: the trainable mask, and partition / combine of param trees by it.

``partition`` returns two *sparse* nested dicts (only the leaves of each side), so the trainable
half is exactly the adapter: it is what the optimizer sees, what gets differentiated, and what an
adapter checkpoint stores.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util

from .config import LoraConfig, require_config
from .core.variants import ADAPTER_LEAVES, FROZEN_ADAPTER_LEAVES
from .targets import any_matches, path_str

Params = Mapping[str, Any]
NO_ADAPTER_MESSAGE = ("these params hold no lora_A/lora_B leaves: add the adapter first with "
                  "lora_jax.init_lora_params(model, base_params, rng, example_input) or model.init(...) on the "
                  "model lora_jax.lora(...) returns")


def _flat(tree: Params) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree))


def _is_trainable(key: tuple[str, ...], module_leaves: set[str], config: LoraConfig) -> bool:
    leaf, module = key[-1], key[:-1]
    if leaf in ADAPTER_LEAVES:
        return leaf not in FROZEN_ADAPTER_LEAVES  # a variant's frozen leaves (PiSSA's initial factors) stay put
    if leaf == "bias" and (config.bias == "all" or (config.bias == "lora_only" and "lora_A" in module_leaves)):
        return True
    return any(any_matches(config.modules_to_save, path_str(module[:k])) for k in range(1, len(module) + 1))


def trainable_mask(params: Params, config: LoraConfig) -> dict:
    """A tree of bools shaped like ``params``: True for adapter leaves (lora_A/lora_B, lora_magnitude), for biases per ``config.bias``,
    and for every leaf under a module named in ``config.modules_to_save``.

    Args:
      params: a LoRA param tree (with lora_A / lora_B leaves).
      config: the adapter's config (bias mode, modules_to_save).

    Returns:
      A nested dict of Python bools with the structure of ``params``.

    >>> import numpy as np
    >>> params = {"fc": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3), "lora_A": np.zeros((4, 1)),
    ...                  "lora_B": np.zeros((1, 3))}, "head": {"kernel": np.zeros((3, 2))}}
    >>> trainable_mask(params, LoraConfig(rank=1, targets=("fc",), modules_to_save=("head",)))
    {'fc': {'kernel': False, 'bias': False, 'lora_A': True, 'lora_B': True}, 'head': {'kernel': True}}
    """
    require_config(config, "trainable_mask")
    flat = _flat(params)
    if not any(k[-1] in ADAPTER_LEAVES for k in flat):
        raise ValueError(NO_ADAPTER_MESSAGE)
    leaves_by_module: dict[tuple[str, ...], set[str]] = {}
    for key in flat:
        leaves_by_module.setdefault(key[:-1], set()).add(key[-1])
    if config.modules_to_save:
        modules = {path_str(k[:i]) for k in flat for i in range(1, len(k))}
        unmatched = [p for p in config.modules_to_save if not any(any_matches([p], m) for m in modules)]
        if unmatched:
            raise ValueError(f"modules_to_save pattern(s) {unmatched} match no module; modules: {sorted(modules)}")
    mask = {k: _is_trainable(k, leaves_by_module[k[:-1]], config) for k in flat}
    return traverse_util.unflatten_dict(mask)


def adapter_mask(params: Params, config: LoraConfig) -> dict:
    """``trainable_mask`` plus the variant's frozen leaves (PiSSA's initial factors): what an adapter
    holds (it is saved, swapped and banked with them, though they do not train).

    >>> import numpy as np
    >>> params = {"fc": {"kernel": np.zeros((4, 3)), "lora_A": np.zeros((4, 1)), "lora_B": np.zeros((1, 3)),
    ...                  "lora_A_init": np.zeros((4, 1)), "lora_B_init": np.zeros((1, 3))}}
    >>> adapter_mask(params, LoraConfig(rank=1, targets=("fc",), init="pissa"))["fc"]["lora_A_init"]
    True
    """
    flat = traverse_util.flatten_dict(trainable_mask(params, config))
    return traverse_util.unflatten_dict({key: trains or key[-1] in config.variant.frozen
                                         for key, trains in flat.items()})


def partition(params: Params, mask: Params) -> tuple[dict, dict]:
    """Split ``params`` into (trainable, frozen) sparse trees by a bool ``mask`` of the same structure.

    >>> trainable, frozen = partition({"fc": {"kernel": 1, "lora_A": 2}}, {"fc": {"kernel": False, "lora_A": True}})
    >>> trainable, frozen
    ({'fc': {'lora_A': 2}}, {'fc': {'kernel': 1}})
    >>> combine(trainable, frozen)
    {'fc': {'lora_A': 2, 'kernel': 1}}
    """
    flat, flat_mask = _flat(params), _flat(mask)
    if flat.keys() != flat_mask.keys():
        extra = sorted(path_str(k) for k in flat.keys() - flat_mask.keys())[:5]
        absent = sorted(path_str(k) for k in flat_mask.keys() - flat.keys())[:5]
        raise ValueError(f"mask does not match params: leaves only in params {extra}, only in mask {absent}")
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(*trees: Params) -> dict:
    """Merge disjoint sparse trees (e.g. ``combine(trainable, frozen)``) back into one param tree."""
    out: dict[tuple[str, ...], Any] = {}
    for tree in trees:
        for key, value in _flat(tree).items():
            if key in out:
                raise ValueError(f"leaf '{path_str(key)}' is present in more than one tree")
            out[key] = value
    return traverse_util.unflatten_dict(out)


def lora_leaves(params: Params) -> dict:
    """The adapter leaves of ``params`` (lora_A / lora_B, and DoRA's lora_magnitude) as a sparse tree.

    >>> lora_leaves({"fc": {"kernel": 1, "lora_A": 2, "lora_B": 3}})
    {'fc': {'lora_A': 2, 'lora_B': 3}}
    """
    return traverse_util.unflatten_dict({k: v for k, v in _flat(params).items() if k[-1] in ADAPTER_LEAVES})
