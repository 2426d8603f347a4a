"""TrainState and jitted train / eval steps that differentiate only the trainable partition.

The state keeps the trainable and frozen leaves apart, so no step re-partitions the tree. The step
takes the gradient with respect to the trainable part alone and keeps optimizer state for that
part only: XLA never forms the weight gradients of frozen kernels, and frozen leaves come back as
the very same arrays. The trainable part and optimizer state are donated.

Every step reports ``finite`` (loss and gradient norm are finite) in its metrics, so divergence is
one cheap flag to check; ``skip_nonfinite=True`` additionally leaves the state unchanged on such a
step (the step counter still advances).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util

from .masking import combine, partition
from .targets import path_str

Params = Mapping[str, Any]
LossFn = Callable[[Params, Any, jax.Array], Any]


def check_mask(params: Params | None, mask: Params) -> None:
    """Raise ValueError unless ``mask`` is a tree of bools (over ``params``, if given) that selects
    at least one leaf."""
    flat_mask = traverse_util.flatten_dict(dict(mask))
    not_bool = [path_str(k) for k, v in flat_mask.items() if not isinstance(v, (bool, np.bool_))]
    if not_bool:
        raise ValueError(f"a trainable mask holds Python bools; leaves {not_bool[:5]} are not "
                         f"(build it with lora_jax.trainable_mask)")
    if not any(flat_mask.values()):
        raise ValueError("the trainable mask selects no leaf, so training would change nothing: did you forget "
                         "lora_jax.init_lora_params(...) (the params hold no lora_A/lora_B), or is every target "
                         "excluded?")
    if params is not None:
        partition(params, mask)  # names leaves present in only one of the two trees


@struct.dataclass
class TrainState:
    """Training state: the trainable leaves (updated, donated), the frozen leaves (shared, never
    copied), optimizer state of the trainable part, a step counter and an rng key.

    ``state.params`` is the full tree (trainable and frozen combined), e.g. for evaluation.
    """

    step: jax.Array
    trainable: dict
    frozen: dict
    opt_state: Any
    rng: jax.Array

    @property
    def params(self) -> dict:
        """The full param tree: ``combine(trainable, frozen)``."""
        return combine(self.trainable, self.frozen)

    @classmethod
    def create(cls, params: Params, mask: Params, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        """Split ``params`` by ``mask`` once; optimizer state is initialised on the trainable part only.

        The trainable leaves are copied once here: the step donates them, and the caller's own
        ``params`` (say, a pretrained tree reused for several runs) must stay valid. Frozen leaves
        are shared, never copied.
        """
        check_mask(params, mask)
        trainable, frozen = partition(params, mask)
        trainable = jax.tree.map(jnp.copy, trainable)
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                   opt_state=optimizer.init(trainable), rng=rng)


class TrainStep:
    """``state, metrics = step(state, batch)``; jitted, donating trainable params and optimizer state.

    ``metrics`` holds ``loss``, ``grad_norm``, ``finite`` (a bool: loss and gradient norm are finite)
    and whatever dict ``loss_fn`` returns as aux.
    """

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, mask: Params, *,
                 has_aux: bool = False, donate: bool = True, skip_nonfinite: bool = False):
        check_mask(None, mask)
        self.mask = mask
        flat_mask = traverse_util.flatten_dict(dict(mask))
        self._trainable_keys = frozenset(k for k, v in flat_mask.items() if v)
        self._jitted = jax.jit(self._step, donate_argnums=(0,) if donate else ())
        self._loss_fn, self._optimizer, self._has_aux = loss_fn, optimizer, has_aux
        self._skip_nonfinite = skip_nonfinite

    def _step(self, dynamic, frozen, batch):
        step, trainable, opt_state, rng = dynamic
        rng, step_rng = jax.random.split(rng)

        def objective(t):
            out = self._loss_fn(combine(t, frozen), batch, step_rng)
            return out if self._has_aux else (out, {})

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = self._optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        if self._skip_nonfinite:
            keep_new = lambda new, old: jnp.where(finite, new, old)
            new_trainable = jax.tree.map(keep_new, new_trainable, trainable)
            new_opt_state = jax.tree.map(keep_new, new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
        return (step + 1, new_trainable, new_opt_state, rng), metrics

    def _check_state(self, state: TrainState) -> None:
        keys = frozenset(traverse_util.flatten_dict(dict(state.trainable)))
        if keys != self._trainable_keys:
            only_state = sorted(path_str(k) for k in keys - self._trainable_keys)[:5]
            only_step = sorted(path_str(k) for k in self._trainable_keys - keys)[:5]
            raise ValueError(f"the train step's mask differs from the one the TrainState was created with: "
                             f"trainable only in the state {only_state}, only in the step's mask {only_step}; "
                             f"build both from the same lora_jax.trainable_mask(...)")

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        self._check_state(state)
        dynamic = (state.step, state.trainable, state.opt_state, state.rng)
        (step, trainable, opt_state, rng), metrics = self._jitted(dynamic, state.frozen, batch)
        return state.replace(step=step, trainable=trainable, opt_state=opt_state, rng=rng), metrics

    def lower(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The lowered step, e.g. for ``.compile().cost_analysis()``."""
        self._check_state(state)
        return self._jitted.lower((state.step, state.trainable, state.opt_state, state.rng), state.frozen, batch)

    def compiled_stats(self, state: TrainState, batch: Any) -> dict[str, float]:
        """XLA's own figures for one compiled step, deterministic unlike wall time: ``flops``, and
        ``temp_bytes`` (the activations and scratch it allocates beside its arguments) and ``argument_bytes``."""
        compiled = self.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        memory = compiled.memory_analysis()
        return {"flops": float(cost["flops"]), "temp_bytes": float(memory.temp_size_in_bytes),
                "argument_bytes": float(memory.argument_size_in_bytes)}

    def flops(self, state: TrainState, batch: Any) -> float:
        """XLA's FLOP count for one compiled step."""
        return self.compiled_stats(state, batch)["flops"]

    def cache_size(self) -> int:
        """Number of compiled variants so far (1 after any number of same-shaped calls)."""
        return self._jitted._cache_size()


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mask: Params, *,
                    has_aux: bool = False, donate: bool = True, skip_nonfinite: bool = False) -> TrainStep:
    """Build the jitted train step.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> loss`` (or ``(loss, aux_dict)`` with ``has_aux``);
        ``params`` is the full tree, ``rng`` a fresh key per step for dropout streams.
      optimizer: any optax transformation; it sees only the trainable leaves.
      mask: the bool tree from ``trainable_mask``; it must select at least one leaf.
      skip_nonfinite: on a step whose loss or gradient norm is not finite, keep the params and
        optimizer state as they were (``metrics['finite']`` is False either way).

    Example::

        step = make_train_step(loss_fn, optax.adamw(1e-3), mask)
        state, metrics = step(state, batch)
        if not metrics["finite"]:
            raise FloatingPointError(f"loss is {metrics['loss']} at step {int(state.step)}")
    """
    return TrainStep(loss_fn, optimizer, mask, has_aux=has_aux, donate=donate, skip_nonfinite=skip_nonfinite)


def make_eval_step(metric_fn: Callable[[Params, Any], Any]) -> Callable[[Params, Any], Any]:
    """Jit ``metric_fn(params, batch)`` for evaluation (no rng: dropout off)."""
    return jax.jit(metric_fn)


def dropout_rngs(rng: jax.Array, *streams: str) -> dict[str, jax.Array]:
    """One independent key per named rng stream, e.g. ``dropout_rngs(rng, 'dropout', 'lora_dropout')``."""
    return dict(zip(streams, jax.random.split(rng, len(streams))))
