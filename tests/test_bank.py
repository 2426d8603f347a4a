"""bank: one forward over a batch mixing adapters equals each row run with its own adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from tests.helpers import served_mlp_and_adapters


def test_mixed_batch_equals_each_row_with_its_own_adapter_and_gradients_stay_in_their_rows():
    x = jax.random.normal(jax.random.key(3), (7, 10))
    served, slots, params, adapters = served_mlp_and_adapters(x)
    bank = lora_jax.make_bank(params, [a for _, _, a in adapters], slots)
    assert bank["fc1"]["lora_A"].shape == (4, 10, 8)
    index = jnp.array([0, 2, -1, 1, 1, 0, -1])
    mixed = jax.jit(lambda b, i, x: lora_jax.bank_apply(served, params, b, i, x))(bank, index, x)
    for row, i in enumerate(np.asarray(index)):
        if i < 0:  # no adapter: the served model's own head, zero LoRA updates
            expected = served.apply({"params": {**params, "fc1": {**params["fc1"], "lora_B": 0 * params["fc1"]["lora_B"]},
                                                "fc2": {**params["fc2"], "lora_B": 0 * params["fc2"]["lora_B"]}}}, x[row:row + 1])
        else:
            own, own_params, _ = adapters[i]
            expected = own.apply({"params": own_params}, x[row:row + 1])
        np.testing.assert_allclose(mixed[row], expected[0], atol=1e-5)

    def loss(b):
        logits = lora_jax.bank_apply(served, params, b, index, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(7) % 3).mean()

    grads = jax.jit(jax.grad(loss))(bank)
    for i in range(4):  # adapters 0, 1, 2 are used; row 3 (no adapter) is a constant
        moved = [float(jnp.abs(g[i]).max()) for g in jax.tree.leaves(grads)]
        assert (max(moved) > 0) == (i < 3), (i, moved)
    grads = jax.jit(jax.grad(lambda b: lora_jax.bank_apply(served, params, b, jnp.zeros(7, int), x).sum()))(bank)
    assert all(float(jnp.abs(g[1:]).max()) == 0 for g in jax.tree.leaves(grads))


def test_out_of_range_or_float_indices_and_adapters_of_other_widths_are_refused():
    import pytest

    x = jax.random.normal(jax.random.key(3), (3, 10))
    served, slots, params, adapters = served_mlp_and_adapters(x)
    bank = lora_jax.make_bank(params, [a for _, _, a in adapters], slots)
    for index, message in ((jnp.array([0, 3, -1]), r"rows \[1\] hold \[3\]"), (jnp.array([0, -2, 1]), r"rows \[1\] hold \[-2\]"),
                           (jnp.array([0.0, 1.0, 2.0]), "integer array")):
        with pytest.raises(ValueError, match=message):
            lora_jax.bank_apply(served, params, bank, index, x)
    own_config, adapter = adapters[0][2].config, adapters[0][2]
    wider = jax.tree.map(lambda v: jnp.concatenate([v, v], 0) if v.ndim == 2 and v.shape[0] == 10 else v,
                         dict(adapter.params))  # lora_A of fc1 for 20 inputs instead of 10
    with pytest.raises(ValueError, match=r"lora_A at 'fc1' has shape \(20, \d+\).*only the rank"):
        lora_jax.hotswap_adapter(params, lora_jax.Adapter(wider, own_config), slots)
    with pytest.raises(ValueError, match="only the rank"):
        lora_jax.make_bank(params, [lora_jax.Adapter(wider, own_config)], slots)


def test_adapters_heads_are_served_even_where_the_slots_train_no_head():
    x = jax.random.normal(jax.random.key(3), (3, 10))
    _, slots, _, adapters = served_mlp_and_adapters(x)
    headless = slots.replace(modules_to_save=())
    from experiments.mlp import MLP
    served = lora_jax.lora(MLP((16, 12, 3)), headless)
    params = served.init(jax.random.key(0), x)["params"]
    bank = lora_jax.make_bank(params, [a for _, _, a in adapters], headless)
    assert bank["fc3"]["kernel"].shape == (4, 12, 3)
    mixed = lora_jax.bank_apply(served, params, bank, jnp.array([0, 1, 2]), x)
    for i, (own, own_params, _) in enumerate(adapters):
        np.testing.assert_allclose(mixed[i], own.apply({"params": own_params}, x[i:i + 1])[0], atol=1e-5)


def test_swaps_and_banks_check_the_base_fingerprint_and_name_incomplete_adapters():
    import pytest

    x = jax.random.normal(jax.random.key(3), (3, 10))
    _, slots, params, adapters = served_mlp_and_adapters(x)
    _, own_params, adapter = adapters[0]
    other = jax.tree.map(lambda v: v + 0.5, own_params)  # another base: every weight differs
    recorded = lora_jax.base_fingerprint(other, lora_jax.trainable_mask(other, adapter.config))
    foreign = lora_jax.Adapter(adapter.params, adapter.config, {"base_fingerprint": recorded})
    with pytest.raises(lora_jax.BaseMismatchError, match="different base model"):
        lora_jax.hotswap_adapter(params, foreign, slots)
    with pytest.raises(lora_jax.BaseMismatchError, match="adapter 1: .*different base model"):
        lora_jax.make_bank(params, [adapter, foreign], slots)
    with pytest.warns(UserWarning, match="different base model"):
        lora_jax.make_bank(params, [foreign], slots, strict=False)
    own = lora_jax.base_fingerprint(own_params, lora_jax.trainable_mask(own_params, adapter.config))
    lora_jax.hotswap_adapter(params, lora_jax.Adapter(adapter.params, adapter.config, {"base_fingerprint": own}), slots)
    incomplete = {k: {n: v for n, v in layer.items() if n != "lora_B"} for k, layer in adapter.params.items()}
    with pytest.raises(ValueError, match="'fc1' has lora_A but no lora_B"):
        lora_jax.make_bank(params, [lora_jax.Adapter(incomplete, adapter.config)], slots)


def _mlp_under(config, key=1):
    """(x, the base MLP, its params, the LoRA model under ``config``, its fresh LoRA params)."""
    from experiments.mlp import MLP

    x = jax.random.normal(jax.random.key(3), (4, 10))
    base_model = MLP((16, 12, 3))
    base = base_model.init(jax.random.key(0), x)["params"]
    served = lora_jax.lora(base_model, config)
    return x, base_model, base, served, lora_jax.init_lora_params(served, base, jax.random.key(key), x)


def test_a_dora_banks_no_adapter_row_is_the_base_model():
    config = lora_jax.LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), use_dora=True)
    x, base_model, base, served, trained = _mlp_under(config)
    for name in ("fc1", "fc2"):  # magnitudes moved away from ||W||, B away from 0
        layer = trained[name]
        layer["lora_magnitude"] = layer["lora_magnitude"] * 1.3
        layer["lora_B"] = jax.random.normal(jax.random.key(2), layer["lora_B"].shape)
    adapter = lora_jax.extract_adapter(trained, config)
    bank = lora_jax.make_bank(trained, [adapter], config)
    out = lora_jax.bank_apply(served, trained, bank, jnp.array([-1, 0, -1, 0]), x)
    out, rows = np.asarray(out), np.array([0, 2])
    np.testing.assert_allclose(out[rows], base_model.apply({"params": base}, x[rows]), atol=1e-5)
    np.testing.assert_allclose(out[rows + 1], served.apply({"params": trained}, x[rows + 1]), atol=1e-5)


def test_an_nnx_model_serves_a_bank_and_hotswaps_in_place():
    from flax import nnx

    from tests.helpers import NnxTanhMlp

    Net = lambda rngs: NnxTanhMlp(10, 16, 5, rngs)
    x = jax.random.normal(jax.random.key(3), (3, 10))
    slots = lora_jax.LoraConfig(rank=4, alpha=4, targets=("fc1", "fc2"))
    adapters = []
    for i, config in enumerate([lora_jax.LoraConfig(rank=2, alpha=8, targets=("fc1", "fc2")),
                                lora_jax.LoraConfig(rank=4, alpha=2, targets=("fc1",), rslora=True)]):
        own = lora_jax.lora(Net(nnx.Rngs(0)), config, rngs=nnx.Rngs(i + 1))
        for _, module in nnx.iter_modules(own):
            if hasattr(module, "lora_B"):
                module.lora_B[...] = jax.random.normal(jax.random.key(i), module.lora_B[...].shape)
        expected = np.asarray(own(x))
        adapters.append((expected, lora_jax.extract_adapter(own, config)))
    served = lora_jax.lora(Net(nnx.Rngs(0)), slots, rngs=nnx.Rngs(9))
    bank = lora_jax.make_bank(served, [a for _, a in adapters], slots)
    out = lora_jax.bank_apply(served, None, bank, jnp.array([1, 0, -1]), x)
    np.testing.assert_allclose(out[0], adapters[1][0][0], atol=1e-5)
    np.testing.assert_allclose(out[1], adapters[0][0][1], atol=1e-5)
    np.testing.assert_allclose(out[2], Net(nnx.Rngs(0))(x)[2], atol=1e-5)
    assert lora_jax.hotswap_adapter(served, adapters[0][1], slots) is served
    np.testing.assert_allclose(served(x), adapters[0][0], atol=1e-5)


def test_pissa_adapters_bank_and_hotswap_with_their_frozen_factors():
    slots = lora_jax.LoraConfig(rank=4, alpha=8, targets=("fc1", "fc2"), init="pissa")
    x, base_model, base, served, params = _mlp_under(slots)
    small = lora_jax.LoraConfig(rank=2, alpha=2, targets=("fc1",), init="pissa")  # other rank, scale, layers
    own = lora_jax.lora(base_model, small)
    trained = lora_jax.init_lora_params(own, base, jax.random.key(1), x)
    trained["fc1"]["lora_B"] = trained["fc1"]["lora_B"] + 0.3
    adapter = lora_jax.extract_adapter(trained, small)
    assert set(adapter.params["fc1"]) == {"lora_A", "lora_B", "lora_A_init", "lora_B_init"}
    want = own.apply({"params": trained}, x)
    swapped = lora_jax.hotswap_adapter(params, adapter, slots)
    np.testing.assert_allclose(served.apply({"params": swapped}, x), want, atol=1e-5)
    bank = lora_jax.make_bank(params, [adapter], slots)
    out = np.asarray(lora_jax.bank_apply(served, params, bank, jnp.array([0, -1, 0, -1]), x))
    want, rows = np.asarray(want), np.array([0, 2])
    np.testing.assert_allclose(out[rows], want[rows], atol=1e-5)
    np.testing.assert_allclose(out[rows + 1], base_model.apply({"params": base}, x[rows + 1]), atol=1e-5)


def test_hotswap_gives_layers_the_adapter_leaves_alone_their_neutral_leaves():
    slots = lora_jax.LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), use_dora=True)
    x, base_model, base, served, running = _mlp_under(slots)
    running["fc2"]["lora_magnitude"] = running["fc2"]["lora_magnitude"] * 1.5  # the previous adapter's fc2
    only_fc1 = lora_jax.LoraConfig(rank=2, alpha=4, targets=("fc1",), use_dora=True)
    own = lora_jax.lora(base_model, only_fc1)
    trained = lora_jax.init_lora_params(own, base, jax.random.key(2), x)
    trained["fc1"]["lora_B"] = jax.random.normal(jax.random.key(4), trained["fc1"]["lora_B"].shape)
    swapped = lora_jax.hotswap_adapter(running, lora_jax.extract_adapter(trained, only_fc1), slots)
    np.testing.assert_allclose(served.apply({"params": swapped}, x), own.apply({"params": trained}, x), atol=1e-5)
