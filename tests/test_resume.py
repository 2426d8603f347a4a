"""Resumable training state: bit-identical resume, crashes and full disks, states of another shape."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from experiments.mlp import MLP
from lora_jax import LoraConfig
from tests.helpers import mlp_lora_params as _mlp_lora

ROOT = Path(__file__).resolve().parents[1]


def _train(state, step, batches, checkpointer=None):
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if checkpointer is not None:
            checkpointer.save(state)
    return state, losses


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path):
    model, config, params, x = _mlp_lora()
    y = jnp.arange(64) % 3
    mask = lora_jax.trainable_mask(params, config)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3))

    def loss_fn(p, batch, rng):
        logits = model.apply({"params": p}, batch[0], rngs={"lora_dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    model_dropout_config = config.replace(dropout=0.1)
    model = lora_jax.lora(MLP((16, 8, 3)), model_dropout_config)  # dropout makes the rng state matter
    batches = [(x[i % 8 * 8:(i % 8 + 1) * 8], y[i % 8 * 8:(i % 8 + 1) * 8]) for i in range(2000)]
    step = lora_jax.make_train_step(loss_fn, tx, mask)

    full_state, full_losses = _train(lora_jax.TrainState.create(params, mask, tx, jax.random.key(3)), step, batches)

    ckpt = lora_jax.TrainCheckpointer(tmp_path / "run", mask, max_to_keep=2, save_every=250)
    _, first = _train(lora_jax.TrainState.create(params, mask, tx, jax.random.key(3)), step, batches[:1000], ckpt)
    ckpt.wait()
    assert ckpt.manager.all_steps() == [750, 1000]  # every 250 steps, newest 2 kept
    fresh = lora_jax.TrainState.create(params, mask, tx, jax.random.key(99))
    resumed = ckpt.restore(fresh)
    assert int(resumed.step) == 1000
    resumed_state, second = _train(resumed, step, batches[1000:])
    ckpt.close()
    assert first + second == full_losses  # the same loss curve, bit for bit
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, resumed_state.params), jax.tree.map(np.asarray, full_state.params))


def test_restore_without_checkpoint_is_an_error(tmp_path):
    _, config, params, _ = _mlp_lora()
    mask = lora_jax.trainable_mask(params, config)
    ckpt = lora_jax.TrainCheckpointer(tmp_path / "empty", mask)
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        ckpt.restore(lora_jax.TrainState.create(params, mask, optax.sgd(0.1), jax.random.key(0)))



def test_restoring_into_a_state_of_another_shape_names_the_leaves(tmp_path):
    _, config, params, _ = _mlp_lora(rank=2)
    mask = lora_jax.trainable_mask(params, config)
    ckpt = lora_jax.TrainCheckpointer(tmp_path / "run", mask, save_every=1, async_save=False)
    ckpt.save(lora_jax.TrainState.create(params, mask, optax.adam(0.1), jax.random.key(0)), force=True)
    ckpt.close()
    _, config4, params4, _ = _mlp_lora(rank=4)
    mask4 = lora_jax.trainable_mask(params4, config4)
    other = lora_jax.TrainCheckpointer(tmp_path / "run", mask4)
    with pytest.raises(ValueError, match=r"does not fit the state given: 'fc1/lora_A' saved \(10, 2\), state \(10, 4\)"):
        other.restore(lora_jax.TrainState.create(params4, mask4, optax.adam(0.1), jax.random.key(0)))
    with pytest.raises(ValueError, match=r"step 0 .* does not fit the state given \(its optimizer state"):
        other_opt = lora_jax.TrainCheckpointer(tmp_path / "run", mask)
        other_opt.restore(lora_jax.TrainState.create(params, mask, optax.sgd(0.1, momentum=0.9), jax.random.key(0)))
    other.close()


CRASHING_SAVER = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp, optax, lora_jax
    from orbax.checkpoint._src.path import atomicity
    from experiments.mlp import MLP
    config = lora_jax.LoraConfig(rank=2, targets=("fc1",), modules_to_save=("fc2",))
    model = lora_jax.lora(MLP((16, 64)), config)
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    mask = lora_jax.trainable_mask(params, config)
    ckpt = lora_jax.TrainCheckpointer(sys.argv[1], mask, save_every=1, async_save=False)
    state = lora_jax.TrainState.create(params, mask, optax.adam(1e-3), jax.random.key(0))
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
        if self.get_final().name == "3":  # step 3 is fully written but not yet committed
            os.kill(os.getpid(), signal.SIGKILL)
        return await real_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    for step in range(1, 5):
        ckpt.save(state.replace(step=jnp.asarray(step)))
""")


def _small_checkpoint_setup():
    config = LoraConfig(rank=2, targets=("fc1",), modules_to_save=("fc2",))
    model = lora_jax.lora(MLP((16, 64)), config)
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    mask = lora_jax.trainable_mask(params, config)
    return params, mask, lora_jax.TrainState.create(params, mask, optax.adam(1e-3), jax.random.key(0))


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    """Kill the writer at a chosen point (step 3 written, not committed): step 2 loads, the next run saves again."""
    script = tmp_path / "saver.py"
    script.write_text(CRASHING_SAVER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("3.")) == ["1", "2"]
    assert any(p.name.startswith("3.orbax-checkpoint-tmp") for p in (tmp_path / "ckpt").iterdir())
    params, mask, state = _small_checkpoint_setup()
    ckpt = lora_jax.TrainCheckpointer(tmp_path / "ckpt", mask, save_every=1, async_save=False)
    assert not any("orbax-checkpoint-tmp" in p.name for p in (tmp_path / "ckpt").iterdir())  # the partial is gone
    assert ckpt.latest_step() == 2
    restored = ckpt.restore(state)
    assert int(restored.step) == 2
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored.trainable),
                                jax.tree.map(np.asarray, lora_jax.partition(params, mask)[0]))
    assert ckpt.save(restored.replace(step=jnp.asarray(3)))
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_failed_training_save_names_its_step_removes_its_partial_folder_and_the_next_save_works(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    _, mask, state = _small_checkpoint_setup()
    ckpt = lora_jax.TrainCheckpointer(tmp_path / "ckpt", mask, save_every=1, async_save=False)
    ckpt.save(state.replace(step=jnp.asarray(1)))
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    with pytest.raises(lora_jax.CheckpointSaveError, match="step 2 .* failed .*No space left.*earlier checkpoints "
                                                           "are intact"):
        ckpt.save(state.replace(step=jnp.asarray(2)))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", real_finalize)
    assert ckpt.save(state.replace(step=jnp.asarray(3)))
    ckpt.wait()
    assert ckpt.manager.all_steps() == [1, 3]
    ckpt.close()




def test_a_checkpointer_given_a_mask_refuses_a_state_of_another_mask(tmp_path):
    _, config, params, _ = _mlp_lora()
    mask = lora_jax.trainable_mask(params, config)
    other = lora_jax.trainable_mask(params, config.replace(modules_to_save=()))
    ckpt = lora_jax.TrainCheckpointer(tmp_path / "run", other, save_every=1, async_save=False)
    with pytest.raises(ValueError, match=r"the checkpointer's mask differs .* trainable only in the state \['fc3/bias'"):
        ckpt.save(lora_jax.TrainState.create(params, mask, optax.sgd(0.1), jax.random.key(0)), force=True)
    assert ckpt.latest_step() is None
    ckpt.close()

