"""Optimizers for LoRA: LoRA+ (a larger learning rate for ``lora_B`` than for everything else).

LoRA+ (Hayou, Ghosh and Yu, 2024) trains B with ``ratio`` times A's learning rate: with B = 0 at the
start and A random, equal rates leave B's columns learning too slowly. Typical ratios are 4–16.
The optimizer sees the trainable partition (as ``make_train_step`` gives it); every leaf named
``lora_B`` gets the scaled rate, every other trainable leaf (``lora_A``, a head) the base rate.

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     lora_plus(lambda lr: optax.adamw(lr, weight_decay=0.01), 1e-3, ratio=16))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

ScalarOrSchedule = float | Callable[[Any], Any]


def lora_plus_labels(params: Mapping[str, Any]) -> Any:
    """A tree like ``params`` holding ``'lora_B'`` for lora_B leaves and ``'other'`` elsewhere.

    >>> lora_plus_labels({"fc": {"kernel": 0, "lora_A": 0, "lora_B": 0}})
    {'fc': {'kernel': 'other', 'lora_A': 'other', 'lora_B': 'lora_B'}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "lora_B" if getattr(path[-1], "key", None) == "lora_B" else "other", params)


def lora_plus(make_optimizer: Callable[[ScalarOrSchedule], optax.GradientTransformation],
              learning_rate: ScalarOrSchedule, ratio: float = 16.0) -> optax.GradientTransformation:
    """``make_optimizer(learning_rate)`` for every trainable leaf but lora_B, which gets
    ``make_optimizer(ratio · learning_rate)`` (a schedule is scaled step by step).

    Args:
      make_optimizer: builds an optax optimizer from a learning rate or schedule, e.g.
        ``lambda lr: optax.adamw(lr, weight_decay=0.01)``.
      learning_rate: the base rate (a float or an optax schedule).
      ratio: lora_B's rate over the base rate (1 is plain LoRA).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"the LoRA+ ratio must be a positive number, got {ratio!r}")
    if callable(learning_rate):
        scaled: ScalarOrSchedule = lambda count: ratio * learning_rate(count)
    else:
        scaled = ratio * learning_rate
    return optax.multi_transform({"lora_B": make_optimizer(scaled), "other": make_optimizer(learning_rate)},
                                 lora_plus_labels)
