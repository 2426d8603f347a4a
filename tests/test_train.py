"""The jitted train step: only the trainable partition is differentiated and updated; sharded state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import LoraConfig
from experiments.mlp import MLP
from lora_jax.models import BertConfig, BertForSequenceClassification


def _setup(config=None):
    config = config or LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    model = lora_jax.lora(MLP((16, 8, 3)), config)
    x = jax.random.normal(jax.random.key(0), (32, 10))
    y = jnp.arange(32) % 3
    params = model.init(jax.random.key(1), x)["params"]

    def loss_fn(p, batch, rng):
        logits = model.apply({"params": p}, batch["x"], rngs={"lora_dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return model, config, params, loss_fn, {"x": x, "y": y}


def test_frozen_leaves_bit_identical_and_trainable_move_after_many_steps():
    _, config, params, loss_fn, batch = _setup(LoraConfig(rank=2, targets=("fc1", "fc2"), dropout=0.1,
                                                          modules_to_save=("fc3",)))
    mask = lora_jax.trainable_mask(params, config)
    before = jax.tree.map(np.array, params)
    tx = optax.adamw(1e-2)
    state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(0))
    step = lora_jax.make_train_step(loss_fn, tx, mask)
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    _, frozen_before = lora_jax.partition(before, mask)
    trainable_after, frozen_after = lora_jax.partition(state.params, mask)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, frozen_after), frozen_before)  # bit for bit
    assert state.params["fc1"]["kernel"] is params["fc1"]["kernel"]  # never even copied
    assert float(jnp.abs(trainable_after["fc1"]["lora_B"]).max()) > 0
    assert losses[-1] < losses[0]
    assert int(state.step) == 25


def test_optimizer_state_only_for_trainable_leaves():
    _, config, params, _, _ = _setup()
    mask = lora_jax.trainable_mask(params, config)
    state = lora_jax.TrainState.create(params, mask, optax.adam(1e-3), jax.random.key(0))
    n_trainable, n_total = lora_jax.count_parameters(params, mask)
    opt_elems = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt_elems == 2 * n_trainable  # adam: mu + nu, nothing for frozen leaves
    assert n_trainable == 10 * 2 + 2 * 16 + 16 * 2 + 2 * 8 + 8 * 3 + 3  # A,B of fc1 and fc2; all of fc3
    assert n_total == n_trainable + 10 * 16 + 16 + 16 * 8 + 8


def test_step_compiles_once_and_leaves_callers_params_usable():
    model, config, params, loss_fn, batch = _setup()
    traces = []

    def counted_loss(p, b, rng):  # runs in Python only while jit traces the step
        traces.append(1)
        return loss_fn(p, b, rng)

    mask = lora_jax.trainable_mask(params, config)
    tx = optax.sgd(0.1)
    step = lora_jax.make_train_step(counted_loss, tx, mask)
    state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(0))
    for _ in range(3):
        state, _ = step(state, batch)
    assert len(traces) == 1
    # the step donated the state's trainable buffers, not the caller's: params is alive and unchanged
    assert float(jnp.abs(params["fc1"]["lora_B"]).max()) == 0.0
    assert model.apply({"params": params}, batch["x"]).shape == (32, 3)


def test_frozen_leaves_never_move_even_with_a_huge_learning_rate():
    """What optax.masked would get wrong (it passes frozen gradients through as updates) must not happen here."""
    _, config, params, loss_fn, batch = _setup()
    mask = lora_jax.trainable_mask(params, config)
    tx = optax.sgd(1e3)
    state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(0))
    state, _ = lora_jax.make_train_step(loss_fn, tx, mask)(state, batch)
    np.testing.assert_array_equal(state.params["fc1"]["kernel"], params["fc1"]["kernel"])
    assert not np.array_equal(state.params["fc3"]["kernel"], params["fc3"]["kernel"])


def test_a_mask_that_selects_nothing_is_an_error():
    _, config, params, loss_fn, _ = _setup()
    nothing = jax.tree.map(lambda _: False, params)
    with pytest.raises(ValueError, match="selects no leaf.*init_lora_params"):
        lora_jax.TrainState.create(params, nothing, optax.sgd(0.1), jax.random.key(0))
    with pytest.raises(ValueError, match="selects no leaf"):
        lora_jax.make_train_step(loss_fn, optax.sgd(0.1), nothing)
    with pytest.raises(ValueError, match="Python bools"):
        lora_jax.make_train_step(loss_fn, optax.sgd(0.1), jax.tree.map(lambda _: 1, params))


def test_params_without_lora_leaves_are_an_error_for_mask_and_merge():
    base_params = MLP((16, 8, 3)).init(jax.random.key(0), jnp.ones((1, 10)))["params"]
    config = LoraConfig(rank=2, targets=("fc1",))
    with pytest.raises(ValueError, match="no lora_A/lora_B leaves.*init_lora_params"):
        lora_jax.trainable_mask(base_params, config)
    with pytest.raises(ValueError, match="merge: .*no lora_A/lora_B"):
        lora_jax.merge(base_params, config)


def test_a_step_built_with_another_mask_than_the_state_is_named():
    _, config, params, loss_fn, batch = _setup()
    mask = lora_jax.trainable_mask(params, config)
    state = lora_jax.TrainState.create(params, mask, optax.sgd(0.1), jax.random.key(0))
    other = lora_jax.trainable_mask(params, config.replace(modules_to_save=()))
    step = lora_jax.make_train_step(loss_fn, optax.sgd(0.1), other)
    with pytest.raises(ValueError, match=r"mask differs .* trainable only in the state \['fc3/bias', 'fc3/kernel'\]"):
        step(state, batch)


@pytest.mark.parametrize("skip", [False, True])
def test_non_finite_steps_are_flagged_and_optionally_skipped(skip):
    _, config, params, loss_fn, batch = _setup()
    mask = lora_jax.trainable_mask(params, config)
    tx = optax.adam(1e-2)
    state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(0))
    step = lora_jax.make_train_step(loss_fn, tx, mask, skip_nonfinite=skip)
    state, metrics = step(state, batch)
    assert bool(metrics["finite"])
    before = jax.tree.map(np.array, state.trainable)
    bad = dict(batch, x=batch["x"].at[0, 0].set(jnp.nan))  # one NaN in the inputs
    state, metrics = step(state, bad)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2
    after = jax.tree.map(np.asarray, state.trainable)
    if skip:
        chex.assert_trees_all_equal(after, before)  # the bad update was not applied
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])  # and training goes on
    else:
        assert np.isnan(after["fc1"]["lora_A"]).any()


def test_an_update_that_overflows_is_flagged_though_its_loss_was_finite():
    # SGD with a huge rate: the loss before the update is finite, the updated params are not (the
    # last step of a run diverging leaves nothing after it to see a bad loss)
    _, config, params, loss_fn, batch = _setup()
    mask = lora_jax.trainable_mask(params, config)
    tx = optax.sgd(1e25)
    state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(0))
    huge = lambda p, b, rng: 1e15 * loss_fn(p, b, rng)  # gradients ~1e14: finite; the update ~1e39: inf
    state, metrics = lora_jax.make_train_step(huge, tx, mask)(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.trainable))
    assert not bool(metrics["finite"])


def _bert_flops(layers: int, hidden: int) -> tuple[float, float]:
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                        intermediate_size=4 * hidden, num_labels=3)
    base = BertForSequenceClassification(config)
    batch = {"ids": jnp.ones((8, 128), jnp.int32), "y": jnp.zeros((8,), jnp.int32)}
    base_params = jax.jit(base.init)(jax.random.key(0), batch["ids"])["params"]
    lora_config = LoraConfig(rank=8, alpha=16, targets=("query", "value"), modules_to_save=("classifier",))
    model = lora_jax.lora(base, lora_config)
    params = lora_jax.init_lora_params(model, base_params, jax.random.key(1), batch["ids"])

    def loss_for(m):
        def loss_fn(p, b, rng):
            logits = m.apply({"params": p}, b["ids"], deterministic=False,
                             rngs=lora_jax.dropout_rngs(rng, "dropout", "lora_dropout"))
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()
        return loss_fn

    tx = optax.adamw(1e-3)
    full_mask = jax.tree.map(lambda _: True, base_params)
    lora_mask = lora_jax.trainable_mask(params, lora_config)

    def flops(loss_fn, p, mask):
        lowered = lora_jax.make_train_step(loss_fn, tx, mask).lower(
            lora_jax.TrainState.create(p, mask, tx, jax.random.key(0)), batch)
        cost = lowered.cost_analysis()  # of the lowered HLO: no compile needed
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    return flops(loss_for(model), params, lora_mask), flops(loss_for(base), base_params, full_mask)


@pytest.mark.slow
def test_lora_step_needs_at_most_072_of_full_finetuning_flops():
    """A 2-layer hidden-384 encoder at batch 8 x 128 (MiniLM's layer shape): weight gradients of frozen kernels
    are never formed."""
    lora, full = _bert_flops(2, 384)
    assert lora / full <= 0.72, (lora, full, lora / full)



SHARDED_SCRIPT = r'''
import jax, jax.numpy as jnp, flax.linen as nn, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import lora_jax

assert jax.device_count() == 4, jax.devices()
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))  # auto (GSPMD) axes
part = lambda names: nn.with_partitioning(nn.initializers.lecun_normal(), names)

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, kernel_init=part(("data", "model")), name="fc1")(x))  # FSDP-style frozen kernel
        return nn.Dense(4, kernel_init=part(("model", None)), name="fc2")(h)

config = lora_jax.LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"))
model = lora_jax.lora(Net(), config)
rng = np.random.RandomState(0)
batch = {"x": jnp.asarray(rng.randn(8, 8), jnp.float32), "y": jnp.asarray(rng.randint(0, 4, 8))}
boxed = model.init(jax.random.key(0), batch["x"])["params"]
specs = nn.get_partition_spec(boxed)
assert specs["fc1"]["lora_A"] == P("data", None) and specs["fc1"]["lora_B"] == P(None, "model"), specs
assert specs["fc2"]["lora_A"] == P("model", None) and specs["fc2"]["lora_B"] == P(None, None), specs
merged = lora_jax.merge(boxed, config)  # boxes survive a merge
assert isinstance(merged["fc1"]["kernel"], nn.Partitioned) and merged["fc1"]["kernel"].names == ("data", "model")

params = nn.unbox(boxed)
mask = lora_jax.trainable_mask(params, config)
traces = []
def loss_fn(p, b, key):
    traces.append(1)
    logits = model.apply({"params": p}, b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

tx = optax.adamw(1e-2)
shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(1), shardings=shardings)
step = lora_jax.make_train_step(loss_fn, tx, mask, batch_sharding=NamedSharding(mesh, P("data")))
layout = jax.tree.map(lambda a: a.sharding, (state.trainable, state.opt_state, state.step, state.rng))
losses = []
for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    assert jax.tree.map(lambda a: a.sharding, (state.trainable, state.opt_state, state.step, state.rng)) == layout
assert len(traces) == 1, len(traces)
assert state.trainable["fc1"]["lora_A"].sharding.spec == P("data", None)
assert state.opt_state[0].mu["fc1"]["lora_B"].sharding.spec == P(None, "model")
assert state.frozen["fc1"]["kernel"].sharding.spec == P("data", "model")

plain = lora_jax.TrainState.create(params, mask, tx, jax.random.key(1))  # one device, same numbers
plain_step, reference = lora_jax.make_train_step(loss_fn, tx, mask), []
for _ in range(3):
    plain, metrics = plain_step(plain, batch)
    reference.append(float(metrics["loss"]))
np.testing.assert_allclose(losses, reference, rtol=1e-5)

for fmt in ("int8", "nf4"):  # QLoRA on the mesh: the quantized kernels' leaves placed from the kernel's sharding
    quantized = lora_jax.quantize(params, config, fmt, layers="all")
    state = lora_jax.TrainState.create(quantized, mask, tx, jax.random.key(1), shardings=shardings)
    plain = lora_jax.TrainState.create(quantized, mask, tx, jax.random.key(1))
    if fmt == "int8":
        assert state.frozen["fc1"]["kernel"].weight.data.sharding.spec == P("data", "model")
        assert state.frozen["fc1"]["kernel"].weight.scale.sharding.spec == P(None, "model")
    sharded_losses, plain_losses = [], []
    for _ in range(2):
        state, metrics = step(state, batch)
        plain, plain_metrics = plain_step(plain, batch)
        sharded_losses.append(float(metrics["loss"]))
        plain_losses.append(float(plain_metrics["loss"]))
    np.testing.assert_allclose(sharded_losses, plain_losses, rtol=1e-5)

import warnings
unplaced = lora_jax.TrainState.create(params, mask, tx, jax.random.key(1))  # no shardings, a sharded batch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step_b = lora_jax.make_train_step(loss_fn, tx, mask, batch_sharding=NamedSharding(mesh, P("data")))
    for _ in range(2):
        unplaced, _ = step_b(unplaced, batch)
assert [str(w.message).count("TrainState.create(..., shardings=...)") for w in caught] == [1], caught

other = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
for bad, message in (("model", "shardings must be one jax.sharding.Sharding"),
                     ({**shardings, "fc2": jax.tree.map(lambda s: NamedSharding(other, P()), shardings["fc2"])},
                      "different sets of devices")):
    try:
        lora_jax.TrainState.create(params, mask, tx, jax.random.key(1), shardings=bad)
        raise AssertionError("accepted " + str(bad)[:40])
    except (TypeError, ValueError) as err:
        assert message in str(err), err
print("SHARDED OK", losses)
'''


def test_sharded_training_on_four_devices_compiles_once_and_keeps_layouts():
    """Data-parallel batch, FSDP-sharded frozen kernels, adapters inheriting their kernel's names; run in a
    subprocess with 4 host devices (the device count is fixed when jax starts)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()  # conftest's too
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0 and "SHARDED OK" in result.stdout, result.stdout + result.stderr


def test_wrong_arguments_to_the_state_and_step_are_named():
    model, config, params, loss_fn, batch = _setup()
    mask = lora_jax.trainable_mask(params, config)
    with pytest.raises(TypeError, match=r"TrainState.create takes an optax GradientTransformation .*got NoneType"):
        lora_jax.TrainState.create(params, mask, None, jax.random.key(0))
    with pytest.raises(TypeError, match=r"takes a jax PRNG key as rng, e.g. jax.random.key\(0\), got int"):
        lora_jax.TrainState.create(params, mask, optax.sgd(0.1), 0)
    with pytest.raises(TypeError, match=r"make_train_step takes an optax GradientTransformation"):
        lora_jax.make_train_step(loss_fn, None, mask)
    state = lora_jax.TrainState.create(params, mask, optax.sgd(0.1), jax.random.PRNGKey(0))  # a legacy key is a key
    with_aux = lambda p, b, rng: (loss_fn(p, b, rng), {"n": jnp.float32(1)})
    with pytest.raises(TypeError, match=r"returned a tuple of 2; a \(loss, aux\) pair needs .*has_aux=True"):
        lora_jax.make_train_step(with_aux, optax.sgd(0.1), mask)(state, batch)
    with pytest.raises(TypeError, match=r"has_aux=True: loss_fn must return \(loss, dict of metrics\)"):
        lora_jax.make_train_step(loss_fn, optax.sgd(0.1), mask, has_aux=True)(state, batch)
    for fn in (lambda: lora_jax.trainable_mask(params, None), lambda: lora_jax.merge(params, None),
               lambda: lora_jax.quantize(params, {"rank": 2})):
        with pytest.raises(TypeError, match=r"takes the adapter's LoraConfig, got (NoneType|dict)"):
            fn()
