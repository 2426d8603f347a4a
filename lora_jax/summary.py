"""Trainable-parameter report, PEFT's print_trainable_parameters style, with an optional per-layer table."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from .config import LoraConfig
from .masking import trainable_mask
from .targets import path_str

Params = Mapping[str, Any]


def count_parameters(params: Params, mask: Params | None = None) -> tuple[int, int]:
    """(trainable, total) element counts; with no mask everything counts as trainable.

    >>> import numpy as np
    >>> count_parameters({"a": np.zeros((2, 3)), "b": np.zeros(4)}, {"a": False, "b": True})
    (4, 10)
    """
    flat = traverse_util.flatten_dict(dict(params))
    flat_mask = traverse_util.flatten_dict(dict(mask)) if mask is not None else {k: True for k in flat}
    total = sum(int(np.prod(v.shape)) for v in flat.values())
    trainable = sum(int(np.prod(v.shape)) for k, v in flat.items() if flat_mask[k])
    return trainable, total


def trainable_summary(params: Params, config: LoraConfig, per_layer: bool = False) -> str:
    """'trainable params: 18,432 || all params: 22,731,264 || trainable%: 0.0811' (+ a table).

    ``params``: a LoRA param tree, or an NNX model with LoRA."""
    mask = trainable_mask(params, config)
    trainable, total = count_parameters(params, mask)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100.0 * trainable / total:.4f}"
    if not per_layer:
        return line
    flat = traverse_util.flatten_dict(dict(params))
    flat_mask = traverse_util.flatten_dict(mask)
    rows: dict[str, list[int]] = {}
    for key, value in flat.items():
        row = rows.setdefault(path_str(key[:-1]), [0, 0])
        n = int(np.prod(value.shape))
        row[1] += n
        row[0] += n if flat_mask[key] else 0
    width = max(len("module"), *(len(k) for k in rows))
    lines = [f"{'module':<{width}}  {'trainable':>12}  {'total':>12}", "-" * (width + 28)]
    lines += [f"{k:<{width}}  {t:>12,}  {n:>12,}" for k, (t, n) in sorted(rows.items()) if t]
    return "\n".join(lines + ["-" * (width + 28), line])


def print_trainable_parameters(params: Params, config: LoraConfig, per_layer: bool = False) -> None:
    """Print the trainable/total summary; ``per_layer=True`` adds a table of layers with trainable leaves.

    >>> import numpy as np
    >>> params = {"fc": {"kernel": np.zeros((4, 3)), "lora_A": np.zeros((4, 1)), "lora_B": np.zeros((1, 3))}}
    >>> print_trainable_parameters(params, LoraConfig(rank=1, targets=("fc",)))
    trainable params: 7 || all params: 19 || trainable%: 36.8421
    """
    print(trainable_summary(params, config, per_layer))
