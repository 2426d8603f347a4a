"""Base fingerprints: name the frozen base an adapter was trained on, cheaply, and check it on load.

A fingerprint hashes, for every frozen leaf, its path, its shape and a fixed sample of its values
(up to ``SAMPLES_PER_LEAF`` elements at evenly spaced flat positions, rounded to bfloat16). It
costs a gather of a few thousand elements per leaf on the device instead of copying the whole
base to the host, it is the same for a base held in float32 or bfloat16, and two checkpoints of
the same architecture (another pretraining run, a fine-tuned copy, a random init) differ in
essentially every sampled value. It is a guard against mistakes, not a cryptographic proof: a base
that differs only outside the sampled positions has the same fingerprint.

    fp = base_fingerprint(params, mask)                  # 'sampled-v1:3f2a…'
    check_base_fingerprint(base_params, adapter)         # ValueError if the base differs
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from flax.core import meta

from .core.variants import ADAPTER_LEAVES

Params = Mapping[str, Any]
SCHEME = "sampled-v1"
SAMPLES_PER_LEAF = 4096


class BaseMismatchError(ValueError):
    """An adapter is applied to a base other than the one it was trained on."""


def _sample(value: Any) -> np.ndarray:
    size = int(np.prod(value.shape))
    if size == 0:
        return np.zeros((0,), ml_dtypes.bfloat16)
    idx = np.linspace(0, size - 1, min(size, SAMPLES_PER_LEAF)).round().astype(np.int64)
    flat = jnp.ravel(value) if isinstance(value, jax.Array) else np.ravel(np.asarray(value))
    picked = np.asarray(flat[idx]).astype(np.float32)
    return picked.astype(ml_dtypes.bfloat16)


def _frozen_items(flat: dict[tuple[str, ...], Any], skip: Iterable[tuple[str, ...]]):
    """(key, leaf) of every frozen leaf in path order: not LoRA, not in ``skip``; boxed leaves unboxed
    (a quantized kernel counts as its dequantized values)."""
    skip = set(skip)
    return [(key, meta.unbox(flat[key])) for key in sorted(flat) if key not in skip and key[-1] not in ADAPTER_LEAVES]


def _fingerprint(flat: dict[tuple[str, ...], Any], skip: Iterable[tuple[str, ...]]) -> str:
    digest = hashlib.sha256()
    for key, value in _frozen_items(flat, skip):
        digest.update(f"{'/'.join(map(str, key))}:{tuple(value.shape)};".encode())
        digest.update(_sample(value).tobytes())
    return f"{SCHEME}:{digest.hexdigest()}"


def _legacy_fingerprint(flat: dict[tuple[str, ...], Any], skip: Iterable[tuple[str, ...]]) -> str:
    """The full-content sha256 that adapters written by lora_jax 0.1.0 carry (no scheme prefix)."""
    digest = hashlib.sha256()
    for key, value in _frozen_items(flat, skip):
        value = np.asarray(value)
        digest.update(f"{'/'.join(key)}:{value.shape}:{value.dtype};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def base_fingerprint(params: Params, mask: Params | None = None) -> str:
    """The fingerprint of the frozen leaves of ``params``: every leaf but lora_A/lora_B and, with
    ``mask`` (a trainable mask), the leaves it marks trainable.

    Example::

        fp = base_fingerprint(params, trainable_mask(params, config))   # 'sampled-v1:…'
    """
    flat = traverse_util.flatten_dict(dict(params))
    flat_mask = traverse_util.flatten_dict(dict(mask)) if mask is not None else {}
    return _fingerprint(flat, (k for k, v in flat_mask.items() if v))


def check_base_fingerprint(base_params: Params, adapter_params: Params, recorded: str | None, *,
                           strict: bool = True, source: str = "the adapter") -> None:
    """Compare ``recorded`` (an adapter's ``base_fingerprint``) with the fingerprint of
    ``base_params``, leaving out the leaves the adapter replaces.

    A mismatch raises ``BaseMismatchError`` (a ValueError) or, with ``strict=False``, warns. No
    recorded fingerprint (an imported PEFT adapter, say) means nothing to check.
    """
    if recorded is None or recorded == "":
        return
    if not isinstance(recorded, str):
        raise ValueError(f"{source} records base_fingerprint {recorded!r} ({type(recorded).__name__}); a fingerprint "
                         f"is a string from lora_jax.base_fingerprint (fix or remove the metadata entry)")
    flat = traverse_util.flatten_dict(dict(base_params))
    replaced = traverse_util.flatten_dict(dict(adapter_params)).keys()
    legacy = ":" not in recorded
    actual = (_legacy_fingerprint if legacy else _fingerprint)(flat, replaced)
    if actual == recorded:
        return
    message = (f"{source} was trained on a different base model: it records base fingerprint {recorded[:27]}…, "
               f"the base params given have {actual[:27]}… (their weights differ). Load the base it was trained "
               f"on, or pass strict=False to apply it anyway.")
    if strict:
        raise BaseMismatchError(message)
    warnings.warn(message, stacklevel=3)
