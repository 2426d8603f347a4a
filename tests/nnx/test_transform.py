"""The NNX front end: every layer kind against the hand formula, identity at init, training with
nnx.Optimizer(wrt=nnx.LoRAParam), merge back to the original classes, and parity with linen."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax
from lora_jax import LoraConfig
from tests.helpers import stacked_nnx_linears
from tests.linen.test_layers import ALPHA, CASES, RANK, SCALE, _dora_expected

NNX_LAYERS = {
    "dense": lambda r: nnx.Linear(6, 5, rngs=r),
    "dense_general_split": lambda r: nnx.LinearGeneral(6, (2, 4), axis=-1, rngs=r),
    "dense_general_merge": lambda r: nnx.LinearGeneral((2, 4), 5, axis=(-2, -1), rngs=r),
    "einsum": lambda r: nnx.Einsum("btd,hdk->bthk", (3, 6, 5), (3, 5), rngs=r),
    "conv": lambda r: nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=r),
    "embed": lambda r: nnx.Embed(20, 8, rngs=r),
    "attend": lambda r: nnx.Embed(20, 8, rngs=r),
}


class One(nnx.Module):
    def __init__(self, kind, rngs):
        self.kind, self.layer = kind, NNX_LAYERS[kind](rngs)

    def __call__(self, x):
        return self.layer.attend(x) if self.kind == "attend" else self.layer(x)


def _randomize(model, seed=0, scale=0.3):
    params = lora_jax.nnx_params(model)["layer"]
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    new = {k: scale * jax.random.normal(next(keys), v.shape) for k, v in params.items() if k in ("lora_A", "lora_B")}
    lora_jax.load_nnx_params(model, {"layer": new})


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_nnx_layer_equals_hand_formula_and_base_at_init(kind, jit):
    formula, make_input = CASES[kind]
    x = make_input(jax.random.key(0))
    model = One(kind, nnx.Rngs(0))
    before = model(x)
    lora_jax.lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=("layer",)), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(model(x), before)  # B = 0: the base output bit for bit
    _randomize(model)
    y = np.asarray((nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x)))(model, x), np.float64)
    x64 = np.asarray(x) if x.dtype.kind == "i" else np.asarray(x, np.float64)
    params = {k: np.asarray(v) for k, v in lora_jax.nnx_params(model)["layer"].items()}
    base_out, update = formula(params, x64)
    expected = base_out + SCALE * update
    np.testing.assert_allclose(y, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "dense_general_split", "conv", "embed"])
def test_nnx_dora_equals_its_definition_and_merges_exactly(kind):
    _, make_input = CASES[kind]
    x = make_input(jax.random.key(0))
    model = One(kind, nnx.Rngs(0))
    config = LoraConfig(rank=RANK, alpha=ALPHA, targets=("layer",), use_dora=True)
    lora_jax.lora(model, config, rngs=nnx.Rngs(1))
    _randomize(model)
    magnitude = model.layer.lora_magnitude
    magnitude[...] = magnitude[...] * (1.0 + 0.5 * jax.random.uniform(jax.random.key(2), magnitude.shape))
    params = {k: np.asarray(v) for k, v in lora_jax.nnx_params(model)["layer"].items()}
    x64 = np.asarray(x) if x.dtype.kind == "i" else np.asarray(x, np.float64)
    expected = _dora_expected(kind, params, x64)
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=1e-5)
    merged = lora_jax.merge(model, config)
    np.testing.assert_allclose(np.asarray(merged(x)), expected, atol=2e-5 * max(1.0, np.abs(expected).max()), rtol=1e-5)


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2, self.fc3 = nnx.Linear(10, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class LinenMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(3, name="fc3")(nn.relu(nn.Dense(8, name="fc2")(x)))


def test_training_with_nnx_optimizer_moves_only_lora_params_and_compiles_once():
    model = Mlp(nnx.Rngs(0))
    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"))
    lora_jax.lora(model, config, rngs=nnx.Rngs(1))
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)).to_pure_dict())
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    x, y = jax.random.normal(jax.random.key(0), (32, 10)), jnp.arange(32) % 3
    traces = []

    @nnx.jit
    def step(model, optimizer, x, y):
        traces.append(1)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(5)]
    assert len(traces) == 1 and losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(nnx.LoRAParam)).to_pure_dict(), frozen_before)
    assert float(jnp.abs(model.fc1.lora_B[...]).max()) > 0
    assert lora_jax.count_parameters(lora_jax.nnx_params(model), lora_jax.trainable_mask(model, config)) == (
        2 * (10 + 16) + 2 * (16 + 8), 10 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3 + 2 * (10 + 16) + 2 * (16 + 8))


def test_merge_gives_the_original_classes_and_leaves_the_model_adapted():
    model = Mlp(nnx.Rngs(0))
    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"))
    lora_jax.lora(model, config, rngs=nnx.Rngs(1))
    lora_jax.load_nnx_params(model, {"fc1": {"lora_B": 0.3 * jnp.ones((2, 16))}})
    x = jax.random.normal(jax.random.key(0), (4, 10))
    merged = lora_jax.merge(model, config)
    assert type(merged.fc1) is nnx.Linear and not hasattr(merged.fc1, "lora_A")
    assert type(model.fc1).__name__ == "LoraLinear" and isinstance(model.fc1, nnx.Linear)
    np.testing.assert_allclose(merged(x), model(x), atol=1e-5)
    assert not nnx.state(merged, nnx.LoRAParam).to_pure_dict()


def test_nnx_and_linen_agree_on_the_same_weights_and_write_the_same_peft_files(tmp_path):
    model = Mlp(nnx.Rngs(0))
    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    lora_jax.lora(model, config, rngs=nnx.Rngs(1))
    lora_jax.load_nnx_params(model, {"fc1": {"lora_B": 0.2 * jnp.ones((2, 16))},
                                                   "fc2": {"lora_B": -0.1 * jnp.ones((2, 8))}})
    params = lora_jax.nnx_params(model)  # the very same leaves, as a linen param tree
    linen_model = lora_jax.lora(LinenMlp(), config)
    x = jax.random.normal(jax.random.key(0), (4, 10))
    np.testing.assert_allclose(linen_model.apply({"params": params}, x), model(x), atol=1e-6)
    np.testing.assert_allclose(LinenMlp().apply({"params": lora_jax.merge(params, config)}, x),
                               lora_jax.merge(model, config)(x), atol=1e-6)
    lora_jax.export_peft(tmp_path / "nnx", model, config)
    lora_jax.export_peft(tmp_path / "linen", params, config)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "nnx" / name).read_bytes() == (tmp_path / "linen" / name).read_bytes()
    # an adapter saved from the NNX model loads into the linen model, and back into a fresh NNX model
    lora_jax.save_adapter(tmp_path / "adapter", model, config)
    adapter = lora_jax.load_adapter(tmp_path / "adapter")
    base = LinenMlp().init(jax.random.key(5), x)["params"]
    np.testing.assert_allclose(linen_model.apply({"params": lora_jax.apply_adapter(params, adapter)}, x), model(x),
                               atol=1e-6)
    fresh = Mlp(nnx.Rngs(0))
    lora_jax.lora(fresh, adapter.config, rngs=nnx.Rngs(9))
    lora_jax.apply_adapter(fresh, adapter)
    np.testing.assert_allclose(fresh(x), model(x), atol=1e-6)
    assert base is not None and json.loads((tmp_path / "nnx" / "adapter_config.json").read_text())["r"] == 2


def test_targets_that_match_nothing_list_the_nnx_layers():
    with pytest.raises(ValueError, match=r"\['qurey'\] matched no layer") as err:
        lora_jax.lora(Mlp(nnx.Rngs(0)), LoraConfig(rank=2, targets=("qurey",)), rngs=nnx.Rngs(1))
    assert "fc1  (dense)" in str(err.value)
    model = Mlp(nnx.Rngs(0))
    lora_jax.lora(model, LoraConfig(rank=2, targets=("fc1",)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="'fc1' already has LoRA"):
        lora_jax.lora(model, LoraConfig(rank=2, targets=("fc1",)), rngs=nnx.Rngs(1))
    with pytest.raises(TypeError, match="rngs=nnx.Rngs"):
        lora_jax.lora(Mlp(nnx.Rngs(0)), LoraConfig(rank=2, targets=("fc1",)))


def test_lora_dropout_follows_train_and_eval_modes():
    model = Mlp(nnx.Rngs(0))
    lora_jax.lora(model, LoraConfig(rank=2, alpha=4, targets=("fc1",), dropout=0.5), rngs=nnx.Rngs(1, lora_dropout=2))
    lora_jax.load_nnx_params(model, {"fc1": {"lora_B": jnp.ones((2, 16))}})
    x = jnp.ones((3, 10))
    first, second = model(x), model(x)
    assert float(jnp.abs(first - second).max()) > 1e-3  # a fresh mask per call while training
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    p = model.fc1
    hand = x @ p.kernel[...] + p.bias[...] + 2.0 * x @ p.lora_A[...] @ p.lora_B[...]
    h = jax.nn.relu(jax.nn.relu(hand) @ model.fc2.kernel[...] + model.fc2.bias[...])
    np.testing.assert_allclose(model(x), h @ model.fc3.kernel[...] + model.fc3.bias[...], atol=1e-5)


def test_tied_gpt_merges_exactly_and_lora_step_skips_frozen_weight_gradients():
    """A GPT-sized stack (hidden 384, 2 layers, batch 8 × 128): the LoRA gradient needs ≤ 0.72 of the full
    gradient's FLOPs (XLA's count), and the tied embedding's attend carries the same update as its lookup."""
    from tests.helpers import tiny_gpt

    small = tiny_gpt()
    config = LoraConfig(rank=4, alpha=8, targets=("embed", "query", "value"))
    lora_jax.lora(small, config, rngs=nnx.Rngs(1))
    lora_jax.load_nnx_params(small, {"embed": {"lora_B": 0.1 * jnp.ones((4, 32))}})
    ids = jnp.arange(24).reshape(2, 12) % 64
    np.testing.assert_allclose(lora_jax.merge(small, config)(ids), small(ids), atol=1e-4)

    def grad_flops(model, wrt):
        def loss(m, ids):
            logits = m(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        graphdef, state = nnx.split(model)

        def grads(state, ids):
            return nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(nnx.merge(graphdef, state), ids)

        batch = jnp.zeros((8, 128), jnp.int32)
        cost = jax.jit(grads).lower(state, batch).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    big = tiny_gpt(vocab=1024, dim=384, layers=2, heads=6)
    full = grad_flops(big, nnx.Param)
    lora_jax.lora(big, LoraConfig(rank=8, alpha=16, targets=("query", "value")), rngs=nnx.Rngs(2))
    lora = grad_flops(big, nnx.LoRAParam)
    print(f"NNX LoRA / full gradient FLOPs: {lora:.3e} / {full:.3e} = {lora / full:.3f}")
    assert lora / full <= 0.72, (lora, full, lora / full)


def test_stacked_layers_made_under_vmap_run_under_scan_and_merge_exactly():
    """One adapter per stacked layer (A (L, in, r)); inside nnx.scan each step sees its own layer's factors."""

    for use_dora in (False, True):
        model = stacked_nnx_linears(4)
        x = jax.random.normal(jax.random.key(1), (2, 4))
        before = model(x)
        config = LoraConfig(rank=2, alpha=4, targets=("layers",), use_dora=use_dora)
        lora_jax.lora(model, config, rngs=nnx.Rngs(1))
        assert model.layers.lora_A.shape == (3, 4, 2) and model.layers.lora_B.shape == (3, 2, 4)
        # B = 0; DoRA's gain m / ||W|| is 1 up to an ulp when the norm is recomputed inside the scan
        np.testing.assert_allclose(model(x), before, atol=0 if not use_dora else 1e-6)
        model.layers.lora_B[...] = 0.3 * jax.random.normal(jax.random.key(2), (3, 2, 4))
        p = {k: np.asarray(v, np.float64) for k, v in lora_jax.nnx_params(model)["layers"].items()}
        h = np.asarray(x, np.float64)
        for i in range(3):  # by hand, layer by layer
            adapted = p["kernel"][i] + 2.0 * p["lora_A"][i] @ p["lora_B"][i]
            if use_dora:
                adapted = p["lora_magnitude"][i] / np.linalg.norm(adapted, axis=0, keepdims=True) * adapted
            h = np.tanh(h @ adapted + p["bias"][i])
        np.testing.assert_allclose(model(x), h, atol=1e-5)
        np.testing.assert_allclose(lora_jax.merge(model, config)(x), h, atol=1e-5)




def test_modules_to_save_train_through_the_nnx_trainable_filter():
    model = Mlp(nnx.Rngs(0))
    config = LoraConfig(rank=2, alpha=4, targets=("fc1",), modules_to_save=("fc3",), bias="lora_only")
    lora_jax.lora(model, config, rngs=nnx.Rngs(1))
    trainable = lora_jax.nnx_trainable(model, config)
    before = jax.tree.map(np.asarray, lora_jax.nnx_params(model))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=trainable)
    x, y = jax.random.normal(jax.random.key(0), (16, 10)), jnp.arange(16) % 3

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
    optimizer.update(model, grads)
    after = lora_jax.nnx_params(model)
    moved = {f"{m}/{leaf}" for m in after for leaf in after[m]
             if not np.array_equal(np.asarray(after[m][leaf]), before[m][leaf])}
    # lora_B starts at zero, so lora_A's first gradient is zero; B, fc1's bias (lora_only) and all of fc3 move
    assert moved == {"fc1/lora_B", "fc1/bias", "fc3/kernel", "fc3/bias"}, moved


def test_lora_jax_train_step_on_an_nnx_model_matches_the_same_steps_on_linen():
    """nnx_functional makes the NNX model a pure function of a linen-shaped tree: the same steps from the
    same weights give the same params as the linen model's (and dropout, when on, draws from the step's rng)."""
    model = Mlp(nnx.Rngs(0))
    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    lora_jax.lora(model, config, rngs=nnx.Rngs(1))
    apply, params = lora_jax.nnx_functional(model)
    mask = lora_jax.trainable_mask(params, config)
    x, y = jax.random.normal(jax.random.key(0), (32, 10)), jnp.arange(32) % 3
    linen_model, tx = lora_jax.lora(LinenMlp(), config), optax.adam(1e-2)

    def run(forward):
        loss_fn = lambda p, batch, rng: optax.softmax_cross_entropy_with_integer_labels(
            forward(p, batch[0]), batch[1]).mean()
        state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(3))
        step = lora_jax.make_train_step(loss_fn, tx, mask)
        for _ in range(3):
            state, _ = step(state, (x, y))
        return state.params

    ours = run(lambda p, x: apply(p, x))
    reference = run(lambda p, x: linen_model.apply({"params": p}, x))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ours, reference)
    assert float(jnp.abs(ours["fc1"]["lora_B"]).max()) > 0
    assert type(model.fc1).__name__ == "LoraLinear" and float(jnp.abs(model.fc1.lora_B[...]).max()) == 0.0

    dropped = lora_jax.lora(Mlp(nnx.Rngs(0)), config.replace(dropout=0.5), rngs=nnx.Rngs(1))
    apply, params = lora_jax.nnx_functional(dropped)
    params["fc1"]["lora_B"] = jnp.ones((2, 16))
    assert float(jnp.abs(apply(params, x, rng=jax.random.key(1)) - apply(params, x, rng=jax.random.key(2))).max()) > 1e-3
    np.testing.assert_array_equal(apply(params, x), apply(params, x))  # no rng: dropout off


def test_flax_own_lora_linear_is_counted_merged_and_exported(tmp_path):
    class WithFlaxLora(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.LoRALinear(6, 4, lora_rank=2, rngs=rngs)
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(self.query(x))

    model = WithFlaxLora(nnx.Rngs(0))
    model.query.lora.lora_b[...] = 0.2 * jnp.ones((2, 4))
    config = LoraConfig(rank=2, alpha=2.0, targets=("query",))  # flax's LoRA applies no scale: alpha = rank
    assert lora_jax.count_parameters(model, lora_jax.trainable_mask(model, config))[0] == 6 * 2 + 2 * 4
    x = jax.random.normal(jax.random.key(0), (5, 6))
    merged = lora_jax.merge(model, config)
    assert type(merged.query) is nnx.Linear and not hasattr(merged.query, "lora")
    q = model.query
    by_hand = (x @ (q.kernel[...] + q.lora.lora_a[...] @ q.lora.lora_b[...]) + q.bias[...]) @ model.head.kernel[...]
    np.testing.assert_allclose(merged(x), by_hand + model.head.bias[...], atol=1e-5)
    np.testing.assert_allclose(model(x), merged(x), atol=1e-5)
    lora_jax.export_peft(tmp_path, model, config)
    adapter = lora_jax.import_peft(tmp_path)
    np.testing.assert_allclose(adapter.params["query"]["lora_B"], q.lora.lora_b[...])
    with pytest.raises(ValueError, match="'query' is flax's nnx.LoRALinear"):
        lora_jax.lora(model, config, rngs=nnx.Rngs(1))


def test_layers_called_under_nnx_remat_give_the_same_gradients():
    class Block(nnx.Module):
        def __init__(self, remat, rngs):
            self.remat, self.fc1, self.fc2 = remat, nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            body = lambda m, x: m.fc2(jnp.tanh(m.fc1(x)))
            return (nnx.remat(body) if self.remat else body)(self, x)

    x = jax.random.normal(jax.random.key(0), (4, 6))
    grads = []
    for remat in (False, True):
        model = Block(remat, nnx.Rngs(0))
        lora_jax.lora(model, LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2")), rngs=nnx.Rngs(1))
        model.fc1.lora_B[...] = 0.1 * jnp.ones((2, 8))
        grad = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        grads.append(jax.tree.map(np.asarray, grad.to_pure_dict()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *grads)
    assert np.abs(grads[0]["fc1"]["lora_A"]).max() > 0


def test_exclude_rank_pattern_and_rslora_behave_as_in_linen():
    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2", "fc3"), exclude=("fc3",), rank_pattern={"fc2": 4},
                        rslora=True)
    model = Mlp(nnx.Rngs(0))
    lora_jax.lora(model, config, rngs=nnx.Rngs(1))
    assert model.fc1.lora_A.shape == (10, 2) and model.fc2.lora_A.shape == (16, 4) and not hasattr(model.fc3, "lora_A")
    lora_jax.load_nnx_params(model, {"fc1": {"lora_B": 0.2 * jnp.ones((2, 16))},
                                                   "fc2": {"lora_B": -0.3 * jnp.ones((4, 8))}})
    x = jax.random.normal(jax.random.key(0), (4, 10))
    np.testing.assert_allclose(model(x), lora_jax.lora(LinenMlp(), config).apply(
        {"params": lora_jax.nnx_params(model)}, x), atol=1e-6)


def test_rngs_without_a_params_stream_misshaped_functional_params_and_requantized_merges_are_named():
    config = LoraConfig(rank=2, targets=("fc1",))
    with pytest.raises(ValueError, match=r"rngs has no 'params' stream .*nnx.Rngs\(params=0"):
        lora_jax.lora(Mlp(nnx.Rngs(0)), config, rngs=nnx.Rngs(dropout=1))
    model = lora_jax.lora(Mlp(nnx.Rngs(0)), config, rngs=nnx.Rngs(params=1, dropout=2))
    apply, params = lora_jax.nnx_functional(model)
    params["fc1"]["lora_A"] = jnp.zeros((params["fc1"]["lora_A"].shape[0], 5))
    with pytest.raises(ValueError, match=r"params\['fc1/lora_A'\] has shape \(\d+, 5\), the model's variable \(\d+, 2\)"):
        apply(params, jnp.ones((1, params["fc1"]["lora_A"].shape[0])))
    with pytest.raises(TypeError, match="merge_requantized takes a linen param tree; for an NNX model"):
        lora_jax.merge_requantized(model, config)


def test_nnx_pissa_starts_as_linen_does_and_leaves_the_model_unchanged():
    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), init="pissa")
    model = Mlp(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 10))
    before = model(x)
    base = lora_jax.nnx_params(model)
    lora_jax.lora(model, config, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(model(x), before, atol=1e-5)
    linen = lora_jax.init_lora_params(lora_jax.lora(LinenMlp(), config), base, jax.random.key(2), x)
    ours = lora_jax.nnx_params(model)
    for name in ("fc1", "fc2"):
        for leaf in ("lora_A", "lora_B", "lora_A_init", "lora_B_init"):
            np.testing.assert_allclose(ours[name][leaf], linen[name][leaf], atol=1e-6)
    assert set(lora_jax.lora_leaves(ours)["fc1"]) == {"lora_A", "lora_B", "lora_A_init", "lora_B_init"}
