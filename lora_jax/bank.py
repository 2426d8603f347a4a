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
from flax.core import meta

from .adapters import Adapter, hotswap_adapter
from .config import LoraConfig
from .masking import adapter_mask, combine
from .merge import base_leaf_key

Params = Mapping[str, Any]


def make_bank(params: Params, adapters: Sequence[Adapter], config: LoraConfig, *, strict: bool = True) -> dict:
    """The adapters stacked into a bank: a tree of the trainable leaves of ``params`` (the slots,
    shaped for ``config``), plus any other leaf an adapter trained (its head, even where ``config``
    has no ``modules_to_save``), with a leading axis of ``len(adapters) + 1``; row i is adapter i put
    into the slots (``hotswap_adapter``: only the rank may differ, the base fingerprint is checked),
    the last row has zero LoRA factors and ``params``' own other leaves, and takes no gradient.

    Args:
      params: the LoRA model's param tree whose LoRA leaves are the slots (rank at least each
        adapter's), or an NNX model built with ``config``.
      adapters: the adapters to serve; each must fit the slots.
      config: the config ``params`` is shaped for (the running model's).
      strict: an adapter trained on another base raises ``BaseMismatchError``; False: warns.

    Returns:
      A nested dict of the trainable leaves, each of shape ``(len(adapters) + 1,) + leaf.shape``.
    """
    if isinstance(adapters, Adapter) or not adapters:
        raise ValueError("make_bank needs a non-empty list of adapters")
    flat_params = traverse_util.flatten_dict(dict(params))
    mask = traverse_util.flatten_dict(adapter_mask(params, config))
    # the slots (the adapter leaves: trained and a variant's frozen ones), then the trained leaves adapters bring (heads)
    keys = [k for k in flat_params if mask.get(k)]
    keys += sorted({k for a in adapters for k in traverse_util.flatten_dict(dict(a.params))
                    if k in flat_params and not mask.get(k) and k[-1] not in ("lora_A", "lora_B")})
    rows = []
    for i, adapter in enumerate(adapters):
        try:
            swapped = traverse_util.flatten_dict(hotswap_adapter(params, adapter, config, strict=strict))
        except ValueError as err:
            raise type(err)(f"adapter {i}: {err}") from None
        rows.append([swapped[k] for k in keys])
    rows.append([_no_adapter(flat_params, k, config) for k in keys])
    return traverse_util.unflatten_dict({k: jnp.stack([row[j] for row in rows]) for j, k in enumerate(keys)})


def _no_adapter(flat: dict, key: tuple[str, ...], config: LoraConfig) -> jax.Array:
    """The "no adapter" row's value of leaf ``key``: zero factors, the variant's neutral leaves (a
    DoRA magnitude equal to the weight's norm), the model's own other leaves (its head)."""
    if key[-1] in ("lora_A", "lora_B"):
        return jnp.zeros_like(flat[key])
    if key[-1] in config.variant.leaves:
        weight = meta.unbox(flat[base_leaf_key(flat, key[:-1])])  # a quantized kernel: its dequantized values
        value = config.variant.neutral_leaves(weight, {key[-1]: tuple(flat[key].shape)})[key[-1]]
        return value.astype(flat[key].dtype)
    return jnp.asarray(flat[key])


def bank_apply(model: Any, params: Params, bank: Params, index: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """``model.apply`` on a batch whose row j uses adapter ``index[j]`` of ``bank`` (-1: no adapter).

    Args:
      model: the ``lora(...)`` model ``params`` belongs to: linen, or an NNX model (run through
        ``nnx_functional``; it is not changed).
      params: its param tree; the leaves the bank holds are taken from the bank, the rest (the
        frozen base) is shared by every row. For an NNX model, None: the model's own.
      bank: from ``make_bank``.
      index: (batch,) int adapter index per row, in [-1, N). Checked where it is concrete (an error
        names the bad rows); under ``jit`` an index outside the range cannot be seen and serves the
        "no adapter" row (< -1) or is clamped to the last adapter (>= N), as jax gathers do.
      *args: the model's batched inputs (leading axis = batch); **kwargs: unbatched keyword arguments.

    Returns:
      The model's output for the batch, row by row as if each row ran with its own adapter.
    """
    return bank_apply_fn(lambda p, *a, **k: model.apply({"params": p}, *a, **k), params, bank, index, *args, **kwargs)


def bank_apply_fn(apply_fn: Any, params: Params, bank: Params, index: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """``bank_apply`` for a model given as ``apply_fn(params, *inputs, **kwargs)`` (a front end's pure
    form of its model: linen's ``model.apply``, NNX's ``nnx_functional``)."""
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
        out = apply_fn(combine(shared, row), *single, **kwargs)
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
