"""Resumable training: ``TrainCheckpointer`` saves and restores the trainable params, optimizer
state, step and rng of a ``TrainState`` (the frozen base comes from the model again).

It uses orbax's ``CheckpointManager`` (keep-last-N, save every N steps, its own
temp-folder-and-rename commits) and removes the partial folders of failed or killed saves, so that a
full disk, once freed, does not keep failing. Adapter folders live in ``lora_jax.adapter_folders``.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from .folder_swap import folder_path
from .orbax_io import quiet_orbax, short_error
from .targets import path_str
from .train import TrainState, check_state_mask, trainable_keys

Params = Mapping[str, Any]


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
    directory (one writer per directory). ``mask`` (optional, the run's ``trainable_mask``) makes
    ``save`` refuse a state whose trainable leaves are not the ones it marks.
    """

    def __init__(self, directory: str | Path, mask: Params | None = None, *, max_to_keep: int = 3,
                 save_every: int = 1000, async_save: bool = True):
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
        with quiet_orbax():
            self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def _failed(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        # Close the manager (it waits for its background writers), clean up after the failed save, and
        # start a fresh manager: orbax would otherwise report the stale failure again at the next save.
        with contextlib.suppress(Exception):
            self.manager.close()
        self._remove_partial()
        self._open_manager()
        return CheckpointSaveError(f"saving the training checkpoint of step {step} to {self.directory} failed "
                                   f"({short_error(err)}); its partial files were removed, earlier checkpoints are intact")

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
        if self.mask is not None:
            check_state_mask(state, trainable_keys(self.mask), "the checkpointer's")
        self._finish_pending()
        try:
            with quiet_orbax():
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
            with quiet_orbax():
                restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"the checkpoint of step {step} in {self.directory} does not fit the state given (its "
                             f"optimizer state or structure differs: {short_error(err)}); build the state with the model, "
                             f"config and optimizer of the run that saved it") from None
        return state.replace(step=restored["step"], trainable=restored["trainable"], opt_state=restored["opt_state"],
                             rng=jax.random.wrap_key_data(restored["rng"]))

    def _check_fits(self, step: int, state: TrainState) -> None:
        """ValueError naming the trainable leaves whose saved shape differs from ``state``'s (another
        rank, another model), or that only one of them has."""
        try:
            with quiet_orbax():
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
