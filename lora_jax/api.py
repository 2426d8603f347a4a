"""The public verbs, for a param tree or a Flax NNX model.

Each verb is the tree function of its module (``merge.merge``, ``quantize.quantize``, ...); given an
NNX model as its first argument it goes to the NNX front end (``lora_jax.nnx.verbs``), which reads the
model into a tree once and, for verbs that change the model, writes the result back in place and
returns the model. Verbs that return a new tree return one for a tree, and the model for a model.

    merged = merge(params, config)            # a tree: a new tree
    merged_model = merge(nnx_model, config)   # a model: a merged copy with the original layer classes
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from flax import nnx

from . import adapter_folders, adapters, bank, peft_io, summary
from .masking import trainable_mask as _trainable_mask
from .merge import merge as _merge
from .nnx import verbs as nnx_verbs
from .nnx.quantized import quantize_nnx
from .nnx.transform import lora_nnx, merge_nnx
from .quantize import merge_requantized as _merge_requantized, quantize as _quantize
from .linen.transform import lora as _lora


def _for_trees_and_models(tree_verb: Callable[..., Any], model_verb: Callable[..., Any] | None = None, *,
                          first_is_tree: bool = True):
    """``tree_verb`` with an NNX model as first argument sent to ``model_verb`` (default: ``tree_verb``
    on the model's params, for verbs that only read); with ``first_is_tree``, anything else that is
    not a nested dict is a TypeError naming the verb."""
    for_model = model_verb or nnx_verbs.on_params(tree_verb)
    name = tree_verb.__name__

    @functools.wraps(tree_verb)
    def verb(first: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(first, nnx.Module):
            return for_model(first, *args, **kwargs)
        if first_is_tree and not isinstance(first, Mapping):
            raise TypeError(f"{name} takes a param tree (a nested dict) or a flax.nnx model, got {type(first).__name__}")
        return tree_verb(first, *args, **kwargs)

    return verb


lora = _for_trees_and_models(_lora, lora_nnx, first_is_tree=False)
merge = _for_trees_and_models(_merge, merge_nnx)
quantize = _for_trees_and_models(_quantize, quantize_nnx)
merge_requantized = _for_trees_and_models(_merge_requantized, nnx_verbs.merge_requantized)
apply_adapter = _for_trees_and_models(adapters.apply_adapter, nnx_verbs.apply_adapter)
hotswap_adapter = _for_trees_and_models(adapters.hotswap_adapter, nnx_verbs.hotswap_adapter)
make_bank = _for_trees_and_models(bank.make_bank)
bank_apply = _for_trees_and_models(bank.bank_apply, nnx_verbs.bank_apply, first_is_tree=False)
extract_adapter = _for_trees_and_models(adapters.extract_adapter)
trainable_mask = _for_trees_and_models(_trainable_mask)
count_parameters = _for_trees_and_models(summary.count_parameters)
trainable_summary = _for_trees_and_models(summary.trainable_summary)
print_trainable_parameters = _for_trees_and_models(summary.print_trainable_parameters)


def save_adapter(path: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
    return adapter_folders.save_adapter(path, nnx_verbs.tree_of(params), *args, **kwargs)


def export_peft(directory: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
    return peft_io.export_peft(directory, nnx_verbs.tree_of(params), *args, **kwargs)


functools.update_wrapper(save_adapter, adapter_folders.save_adapter)
functools.update_wrapper(export_peft, peft_io.export_peft)
