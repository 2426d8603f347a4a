"""Orbax checkpoints: adapter-only save/load, and full training state for resume.

Adapters are written to a temporary sibling folder and moved into place only when complete, so an
existing adapter at the same path survives a crash mid-save. Training checkpoints use orbax's
``CheckpointManager`` (keep-last-N, save every N steps; its own temp-dir-and-rename commits).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from .adapters import Adapter, check_adapter_fits
from .config import LoraConfig
from .masking import LORA_LEAVES, combine, partition, trainable_mask
from .train import TrainState

Params = Mapping[str, Any]


def _version() -> str:
    from . import __version__

    return __version__


def base_fingerprint(params: Params, mask: Params | None = None) -> str:
    """sha256 over the frozen leaves' paths, shapes, dtypes and bytes: names the base an adapter was
    trained on, so loading it onto another base can be noticed."""
    flat = traverse_util.flatten_dict(dict(params))
    flat_mask = traverse_util.flatten_dict(dict(mask)) if mask is not None else {}
    digest = hashlib.sha256()
    for key in sorted(flat):
        if flat_mask.get(key, False) or key[-1] in LORA_LEAVES:
            continue
        value = np.asarray(flat[key])
        digest.update(f"{'/'.join(key)}:{value.shape}:{value.dtype};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_adapter(path: str | Path, params: Params, config: LoraConfig, *, base_model: str | None = None,
                 metadata: dict | None = None, fingerprint: bool = True) -> Path:
    """Save only the trainable leaves of ``params`` (per ``config``) + the config + metadata.

    Metadata records the lora_jax version, ``base_model`` (a name or path) and, with
    ``fingerprint``, a hash of the frozen base leaves. Returns the adapter folder.
    """
    path = Path(path).absolute()
    mask = trainable_mask(params, config)
    trainable, _ = partition(params, mask)
    meta = {"lora_jax_version": _version(), "base_model": base_model, **(metadata or {})}
    if fingerprint:
        meta["base_fingerprint"] = base_fingerprint(params, mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        checkpointer.save(tmp, args=ocp.args.Composite(
            params=ocp.args.StandardSave(trainable),
            config=ocp.args.JsonSave(config.to_dict()),
            metadata=ocp.args.JsonSave(meta)))
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``; an old ``target`` is removed only afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def load_adapter(path: str | Path, base_params: Params | None = None) -> Adapter:
    """Load an adapter saved by ``save_adapter``; with ``base_params``, also check that it fits them
    (an error names the leaf and both shapes)."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter checkpoint at {path}")
    try:
        restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), config=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()))
        config = LoraConfig.from_dict(restored["config"])
    except Exception as err:
        raise ValueError(f"adapter checkpoint at {path} is unreadable or corrupt ({type(err).__name__}: {err})") from None
    adapter = Adapter(jax.tree.map(jax.numpy.asarray, restored["params"]), config, dict(restored["metadata"] or {}))
    if base_params is not None:
        check_adapter_fits(base_params, adapter.params)
    return adapter


class TrainCheckpointer:
    """Resumable training checkpoints: trainable params, optimizer state, step and rng.

    Frozen params are not saved (they come from the base again at resume). ``save`` is a no-op
    except every ``save_every`` steps; the newest ``max_to_keep`` checkpoints are kept.
    """

    def __init__(self, directory: str | Path, mask: Params, *, max_to_keep: int = 3, save_every: int = 1000,
                 async_save: bool = True):
        self.mask = mask
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _item(self, state: TrainState) -> dict:
        trainable, _ = partition(state.params, self.mask)
        return {"trainable": trainable, "opt_state": state.opt_state, "step": state.step,
                "rng": jax.random.key_data(state.rng)}

    def save(self, state: TrainState, force: bool = False) -> bool:
        """Save if this step is due (or ``force``); True if a checkpoint was started."""
        return self.manager.save(int(state.step), args=ocp.args.StandardSave(self._item(state)), force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, state: TrainState, step: int | None = None) -> TrainState:
        """Resume into ``state`` (a fresh state built the same way: it supplies structure and frozen params)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no training checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._item(state))
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        _, frozen = partition(state.params, self.mask)
        return TrainState(step=restored["step"], params=combine(restored["trainable"], frozen),
                          opt_state=restored["opt_state"], rng=jax.random.wrap_key_data(restored["rng"]))

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
