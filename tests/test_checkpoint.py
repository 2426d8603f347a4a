"""Adapter checkpoints, resumable training state, atomic saves."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.models import MLP
from tests.conftest import randomize_lora

ROOT = Path(__file__).resolve().parents[1]


def _mlp_lora(width=16, rank=2):
    config = LoraConfig(rank=rank, alpha=4, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    model = lora_jax.lora(MLP((width, 8, 3)), config)
    x = jax.random.normal(jax.random.key(0), (64, 10))
    params = randomize_lora(model.init(jax.random.key(1), x)["params"])
    return model, config, params, x


def test_adapter_round_trip_keeps_values_config_and_metadata(tmp_path):
    model, config, params, x = _mlp_lora()
    path = lora_jax.save_adapter(tmp_path / "a", params, config, base_model="mlp-demo")
    adapter = lora_jax.load_adapter(path)
    assert adapter.config == config
    assert adapter.metadata["base_model"] == "mlp-demo" and adapter.metadata["lora_jax_version"]
    assert adapter.metadata["base_fingerprint"] == lora_jax.base_fingerprint(params, lora_jax.trainable_mask(params, config))
    chex.assert_trees_all_equal(adapter.params, lora_jax.extract_adapter(params, config).params)
    _, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    restored = lora_jax.apply_adapter(frozen, adapter)
    np.testing.assert_array_equal(model.apply({"params": restored}, x), model.apply({"params": params}, x))


def test_loading_onto_a_different_base_names_leaf_and_shapes(tmp_path):
    _, config, params, _ = _mlp_lora(width=16)
    lora_jax.save_adapter(tmp_path / "a", params, config)
    _, _, other, _ = _mlp_lora(width=12)
    _, other_base = lora_jax.partition(other, lora_jax.trainable_mask(other, config))
    with pytest.raises(ValueError, match=r"'fc1/lora_A' has shape \(10, 2\).*lora_B \(2, 16\).*'fc1/kernel' of shape \(10, 12\)"):
        lora_jax.load_adapter(tmp_path / "a", base_params=other_base)
    with pytest.raises(ValueError, match="'fc2/scale' has no counterpart in the base module 'fc2'"):
        lora_jax.apply_adapter(other_base, {"fc2": {"scale": jnp.zeros(8)}})
    with pytest.raises(ValueError, match=r"'fc3/kernel' has shape \(8, 3\), but the base leaf has shape \(8, 4\)"):
        lora_jax.apply_adapter({**other_base, "fc3": {"kernel": jnp.zeros((8, 4))}}, {"fc3": {"kernel": jnp.zeros((8, 3))}})


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    _, config, params, _ = _mlp_lora()
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
        lora_jax.load_adapter(tmp_path / "nothing-here")
    for data_file in (path / "params").rglob("*"):
        if data_file.is_file() and data_file.stat().st_size > 100 and "ocdbt.process_0/d" in str(data_file):
            data_file.write_bytes(b"\x00" * 17)
    (path / "config" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        lora_jax.load_adapter(path)


def test_failed_overwrite_keeps_the_previous_adapter(tmp_path, monkeypatch):
    _, config, params, _ = _mlp_lora()
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    import orbax.checkpoint as ocp

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        lora_jax.save_adapter(path, randomize_lora(params, seed=5), config)
    chex.assert_trees_all_equal(lora_jax.load_adapter(path).params, lora_jax.extract_adapter(params, config).params)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp folder left behind


@pytest.mark.slow
def test_minilm_adapter_size_on_disk_within_10_percent_of_raw(tmp_path):
    from lora_jax.models import from_pretrained

    model, params, _ = from_pretrained("packaged:minilm", task="base", with_tokenizer=False)
    config = LoraConfig(rank=8, alpha=16, targets=("query", "value"))
    lora_params = randomize_lora(lora_jax.init_lora_params(lora_jax.lora(model, config), params, jax.random.key(0),
                                                           jnp.ones((1, 8), jnp.int32)))
    path = lora_jax.save_adapter(tmp_path / "minilm", lora_params, config, base_model="packaged:minilm")
    raw = sum(x.nbytes for x in jax.tree.leaves(lora_jax.extract_adapter(lora_params, config).params))
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert raw == 73_728 * 4
    assert on_disk <= 1.10 * raw, (on_disk, raw)


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


CRASHING_SAVER = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, optax, lora_jax
    from lora_jax.models import MLP
    config = lora_jax.LoraConfig(rank=2, targets=("fc1",), modules_to_save=("fc2",))
    model = lora_jax.lora(MLP((16, 2048)), config)
    params = model.init(jax.random.key(0), jnp.ones((1, 8192)))["params"]  # fc2 holds 16 x 2048 floats, fc1 A 8192 x 2
    mask = lora_jax.trainable_mask(params, config)
    ckpt = lora_jax.TrainCheckpointer(sys.argv[1], mask, save_every=1, async_save=False)
    state = lora_jax.TrainState.create(params, mask, optax.adam(1e-3), jax.random.key(0))
    ckpt.save(state.replace(step=jnp.asarray(1)))
    print("saved 1", flush=True)
    for step in range(2, 1000):
        ckpt.save(state.replace(step=jnp.asarray(step)))
        print(f"saved {step}", flush=True)
""")


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    """Kill the writer while it saves checkpoints in a loop; the newest committed one still loads."""
    script = tmp_path / "saver.py"
    script.write_text(CRASHING_SAVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")], stdout=subprocess.PIPE, text=True,
                            env=env)
    seen = 0
    deadline = time.time() + 120
    while seen < 3 and time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("saved"):
            seen += 1
    time.sleep(0.05)  # land somewhere inside a later save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen == 3
    config = LoraConfig(rank=2, targets=("fc1",), modules_to_save=("fc2",))
    model = lora_jax.lora(MLP((16, 2048)), config)
    params = model.init(jax.random.key(0), jnp.ones((1, 8192)))["params"]
    mask = lora_jax.trainable_mask(params, config)
    ckpt = lora_jax.TrainCheckpointer(tmp_path / "ckpt", mask)
    latest = ckpt.latest_step()
    assert latest is not None and latest >= 3
    restored = ckpt.restore(lora_jax.TrainState.create(params, mask, optax.adam(1e-3), jax.random.key(0)))
    assert int(restored.step) == latest
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, lora_jax.partition(restored.params, mask)[0]),
                                jax.tree.map(np.asarray, lora_jax.partition(params, mask)[0]))
