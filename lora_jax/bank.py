"""Many adapters in one batch: a stacked adapter bank and a per-example adapter index.

``make_bank`` puts N adapters (any ranks up to the model's slots, each with its own alpha, rsLoRA,
``rank_pattern`` and trained head) into one tree whose leaves carry a leading axis of N + 1: each
adapter padded into the slots and rescaled as ``hotswap_adapter`` does, and a last row of zero
updates for "no adapter". ``bank_apply`` runs one compiled forward over a batch whose rows pick
their adapter by index (-1: none): the frozen base is shared by every row, while each row's
low-rank product uses its own factors (``jax.vmap`` over the rows, the base unbatched, so the base
matmuls stay one batched matmul). Gradients with respect to the bank reach only the adapters the
batch's rows use; the no-adapter row is a constant.

    bank = make_bank(lora_params, [adapter_a, adapter_b, adapter_c], config)
    logits = bank_apply(lora_model, lora_params, bank, jnp.array([0, 2, -1, 1]), input_ids)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .adapters import Adapter, hotswap_adapter
from .config import LoraConfig
from .masking import combine, partition, trainable_mask

Params = Mapping[str, Any]


def make_bank(params: Params, adapters: Sequence[Adapter], config: LoraConfig) -> dict:
    """The adapters stacked into a bank: a tree of the trainable leaves of ``params`` (the slots,
    shaped for ``config``) with a leading axis of ``len(adapters) + 1``; row i is adapter i put into
    the slots (``hotswap_adapter``), the last row has zero LoRA factors and ``params``' own other
    trained leaves (e.g. its head), and takes no gradient.

    Args:
      params: the LoRA model's param tree whose LoRA leaves are the slots (rank at least each adapter's).
      adapters: the adapters to serve; each must fit the slots.
      config: the config ``params`` is shaped for (the running model's).

    Returns:
      A nested dict of the trainable leaves, each of shape ``(len(adapters) + 1,) + leaf.shape``.
    """
    if not adapters:
        raise ValueError("make_bank needs at least one adapter")
    mask = trainable_mask(params, config)  # swapping an adapter in keeps every leaf's place and shape
    trainable, _ = partition(params, mask)
    rows = [partition(hotswap_adapter(params, adapter, config), mask)[0] for adapter in adapters]
    flat_none = traverse_util.flatten_dict(dict(trainable))
    none = traverse_util.unflatten_dict({k: jnp.zeros_like(v) if k[-1] in ("lora_A", "lora_B") else jnp.asarray(v)
                                         for k, v in flat_none.items()})
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows, none)


def bank_apply(model: Any, params: Params, bank: Params, index: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """``model.apply`` on a batch whose row j uses adapter ``index[j]`` of ``bank`` (-1: no adapter).

    Args:
      model: the ``lora(...)`` model ``params`` belongs to.
      params: its param tree; the leaves the bank holds are taken from the bank, the rest (the
        frozen base) is shared by every row.
      bank: from ``make_bank``.
      index: (batch,) int adapter index per row, in [-1, N). Checked where it is concrete (an error
        names the bad rows); under ``jit`` an index outside the range cannot be seen and serves the
        "no adapter" row (< -1) or is clamped to the last adapter (>= N), as jax gathers do.
      *args: the model's batched inputs (leading axis = batch); **kwargs: unbatched keyword arguments.

    Returns:
      The model's output for the batch, row by row as if each row ran with its own adapter.
    """
    n_rows = jax.tree.leaves(bank)[0].shape[0]
    _check_index(index, n_rows - 1)
    index = jnp.asarray(index)
    if index.ndim != 1 or any(a.shape[0] != index.shape[0] for a in jax.tree.leaves(args)):
        raise ValueError(f"index must be (batch,) with one entry per row of every input; got index "
                         f"{tuple(index.shape)} and inputs {[tuple(a.shape) for a in jax.tree.leaves(args)]}")
    none = index < 0
    index = jnp.where(none, n_rows - 1, index)  # -1: the bank's last row, no adapter
    flat_bank = traverse_util.flatten_dict(dict(bank))
    shared = traverse_util.unflatten_dict({k: v for k, v in traverse_util.flatten_dict(dict(params)).items()
                                           if k not in flat_bank})

    def gather(leaf: jax.Array) -> jax.Array:  # rows without an adapter read the last row, as a constant
        picked = leaf[index]
        keep = none.reshape((-1,) + (1,) * (picked.ndim - 1))
        return jnp.where(keep, jax.lax.stop_gradient(picked), picked)

    rows = jax.tree.map(gather, bank)

    def one(row: Params, *row_args: Any) -> Any:
        single = [jnp.expand_dims(a, 0) for a in row_args]
        out = model.apply({"params": combine(shared, row)}, *single, **kwargs)
        return jax.tree.map(lambda o: o[0], out)

    return jax.vmap(one)(rows, *args)


def _check_index(index: Any, n_adapters: int) -> None:
    """ValueError for a non-integer index, or a concrete one outside [-1, n_adapters)."""
    dtype = getattr(index, "dtype", None) if not isinstance(index, (list, tuple)) else np.asarray(index).dtype
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"index must be an integer array, one adapter index per row in [-1, {n_adapters}), got "
                         f"{getattr(dtype, 'name', type(index).__name__)}")
    if isinstance(index, jax.core.Tracer):
        return  # under jit: not visible here
    values = np.asarray(index)
    bad = np.flatnonzero((values < -1) | (values >= n_adapters))
    if bad.size:
        raise ValueError(f"index rows {bad[:5].tolist()} hold {values[bad[:5]].tolist()}: the bank has {n_adapters} "
                         f"adapters, so an index is -1 (no adapter) or 0..{n_adapters - 1}")
