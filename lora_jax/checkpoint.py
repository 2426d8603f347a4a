"""Orbax checkpoints: adapter-only save/load, and full training state for resume.

An adapter folder holds orbax items ``params`` (the trainable leaves), ``config`` and ``metadata``,
plus ``lora_jax_adapter.json``: a manifest with the size and sha256 of every file. The manifest
makes an adapter recognisable (``save_adapter`` overwrites nothing else) and lets ``load_adapter``
name a corrupt file before any of it is read. Saves are atomic and recoverable (``folder_swap``).

Training checkpoints use orbax's ``CheckpointManager`` (keep-last-N, save every N steps, its own
temp-folder-and-rename commits); ``TrainCheckpointer`` removes the partial folders of failed or
killed saves so that a full disk, once freed, does not keep failing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

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
from .nnx_trees import as_param_tree
from .targets import path_str
from .train import TrainState

Params = Mapping[str, Any]
MANIFEST = "lora_jax_adapter.json"
FORMAT = "lora_jax.adapter"
_ITEMS = ("params", "config", "metadata")
_LEGACY_ENTRIES = {"params", "config", "metadata", "_CHECKPOINT_METADATA", "commit_success.txt"}

log = logging.getLogger(__name__)


def _version() -> str:
    from . import __version__

    return __version__


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax logs routine warnings through absl; keep them off the user's terminal."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
    manifest = {"format": FORMAT, "format_version": 1, "lora_jax_version": _version(), "files": files}
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
    params = as_param_tree(params)  # an NNX model: its params as a nested dict
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
    meta = {"lora_jax_version": _version(), "base_model": base_model, **check_metadata(metadata or {}, "metadata")}
    if fingerprint:
        meta["base_fingerprint"] = base_fingerprint(params, mask)

    def write(tmp: Path) -> None:
        with _quiet_orbax():
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
    with _quiet_orbax():
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
        raise ValueError(f"adapter checkpoint at {path} is unreadable or corrupt: {_short(err)}") from None
    if base_params is not None:
        check_adapter_fits(base_params, abstract)
    try:
        with _quiet_orbax():
            restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore(),
                metadata=ocp.args.JsonRestore()))
    except Exception as err:
        raise ValueError(f"adapter checkpoint at {path} is unreadable or corrupt: {_short(err)}") from None
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


def _short(err: BaseException, limit: int = 300) -> str:
    """An error's first line, shortened: storage errors can carry whole TensorStore specs."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------------- training state


class CheckpointSaveError(RuntimeError):
    """A training checkpoint could not be written; checkpoints saved before it are intact."""


class TrainCheckpointer:
    """Resumable training checkpoints: trainable params, optimizer state, step and rng.

    Frozen params are not saved (they come from the base again at resume). ``save`` is a no-op
    except every ``save_every`` steps; the newest ``max_to_keep`` checkpoints are kept.

    A failed save (a full disk, say) raises ``CheckpointSaveError`` naming its step and removes its
    partial folder, so the next save can succeed once space is free. With ``async_save=True`` the
    writing happens in the background, so its failure is reported by the next due ``save``, by
    ``wait`` or by ``close``; use ``async_save=False`` to have each save report its own failure.
    Partial folders that a killed process left behind are removed when a checkpointer opens the
    directory (one writer per directory).
    """

    def __init__(self, directory: str | Path, mask: Params, *, max_to_keep: int = 3, save_every: int = 1000,
                 async_save: bool = True):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be a positive integer, got {max_to_keep!r}")
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
        self.mask = mask
        self.directory = folder_path(directory, "the training checkpoints")
        if self.directory.exists() and not self.directory.is_dir():
            raise FileExistsError(f"{self.directory} is a file; TrainCheckpointer needs a folder")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_partial()
        self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                                     enable_async_checkpointing=async_save)
        self._open_manager()
        self._pending: int | None = None

    def _remove_partial(self) -> None:
        """Remove the partial folders of failed or killed saves (call when no save is in flight)."""
        for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)

    def _open_manager(self) -> None:
        with _quiet_orbax():
            self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def _failed(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        # Close the manager (it waits for its background writers), clean up after the failed save, and
        # start a fresh manager: orbax would otherwise report the stale failure again at the next save.
        with contextlib.suppress(Exception):
            self.manager.close()
        self._remove_partial()
        self._open_manager()
        return CheckpointSaveError(f"saving the training checkpoint of step {step} to {self.directory} failed "
                                   f"({_short(err)}); its partial files were removed, earlier checkpoints are intact")

    def _finish_pending(self) -> None:
        """Wait for a background save; if it failed, clean up and report it by its step."""
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._failed(pending, err) from err

    @staticmethod
    def _item(state: TrainState) -> dict:
        return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step,
                "rng": jax.random.key_data(state.rng)}

    def save(self, state: TrainState, force: bool = False) -> bool:
        """Save if this step is due (or ``force``); True if a checkpoint was started."""
        step = int(state.step)
        if not force and not self.manager.should_save(step):
            return False
        self._finish_pending()
        try:
            with _quiet_orbax():
                started = self.manager.save(step, args=ocp.args.StandardSave(self._item(state)), force=force)
        except Exception as err:
            raise self._failed(step, err) from err
        self._pending = step if started else None
        return started

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, state: TrainState, step: int | None = None) -> TrainState:
        """Resume into ``state`` (a fresh state built the same way: it supplies structure and frozen params)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no training checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._item(state))
        self._check_fits(step, state)
        try:
            with _quiet_orbax():
                restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"the checkpoint of step {step} in {self.directory} does not fit the state given (its "
                             f"optimizer state or structure differs: {_short(err)}); build the state with the model, "
                             f"config and optimizer of the run that saved it") from None
        return state.replace(step=restored["step"], trainable=restored["trainable"], opt_state=restored["opt_state"],
                             rng=jax.random.wrap_key_data(restored["rng"]))

    def _check_fits(self, step: int, state: TrainState) -> None:
        """ValueError naming the trainable leaves whose saved shape differs from ``state``'s (another
        rank, another model), or that only one of them has."""
        try:
            with _quiet_orbax():
                saved = ocp.Checkpointer(ocp.StandardCheckpointHandler()).metadata(
                    self.directory / str(step) / "default").item_metadata.tree["trainable"]
        except Exception:  # noqa: BLE001 - no readable metadata: restore's own error is wrapped instead
            return
        want = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(state.trainable)).items()}
        have = {k: tuple(getattr(v, "shape", ())) for k, v in traverse_util.flatten_dict(dict(saved)).items()}
        differ = [f"'{path_str(k)}' saved {have[k]}, state {want[k]}" for k in sorted(want.keys() & have.keys())
                  if want[k] != have[k]]
        missing = sorted(path_str(k) for k in want.keys() ^ have.keys())
        if differ or missing:
            raise ValueError(f"the checkpoint of step {step} in {self.directory} does not fit the state given: "
                             f"{'; '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}"
                             f"{'; ' if differ and missing else ''}"
                             f"{f'leaves in only one of them: {missing[:5]}' if missing else ''}. Build the state "
                             f"with the model and LoraConfig of the run that saved it")

    def wait(self) -> None:
        """Block until background saves are on disk; raises ``CheckpointSaveError`` if one failed."""
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self.manager.close()
