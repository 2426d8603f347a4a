"""TrainState and jitted train / eval steps that differentiate only the trainable partition.

The state keeps the trainable and frozen leaves apart, so no step re-partitions the tree. The step
takes the gradient with respect to the trainable part alone and keeps optimizer state for that
part only: XLA never forms the weight gradients of frozen kernels, and frozen leaves come back as
the very same arrays. The trainable part and optimizer state are donated.

On a mesh, ``TrainState.create(..., shardings=...)`` places every leaf once (params by the given
shardings, optimizer moments like the params they follow, step counter and rng replicated), and the
step returns each leaf with the sharding it came in with: the adapter's layout is stable across
steps and the step compiles once.

Every step reports ``finite`` (the loss, the gradient norm and the updated trainable leaves are
finite) in its metrics, so divergence, on the last step too, is one cheap flag to check;
``skip_nonfinite=True`` additionally leaves the state unchanged on such a
step (the step counter still advances).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from jax.sharding import NamedSharding, Sharding

from .finite import all_finite
from .masking import combine, partition
from .boxes import replicated_like, stays_boxed, unbox_but_stored
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


def trainable_keys(mask: Params) -> frozenset:
    """The flattened keys ``mask`` marks trainable."""
    return frozenset(k for k, v in traverse_util.flatten_dict(dict(mask)).items() if v)


def check_state_mask(state: "TrainState", wanted: frozenset, whose: str) -> None:
    """ValueError unless ``state``'s trainable leaves are exactly ``wanted`` (``trainable_keys(mask)``)."""
    keys = frozenset(traverse_util.flatten_dict(dict(state.trainable)))
    if keys != wanted:
        only_state = sorted(path_str(k) for k in keys - wanted)[:5]
        only_mask = sorted(path_str(k) for k in wanted - keys)[:5]
        raise ValueError(f"{whose} mask differs from the one the TrainState was created with: trainable only in "
                         f"the state {only_state}, only in the mask {only_mask}; build both from the same "
                         f"lora_jax.trainable_mask(...)")


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
    def create(cls, params: Params, mask: Params, optimizer: optax.GradientTransformation, rng: jax.Array, *,
               shardings: Params | Sharding | None = None) -> "TrainState":
        """Split ``params`` by ``mask`` once; optimizer state is initialised on the trainable part only.

        The trainable leaves are copied once here: the step donates them, and the caller's own
        ``params`` (say, a pretrained tree reused for several runs) must stay valid. Frozen leaves
        are shared, never copied. Boxed params (``nn.Partitioned``) are unboxed; quantized kernels
        (``lora_jax.quantize``) stay quantized.

        Args:
          shardings: where the state lives on a mesh: one ``jax.sharding.Sharding`` for every leaf, or a
            tree like ``params`` of them (e.g. ``jax.tree.map(lambda s: NamedSharding(mesh, s),
            nn.get_partition_spec(params))``). Optimizer moments take the sharding of the param they
            follow; the step counter, the rng and scalars are replicated. None: jax's default placement.

        Example::

            mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
            specs = nn.get_partition_spec(boxed_params)            # LoRA factors inherit their kernel's names
            shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
            state = TrainState.create(nn.unbox(boxed_params), mask, tx, rng, shardings=shardings)
        """
        _check_optimizer(optimizer, "TrainState.create")
        _check_rng(rng)
        if not isinstance(params, Mapping):
            raise TypeError(f"TrainState.create takes a param tree (a nested dict), got {type(params).__name__}; for "
                            f"an NNX model, train its tree: apply, params = lora_jax.nnx_functional(model)")
        params = unbox_but_stored(params)  # quantized kernels stay small
        check_mask(params, mask)
        trainable, frozen = partition(params, mask)
        trainable = jax.tree.map(jnp.copy, trainable)
        step = jnp.zeros((), jnp.int32)
        if shardings is None:
            return cls(step=step, trainable=trainable, frozen=frozen, opt_state=optimizer.init(trainable), rng=rng)
        per_leaf = _per_leaf_shardings(params, shardings)
        train_sh, frozen_sh = partition(per_leaf, mask)
        trainable, frozen = jax.device_put(trainable, train_sh), jax.device_put(frozen, frozen_sh)
        replicated = replicated_like(jax.tree.leaves(per_leaf)[0])
        opt_sh = _optimizer_shardings(optimizer, trainable, train_sh, replicated)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(trainable)
        return cls(step=jax.device_put(step, replicated), trainable=trainable, frozen=frozen, opt_state=opt_state,
                   rng=jax.device_put(rng, replicated))


def _check_optimizer(optimizer: Any, where: str) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"{where} takes an optax GradientTransformation (e.g. optax.adamw(1e-3)), got "
                        f"{type(optimizer).__name__}")


def _check_rng(rng: Any) -> None:
    """A jax PRNG key: a typed key array, or a legacy uint32 key of shape (2,)."""
    dtype = getattr(rng, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and np.shape(rng) == ()
    legacy = dtype == np.uint32 and np.shape(rng) == (2,)
    if not (typed or legacy):
        raise TypeError(f"TrainState.create takes a jax PRNG key as rng, e.g. jax.random.key(0), got "
                        f"{type(rng).__name__}{' ' + str(np.shape(rng)) if dtype is not None else ''}")


def _per_leaf_shardings(params: Params, shardings: Params | Sharding) -> dict:
    """A tree like ``params`` of shardings (a quantized kernel's codes and scales each get their own:
    ``QuantizedKernel.leaf_shardings``); every sharding on one set of devices."""
    if isinstance(shardings, Sharding):
        shardings = jax.tree.map(lambda _: shardings, dict(params), is_leaf=stays_boxed)
    if not isinstance(shardings, Mapping):
        raise TypeError(f"shardings must be one jax.sharding.Sharding or a tree like the params of them, got "
                        f"{shardings!r} ({type(shardings).__name__}); e.g. NamedSharding(mesh, PartitionSpec('model'))")
    flat, flat_sh = traverse_util.flatten_dict(dict(params)), traverse_util.flatten_dict(dict(shardings))
    missing = sorted(path_str(k) for k in flat.keys() - flat_sh.keys())[:5]
    if missing:
        raise ValueError(f"shardings has no entry for params {missing}: give a tree like the params (LoRA leaves "
                         f"included, e.g. from nn.get_partition_spec of the initialised LoRA model) or one Sharding")
    bad = [path_str(k) for k, v in flat_sh.items() if k in flat and not isinstance(v, Sharding)][:5]
    if bad:
        raise ValueError(f"shardings at {bad} are not jax.sharding.Sharding objects (a PartitionSpec needs a mesh: "
                         f"NamedSharding(mesh, spec))")
    device_sets = {frozenset(flat_sh[k].device_set) for k in flat}
    if len(device_sets) > 1:
        raise ValueError(f"shardings span {len(device_sets)} different sets of devices (two meshes?): every leaf of "
                         f"one TrainState must live on the same mesh")
    return traverse_util.unflatten_dict({k: v.leaf_shardings(flat_sh[k]) if stays_boxed(v) else flat_sh[k]
                                         for k, v in flat.items()})  # a quantized kernel places its codes


def _optimizer_shardings(optimizer, trainable: dict, train_sh: dict, replicated: Sharding):
    """Each optimizer-state leaf gets the sharding of the trainable leaf whose path it ends with and
    whose shape it has (Adam's mu / nu), else replicated (counts, scalars)."""
    by_path = {tuple(str(getattr(k, "key", k)) for k in path): (np.shape(v), sh) for (path, v), sh in zip(
        jax.tree_util.tree_flatten_with_path(trainable)[0], jax.tree.leaves(train_sh))}
    shapes = jax.eval_shape(optimizer.init, trainable)

    def pick(path, leaf):
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, shapes)


class TrainStep:
    """``state, metrics = step(state, batch)``; jitted, donating trainable params and optimizer state.

    ``metrics`` holds ``loss``, ``grad_norm``, ``finite`` (a bool: the loss, the gradient norm and
    every updated trainable leaf are finite) and whatever dict ``loss_fn`` returns as aux.
    """

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, mask: Params, *,
                 has_aux: bool = False, donate: bool = True, skip_nonfinite: bool = False,
                 batch_sharding: Sharding | None = None):
        check_mask(None, mask)
        _check_optimizer(optimizer, "make_train_step")
        if not callable(loss_fn):
            raise TypeError(f"make_train_step takes loss_fn(params, batch, rng) -> loss, got {type(loss_fn).__name__}")
        self.mask = mask
        self._trainable_keys = trainable_keys(mask)  # each call checks the state against these
        self._donate = (0,) if donate else ()
        self._jitted = jax.jit(self._step, donate_argnums=self._donate)
        self._on_mesh: dict[Any, Any] = {}  # the step jitted with fixed output shardings, per state layout
        self._batch_sharding = batch_sharding
        self._loss_fn, self._optimizer, self._has_aux = loss_fn, optimizer, has_aux
        self._skip_nonfinite = skip_nonfinite
        self._placement_checked = False

    def _step(self, dynamic, frozen, batch):
        step, trainable, opt_state, rng = dynamic
        rng, step_rng = jax.random.split(rng)

        def objective(t):
            out = self._loss_fn(combine(t, frozen), batch, step_rng)
            if self._has_aux and not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
                raise TypeError(f"has_aux=True: loss_fn must return (loss, dict of metrics), got "
                                f"{type(out).__name__}")
            if not self._has_aux and isinstance(out, (tuple, list)):
                raise TypeError(f"loss_fn returned a {type(out).__name__} of {len(out)}; a (loss, aux) pair needs "
                                f"make_train_step(..., has_aux=True) (aux: a dict of metrics)")
            return out if self._has_aux else (out, {})

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = self._optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_trainable)
        if self._skip_nonfinite:
            keep_new = lambda new, old: jnp.where(finite, new, old)
            new_trainable = jax.tree.map(keep_new, new_trainable, trainable)
            new_opt_state = jax.tree.map(keep_new, new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
        return (step + 1, new_trainable, new_opt_state, rng), metrics

    def _check_state(self, state: TrainState) -> None:
        check_state_mask(state, self._trainable_keys, "the train step's")

    def _for_state(self, dynamic: Any):
        """The jitted step for this state's placement: on more than one device, outputs are pinned to
        the inputs' shardings, so the next step sees the same layout and does not compile again."""
        shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(dynamic)]
        if not any(s is not None and len(s.device_set) > 1 for s in shardings):
            return self._jitted
        key = (jax.tree.structure(dynamic), tuple(shardings))
        if key not in self._on_mesh:
            out = jax.tree.unflatten(jax.tree.structure(dynamic), shardings)
            self._on_mesh[key] = jax.jit(self._step, donate_argnums=self._donate, out_shardings=(out, None))
        return self._on_mesh[key]

    def _warn_unplaced_state(self, dynamic: Any, batch: Any) -> None:
        """On the first call, warn when the batch spans several devices but the state sits on one:
        XLA then places the returned state itself, and the second step compiles again for that
        placement (later calls see the state XLA placed)."""
        if self._placement_checked:
            return
        self._placement_checked = True
        spans = lambda tree: max((len(x.sharding.device_set) for x in jax.tree.leaves(tree)
                                  if isinstance(x, jax.Array)), default=1)
        if spans(batch) > 1 and spans(dynamic) == 1:
            warnings.warn(f"the batch spans {spans(batch)} devices but the TrainState sits on one: the step will "
                          f"compile again on its second call, for the placement XLA picks. Create the state with "
                          f"TrainState.create(..., shardings=...) (e.g. one replicated NamedSharding) to compile "
                          f"once", stacklevel=3)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        self._check_state(state)
        dynamic = (state.step, state.trainable, state.opt_state, state.rng)
        if self._batch_sharding is not None:
            batch = jax.device_put(batch, self._batch_sharding)
        self._warn_unplaced_state(dynamic, batch)
        (step, trainable, opt_state, rng), metrics = self._for_state(dynamic)(dynamic, state.frozen, batch)
        return state.replace(step=step, trainable=trainable, opt_state=opt_state, rng=rng), metrics

    def lower(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The lowered step, e.g. for ``.compile().cost_analysis()``."""
        self._check_state(state)
        dynamic = (state.step, state.trainable, state.opt_state, state.rng)
        if self._batch_sharding is not None:
            batch = jax.device_put(batch, self._batch_sharding)
        return self._for_state(dynamic).lower(dynamic, state.frozen, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mask: Params, *,
                    has_aux: bool = False, donate: bool = True, skip_nonfinite: bool = False,
                    batch_sharding: Sharding | None = None) -> TrainStep:
    """Build the jitted train step.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> loss`` (or ``(loss, aux_dict)`` with ``has_aux``);
        ``params`` is the full tree, ``rng`` a fresh key per step for dropout streams.
      optimizer: any optax transformation; it sees only the trainable leaves.
      mask: the bool tree from ``trainable_mask``; it must select at least one leaf.
      skip_nonfinite: on a step whose loss, gradient norm or updated params are not finite, keep the params and
        optimizer state as they were (``metrics['finite']`` is False either way).
      batch_sharding: where each batch goes before the step (e.g. ``NamedSharding(mesh, P('data'))``
        for data parallelism); None: as the caller placed it. The state's own placement comes from
        ``TrainState.create(..., shardings=...)``.

    Returns:
      A ``TrainStep``: ``state, metrics = step(state, batch)``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> from lora_jax import LoraConfig, lora, trainable_mask
    >>> config = LoraConfig(rank=2, targets=("layers_0",))
    >>> model = lora(nn.Sequential([nn.Dense(8), nn.Dense(1)]), config)
    >>> params = model.init(jax.random.key(0), jnp.ones((4, 3)))["params"]
    >>> mask = trainable_mask(params, config)
    >>> loss_fn = lambda p, batch, rng: jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)
    >>> tx = optax.adam(1e-2)
    >>> state = TrainState.create(params, mask, tx, jax.random.key(1))
    >>> step = make_train_step(loss_fn, tx, mask)
    >>> state, metrics = step(state, {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 1))})
    >>> int(state.step), bool(metrics["finite"]), sorted(state.trainable["layers_0"])
    (1, True, ['lora_A', 'lora_B'])
    """
    return TrainStep(loss_fn, optimizer, mask, has_aux=has_aux, donate=donate, skip_nonfinite=skip_nonfinite,
                     batch_sharding=batch_sharding)


def make_eval_step(metric_fn: Callable[[Params, Any], Any]) -> Callable[[Params, Any], Any]:
    """Jit ``metric_fn(params, batch)`` for evaluation (no rng: dropout off).

    >>> import jax.numpy as jnp
    >>> float(make_eval_step(lambda p, b: (p["w"] * b).sum())({"w": jnp.ones(3)}, jnp.arange(3.0)))
    3.0
    """
    return jax.jit(metric_fn)


def dropout_rngs(rng: jax.Array, *streams: str) -> dict[str, jax.Array]:
    """One independent key per named rng stream.

    >>> sorted(dropout_rngs(jax.random.key(0), "dropout", "lora_dropout"))
    ['dropout', 'lora_dropout']
    """
    return dict(zip(streams, jax.random.split(rng, len(streams))))
