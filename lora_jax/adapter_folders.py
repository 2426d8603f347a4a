"""Adapter folders: ``save_adapter`` / ``load_adapter``, atomic, checked, recoverable.

An adapter folder holds orbax items ``params`` (the trainable leaves), ``config`` and ``metadata``,
plus ``lora_jax_adapter.json``: a manifest with the size and sha256 of every file. The manifest
makes an adapter recognisable (``save_adapter`` overwrites nothing else) and lets ``load_adapter``
name a corrupt file before any of it is read. Saves are atomic and recoverable (``folder_swap``).
Training state for resume lives in ``lora_jax.resume``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from .adapters import Adapter, check_adapter_fits, check_targets_cover
from .config import LoraConfig
from .finite import nonfinite_leaves
from .fingerprint import base_fingerprint, check_base_fingerprint
from .folder_swap import folder_path, locked, recover_folder, replace_folder
from .masking import partition, trainable_mask
from .orbax_io import quiet_orbax, short_error
from .targets import path_str
from .version import __version__

Params = Mapping[str, Any]
MANIFEST = "lora_jax_adapter.json"
FORMAT = "lora_jax.adapter"
_ITEMS = ("params", "config", "metadata")
_LEGACY_ENTRIES = {"params", "config", "metadata", "_CHECKPOINT_METADATA", "commit_success.txt"}

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- the manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _write_manifest(folder: Path) -> None:
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}
             for rel in _files(folder) if rel != MANIFEST}
    manifest = {"format": FORMAT, "format_version": 1, "lora_jax_version": __version__, "files": files}
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{MANIFEST} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST} is not a lora_jax adapter manifest")
    return manifest


def _recognise(folder: Path) -> str | None:
    """None if ``folder`` holds a lora_jax adapter and nothing else; otherwise why it does not."""
    present = _files(folder)
    if (folder / MANIFEST).is_file():
        try:
            listed = set(_read_manifest(folder)["files"])
        except ValueError as err:
            return str(err)
        foreign = [f for f in present if f not in listed and f != MANIFEST]
        return f"it also holds {foreign[:5]}" if foreign else None
    top = sorted(p.name for p in folder.iterdir())
    try:
        legacy_meta = json.loads((folder / "metadata" / "metadata").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        legacy_meta = None
    if set(top) <= _LEGACY_ENTRIES and isinstance(legacy_meta, dict) and "lora_jax_version" in legacy_meta:
        return None  # an adapter written before manifests existed
    return f"no {MANIFEST}; it holds {top[:5]}{' ...' if len(top) > 5 else ''}"


def _verify(folder: Path) -> None:
    """Raise ValueError naming the first file whose size or checksum differs from the manifest."""
    if not (folder / MANIFEST).is_file():
        reason = _recognise(folder)
        if reason is not None:
            raise ValueError(f"not a lora_jax adapter folder ({reason})")
        return  # legacy adapter: no checksums to verify
    for rel, expected in _read_manifest(folder)["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ValueError(f"file {rel} is missing")
        if path.stat().st_size != expected.get("size") or _sha256(path) != expected.get("sha256"):
            raise ValueError(f"file {rel} is damaged (its size or checksum differs from {MANIFEST})")


# ----------------------------------------------------------------------------------- save / load


def save_adapter(path: str | Path, params: Params, config: LoraConfig, *, base_model: str | None = None,
                 metadata: dict | None = None, fingerprint: bool = True, allow_nonfinite: bool = False) -> Path:
    """Save only the trainable leaves of ``params`` (per ``config``) + the config + metadata.

    Metadata records the lora_jax version, ``base_model`` (a name or path) and, with
    ``fingerprint``, a fingerprint of the frozen base (``lora_jax.base_fingerprint``), checked when
    the adapter is loaded onto a base. ``path`` may be new, an empty folder, or an adapter saved
    before; anything else there is an error and is left untouched (``~`` is expanded; an empty path
    is refused). Returns the adapter folder.

    Everything is checked before a file is written: leaves holding inf or NaN (a diverged run) are
    refused unless ``allow_nonfinite``; lora_A/lora_B at layers ``config`` does not target (they
    would be ignored on load) are refused; ``metadata`` must be JSON (str keys; str, finite number,
    bool, None, lists and dicts of them).

    Example::

        save_adapter("adapters/laptops", state.params, config, base_model="packaged:minilm")
    """
    path = folder_path(path, "the adapter")
    mask = trainable_mask(params, config)
    trainable, _ = partition(params, mask)
    check_targets_cover(trainable, config, source="the params to save")
    bad = [] if allow_nonfinite else nonfinite_leaves(trainable)
    if bad:
        raise ValueError(f"the adapter's leaves {bad[:5]}{' ...' if len(bad) > 5 else ''} hold inf or NaN (training "
                         f"diverged?); nothing was saved. Lower the learning rate, or pass allow_nonfinite=True to "
                         f"keep them for inspection")
    if base_model is not None and not isinstance(base_model, str):
        raise TypeError(f"base_model must be a name or path (str), got {type(base_model).__name__}")
    meta = {"lora_jax_version": __version__, "base_model": base_model, **check_metadata(metadata or {}, "metadata")}
    if fingerprint:
        meta["base_fingerprint"] = base_fingerprint(params, mask)

    def write(tmp: Path) -> None:
        with quiet_orbax():
            ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(tmp, args=ocp.args.Composite(
                params=ocp.args.StandardSave(trainable),
                config=ocp.args.JsonSave(config.to_dict()),
                metadata=ocp.args.JsonSave(meta)))
        _write_manifest(tmp)

    return replace_folder(path, write, _recognise, "a lora_jax adapter")


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _abstract_params(path: Path) -> dict:
    """ShapeDtypeStructs of the saved leaves, from orbax's metadata, checked before anything is allocated."""
    with quiet_orbax():
        tree = ocp.Checkpointer(ocp.StandardCheckpointHandler()).metadata(path / "params").item_metadata.tree
    flat = traverse_util.flatten_dict(dict(tree))
    total = 0
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {}
    for key, meta in flat.items():
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        if shape is None or dtype is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            raise ValueError(f"leaf '{path_str(key)}' has no valid shape/dtype in the saved metadata ({shape}, {dtype})")
        total += int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        abstract[key] = jax.ShapeDtypeStruct(tuple(int(d) for d in shape), np.dtype(dtype), sharding=device)
    if total > _memory_bytes():
        raise ValueError(f"its arrays would take {total:,} bytes, more than this machine's memory "
                         f"({_memory_bytes():,} bytes); the saved shapes are implausible for an adapter")
    return traverse_util.unflatten_dict(abstract)


def check_metadata(metadata: Any, source: str) -> dict:
    """``metadata`` if it is JSON an adapter can carry, else a ValueError naming the first bad entry:
    a dict with str keys; values str, finite int/float, bool, None, or lists / dicts of them; the
    fields lora_jax reads (``lora_jax_version``, ``base_model``, ``base_fingerprint``) str or None.

    >>> check_metadata({"labels": ["negative", "positive"]}, "metadata")
    {'labels': ['negative', 'positive']}
    """
    def check(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueError(f"{where} has the key {key!r} ({type(key).__name__}); JSON keys are strings")
                check(item, f"{where}['{key}']")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                check(item, f"{where}[{i}]")
        elif isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"{where} is {value}; JSON has no inf or NaN")
        elif not isinstance(value, (str, int, float, type(None))):  # bool is an int
            raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__name__}, not JSON (str, number, "
                             f"bool, None, list, dict); convert it (e.g. .tolist() or float(...)) before saving")
    if not isinstance(metadata, dict):
        raise ValueError(f"{source} must be a dict, got {type(metadata).__name__}")
    check(metadata, source)
    for field in ("lora_jax_version", "base_model", "base_fingerprint"):
        if not isinstance(metadata.get(field), (str, type(None))):
            raise ValueError(f"{source}['{field}'] must be a string (or absent), got {metadata[field]!r}")
    return json.loads(json.dumps(metadata))  # tuples become lists, as they will be read back


def load_adapter(path: str | Path, base_params: Params | None = None, *, strict: bool = True,
                 allow_nonfinite: bool = False) -> Adapter:
    """Load an adapter saved by ``save_adapter``.

    Every file is checked against the adapter's manifest first, so a damaged file is named rather
    than read. With ``base_params`` the adapter is also checked against that base before its
    arrays are read: shapes (an error names the leaf and both shapes) and the base fingerprint (a
    base with other weights raises ``BaseMismatchError``; ``strict=False`` turns that into a
    warning). A save that was killed while swapping folders is completed here. Its metadata is
    checked (``check_metadata``) and leaves holding inf or NaN are refused unless ``allow_nonfinite``.

    Example::

        adapter = load_adapter("adapters/laptops", base_params=base_params)
        params = apply_adapter(base_params, adapter)
    """
    path = folder_path(path, "the adapter")
    if not path.exists() and path.parent.is_dir():
        with locked(path.parent):
            if recover_folder(path, _recognise):
                log.warning("restored the adapter at %s from an interrupted save", path)
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter checkpoint at {path}")
    try:
        _verify(path)
        abstract = _abstract_params(path)
    except Exception as err:
        raise ValueError(f"adapter checkpoint at {path} is unreadable or corrupt: {short_error(err)}") from None
    if base_params is not None:
        check_adapter_fits(base_params, abstract)
    try:
        with quiet_orbax():
            restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore(),
                metadata=ocp.args.JsonRestore()))
    except Exception as err:
        raise ValueError(f"adapter checkpoint at {path} is unreadable or corrupt: {short_error(err)}") from None
    try:
        config = LoraConfig.from_dict(restored["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"adapter at {path} has an invalid config: {err}") from None
    params = jax.tree.map(jax.numpy.asarray, restored["params"])
    check_targets_cover(params, config, source=f"adapter at {path}")
    metadata = check_metadata(restored["metadata"] or {}, f"the metadata of the adapter at {path}")
    bad = [] if allow_nonfinite else nonfinite_leaves(params)
    if bad:
        raise ValueError(f"the adapter at {path} holds inf or NaN in {bad[:5]}{' ...' if len(bad) > 5 else ''}: it "
                         f"would output NaN. Pass allow_nonfinite=True to load it for inspection")
    if base_params is not None:
        check_base_fingerprint(base_params, params, metadata.get("base_fingerprint"), strict=strict,
                               source=f"the adapter at {path}")
    return Adapter(params, config, metadata)
