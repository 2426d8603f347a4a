"""TrainState and jitted train / eval steps that differentiate only the trainable partition.

The step splits params with the (static) mask, takes the gradient with respect to the trainable
part alone, and keeps optimizer state for that part only. XLA therefore never forms the weight
gradients of frozen kernels, and frozen leaves never pass through the compiled step: they come
back as the very same arrays. The trainable part and optimizer state are donated.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

from .masking import combine, partition

Params = Mapping[str, Any]
LossFn = Callable[[Params, Any, jax.Array], Any]


@struct.dataclass
class TrainState:
    """Training state: full params (trainable + frozen), optimizer state of the trainable part,
    step counter and rng."""

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Params, mask: Params, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        """Optimizer state is initialised on the trainable partition only.

        The trainable leaves are copied once here: the step donates them, and the caller's own
        ``params`` (say, a pretrained tree reused for several runs) must stay valid. Frozen leaves
        are shared, never copied.
        """
        trainable, frozen = partition(params, mask)
        trainable = jax.tree.map(jnp.copy, trainable)
        return cls(step=jnp.zeros((), jnp.int32), params=combine(trainable, frozen),
                   opt_state=optimizer.init(trainable), rng=rng)


class TrainStep:
    """``state, metrics = step(state, batch)``; jitted, donating trainable params and optimizer state.

    ``metrics`` holds ``loss``, ``grad_norm`` and whatever dict ``loss_fn`` returns as aux.
    """

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, mask: Params, *,
                 has_aux: bool = False, donate: bool = True):
        self.mask = mask
        self._jitted = jax.jit(self._step, donate_argnums=(0,) if donate else ())
        self._loss_fn, self._optimizer, self._has_aux = loss_fn, optimizer, has_aux

    def _step(self, dynamic, frozen, batch):
        step, trainable, opt_state, rng = dynamic
        rng, step_rng = jax.random.split(rng)

        def objective(t):
            out = self._loss_fn(combine(t, frozen), batch, step_rng)
            return out if self._has_aux else (out, {})

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, opt_state = self._optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
        return (step + 1, trainable, opt_state, rng), metrics

    def _split(self, state: TrainState):
        trainable, frozen = partition(state.params, self.mask)
        return (state.step, trainable, state.opt_state, state.rng), frozen

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        dynamic, frozen = self._split(state)
        (step, trainable, opt_state, rng), metrics = self._jitted(dynamic, frozen, batch)
        return TrainState(step=step, params=combine(trainable, frozen), opt_state=opt_state, rng=rng), metrics

    def lower(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The lowered step, e.g. for ``.compile().cost_analysis()``."""
        dynamic, frozen = self._split(state)
        return self._jitted.lower(dynamic, frozen, batch)

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
                    has_aux: bool = False, donate: bool = True) -> TrainStep:
    """Build the jitted train step.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> loss`` (or ``(loss, aux_dict)`` with ``has_aux``);
        ``params`` is the full tree, ``rng`` a fresh key per step for dropout streams.
      optimizer: any optax transformation; it sees only the trainable leaves.
      mask: the bool tree from ``trainable_mask``.
    """
    return TrainStep(loss_fn, optimizer, mask, has_aux=has_aux, donate=donate)


def make_eval_step(metric_fn: Callable[[Params, Any], Any]) -> Callable[[Params, Any], Any]:
    """Jit ``metric_fn(params, batch)`` for evaluation (no rng: dropout off)."""
    return jax.jit(metric_fn)


def dropout_rngs(rng: jax.Array, *streams: str) -> dict[str, jax.Array]:
    """One independent key per named rng stream, e.g. ``dropout_rngs(rng, 'dropout', 'lora_dropout')``."""
    return dict(zip(streams, jax.random.split(rng, len(streams))))
