"""merge / unmerge: fold a LoRA update into the base weights and back, as pure functions.

Both are jittable with the config static: ``jax.jit(merge, static_argnums=1)``. Boxed leaves
(``nn.Partitioned`` and other flax axis metadata) are unboxed for the arithmetic and the result is
boxed again with the weight's own names, so a sharded model merges into a sharded model.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

from .boxes import stays_boxed
from .config import LoraConfig, require_config
from .core.kinds import BASE_LEAVES, delta
from .param_targets import param_key_of
from .core.variants import ADAPTER_LEAVES, foreign_leaves
from .masking import NO_ADAPTER_MESSAGE
from .targets import path_str

Params = Mapping[str, Any]


def _modules_with_lora(flat: dict) -> list[tuple[str, ...]]:
    return sorted({k[:-1] for k in flat if k[-1] == "lora_A"})


def base_leaf_key(flat: dict, module: tuple[str, ...]) -> tuple[str, ...]:
    """The key of the weight a LoRA pair adapts at ``module`` (its kernel, an Embed's embedding, or
    the raw param ``P`` whose factors sit in ``P_lora``)."""
    for name in BASE_LEAVES:
        if module + (name,) in flat:
            return module + (name,)
    param_key = param_key_of(module, flat)
    if param_key is not None:
        return param_key
    raise ValueError(f"LoRA leaves at '{path_str(module)}' have no kernel or embedding to adapt there")


def _scaled_delta(a, b, weight, config: LoraConfig):
    update = delta(a.astype(jnp.float32), b.astype(jnp.float32), weight.shape)
    return config.scale_for(a.shape[-1]) * update  # the layer's own rank (rank_pattern)


def _variant_leaves(flat: dict, module: tuple[str, ...], config: LoraConfig, pop: bool) -> dict:
    """The variant's extra leaves at ``module`` (e.g. DoRA's lora_magnitude); an error names a missing one."""
    out = {}
    for leaf in config.variant.leaves:
        if module + (leaf,) not in flat:
            raise ValueError(f"layer '{path_str(module)}' has no {leaf}, which the config's '{config.variant.name}' "
                             f"variant needs: set the config's use_dora / init to match the adapter")
        out[leaf] = flat.pop(module + (leaf,)) if pop else flat[module + (leaf,)]
    return out


def _rebox(original: Any, value: Any) -> Any:
    """``value`` in ``original``'s box (same names and metadata), or bare if ``original`` was bare."""
    return original.replace_boxed(value) if isinstance(original, meta.AxisMetadata) else value


def merge(params: Params, config: LoraConfig) -> dict:
    """W' = W + scale · A·B for every adapted layer (DoRA: ``m / ||W + scale·A·B|| · (W + scale·A·B)``),
    adapter leaves removed.

    The result is a param tree the *untransformed* model accepts, so inference costs nothing extra.
    Given an NNX model, it returns a merged copy of the model whose layers are of their original
    classes (the adapted model is left as it is).

    >>> import jax.numpy as jnp
    >>> params = {"fc": {"kernel": jnp.zeros((3, 2)), "lora_A": jnp.ones((3, 1)), "lora_B": jnp.ones((1, 2))}}
    >>> merge(params, LoraConfig(rank=1, alpha=2.0, targets=("fc",)))["fc"]["kernel"].tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    require_config(config, "merge")
    flat = traverse_util.flatten_dict(dict(params))
    modules = _modules_with_lora(flat)
    if not modules:
        raise ValueError(f"merge: {NO_ADAPTER_MESSAGE} (already merged params need no merge)")
    for module in modules:
        stray = foreign_leaves(config.variant, lambda leaf: module + (leaf,) in flat)
        if stray:
            raise ValueError(f"merge: layer '{path_str(module)}' holds {stray}, leaves of another LoRA variant than "
                             f"the config's '{config.variant.name}': a plain merge would drop them and give another "
                             f"model. Set the config's use_dora / init to match the params")
    for module in modules:
        key = base_leaf_key(flat, module)
        a, b = meta.unbox(flat.pop(module + ("lora_A",))), meta.unbox(flat.pop(module + ("lora_B",)))
        leaves = meta.unbox(_variant_leaves(flat, module, config, pop=True))
        w = meta.unbox(flat[key])
        merged = config.variant.merge(w.astype(jnp.float32), _scaled_delta(a, b, w, config), leaves).astype(w.dtype)
        flat[key] = _rebox(flat[key], merged)
    return traverse_util.unflatten_dict(flat)


def unmerge(params: Params, adapter: Params, config: LoraConfig) -> dict:
    """Inverse of ``merge``: W = W' - scale · A·B, with ``adapter``'s lora_A / lora_B put back.

    ``adapter`` may be a full LoRA param tree or just its trainable part; only its LoRA leaves are
    used (other trained leaves, e.g. a head, are already in ``params`` and stay as they are).

    >>> import jax.numpy as jnp
    >>> params = {"fc": {"kernel": jnp.zeros((3, 2)), "lora_A": jnp.ones((3, 1)), "lora_B": jnp.ones((1, 2))}}
    >>> config = LoraConfig(rank=1, alpha=2.0, targets=("fc",))
    >>> restored = unmerge(merge(params, config), params, config)
    >>> float(abs(restored["fc"]["kernel"]).max()), sorted(restored["fc"])
    (0.0, ['kernel', 'lora_A', 'lora_B'])
    """
    require_config(config, "unmerge")
    flat = traverse_util.flatten_dict(dict(params))
    flat_adapter = {k: v for k, v in traverse_util.flatten_dict(dict(adapter)).items() if k[-1] in ADAPTER_LEAVES}
    modules = _modules_with_lora(flat_adapter)
    if not modules:
        raise ValueError("unmerge: the adapter holds no lora_A/lora_B leaves to subtract")
    for module in modules:
        if module + ("lora_A",) in flat:
            raise ValueError(f"module '{path_str(module)}' already holds LoRA leaves: these params are not merged")
        key = base_leaf_key(flat, module)
        if stays_boxed(flat[key]):  # a stored (quantized) kernel: merge_requantized's output, its codes are new
            raise ValueError(f"unmerge: the kernel at '{path_str(module)}' is quantized (merge_requantized): the "
                             f"merged kernel was rounded again, so subtracting the update would not give the base "
                             f"back. Keep the unmerged params (merge is pure) or reload the quantized base")
        boxed_a, boxed_b = flat_adapter[module + ("lora_A",)], flat_adapter[module + ("lora_B",)]
        boxed_leaves = _variant_leaves(flat_adapter, module, config, pop=False)
        a, b, leaves, w = meta.unbox(boxed_a), meta.unbox(boxed_b), meta.unbox(boxed_leaves), meta.unbox(flat[key])
        restored = config.variant.unmerge(w.astype(jnp.float32), _scaled_delta(a, b, w, config), leaves).astype(w.dtype)
        flat[key] = _rebox(flat[key], restored)
        flat[module + ("lora_A",)], flat[module + ("lora_B",)] = boxed_a, boxed_b
        flat.update({module + (leaf,): value for leaf, value in boxed_leaves.items()})
    return traverse_util.unflatten_dict(flat)
