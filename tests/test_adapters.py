"""Adapters as values: applying one onto a base checks what it is given."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from experiments.mlp import MLP
from tests.helpers import randomize_lora, served_mlp_and_adapters


def _params():
    config = LoraConfig(rank=2, targets=("fc1", "fc2"))
    params = lora_jax.lora(MLP((8, 3)), config).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    return config, params


def test_apply_adapter_names_wrong_argument_types():
    config, params = _params()
    _, base = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    with pytest.raises(TypeError, match="takes an Adapter .* got list"):
        lora_jax.apply_adapter(base, [1, 2])
    with pytest.raises(TypeError, match="apply_adapter takes a param tree \(a nested dict\) or a flax.nnx model, got str"):
        lora_jax.apply_adapter("base", lora_jax.extract_adapter(params, config))


def test_lora_leaves_outside_the_targets_are_named():
    config, params = _params()
    adapter = lora_jax.extract_adapter(params, config).params
    lora_jax.check_targets_cover(adapter, config)  # consistent: silent
    with pytest.raises(ValueError, match=r"does not target \(\['fc2'\]; targets \['fc1'\]"):
        lora_jax.check_targets_cover(adapter, config.replace(targets=("fc1",)))
    with pytest.raises(ValueError, match=r"does not target \(\['fc1'\]"):
        lora_jax.check_targets_cover(adapter, config.replace(exclude=("fc1",)))


def test_multiple_adapters_switch_without_recompiling():
    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"))
    model = lora_jax.lora(MLP((16, 3)), config)
    x = jax.random.normal(jax.random.key(0), (4, 10))
    params = model.init(jax.random.key(1), x)["params"]
    _, base = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    adapters = [lora_jax.extract_adapter(randomize_lora(params, seed=s), config) for s in (1, 2, 3)]
    traces = []

    def apply(p, x):  # runs in Python only while jit traces
        traces.append(1)
        return model.apply({"params": p}, x)

    forward = jax.jit(apply)
    outputs = [forward(lora_jax.apply_adapter(base, a), x) for a in adapters]
    assert len(traces) == 1
    assert float(jnp.abs(outputs[0] - outputs[1]).max()) > 1e-3
    np.testing.assert_allclose(outputs[2], model.apply({"params": lora_jax.apply_adapter(base, adapters[2])}, x))


def _delta(adapter, module):
    p = adapter.params[module]
    return adapter.config.scale_for(p["lora_A"].shape[-1]) * (p["lora_A"] @ p["lora_B"])


def test_weighted_adapter_math():
    x = jnp.ones((1, 10))
    c1 = LoraConfig(rank=2, alpha=4, targets=("fc1",))
    c2 = LoraConfig(rank=3, alpha=3, targets=("fc1",))
    p1 = randomize_lora(lora_jax.lora(MLP((16,)), c1).init(jax.random.key(1), x)["params"], seed=1)
    p2 = randomize_lora(lora_jax.lora(MLP((16,)), c2).init(jax.random.key(2), x)["params"], seed=2)
    a1, a2 = lora_jax.extract_adapter(p1, c1), lora_jax.extract_adapter(p2, c2)
    cat = lora_jax.add_weighted_adapter([a1, a2], [0.7, -0.4], "cat", base_params=p1)
    assert cat.config.rank == 5 and cat.config.scale == 1.0
    np.testing.assert_allclose(_delta(cat, "fc1"), 0.7 * _delta(a1, "fc1") - 0.4 * _delta(a2, "fc1"), atol=1e-6)

    a3 = lora_jax.extract_adapter(randomize_lora(p1, seed=3), c1)
    lin = lora_jax.add_weighted_adapter([a1, a3], [0.5, 2.0], "linear")
    s1, s3 = 0.5 * c1.scale, 2.0 * c1.scale
    A = np.sqrt(s1) * a1.params["fc1"]["lora_A"] + np.sqrt(s3) * a3.params["fc1"]["lora_A"]
    B = np.sqrt(s1) * a1.params["fc1"]["lora_B"] + np.sqrt(s3) * a3.params["fc1"]["lora_B"]
    np.testing.assert_allclose(_delta(lin, "fc1"), A @ B, atol=1e-6)
    with pytest.raises(ValueError, match="'linear' needs equal ranks"):
        lora_jax.add_weighted_adapter([a1, a2], [1.0, 1.0], "linear")


def test_weighted_adapter_inputs_are_checked():
    config, params = _params()
    a = lora_jax.extract_adapter(randomize_lora(params, seed=1), config)
    with pytest.raises(ValueError, match="one weight per adapter, got 1 adapters and 2 weights"):
        lora_jax.add_weighted_adapter([a], [1.0, 2.0])
    with pytest.raises(ValueError, match="combination_type must be 'linear', 'cat' or 'svd'"):
        lora_jax.add_weighted_adapter([a], [1.0], combination_type="dare")
    with pytest.raises(ValueError, match="'svd' needs base_params"):
        lora_jax.add_weighted_adapter([a], [1.0], combination_type="svd")
    with pytest.raises(ValueError, match="'cat' needs base_params"):
        lora_jax.add_weighted_adapter([a], [1.0], combination_type="cat")
    partial = lora_jax.Adapter({"fc1": a.params["fc1"]}, config)
    with pytest.raises(ValueError, match="'fc2' is adapted by some adapters but not all"):
        lora_jax.add_weighted_adapter([a, partial], [1.0, 1.0])
    dora = lora_jax.Adapter(a.params, config.replace(use_dora=True))
    with pytest.raises(ValueError, match=r"adapters \[1\] are DoRA adapters"):
        lora_jax.add_weighted_adapter([a, dora], [1.0, 1.0])


def _combination_inputs():
    base = MLP((8, 5)).init(jax.random.key(0), jnp.ones((1, 6)))["params"]
    configs = [LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2")),
               LoraConfig(rank=2, alpha=3, targets=("fc1", "fc2"), rslora=True),
               LoraConfig(rank=2, alpha=5, targets=("fc1", "fc2"), rank_pattern={"fc2": 3})]
    adapters = []
    for i, config in enumerate(configs):
        params = lora_jax.lora(MLP((8, 5)), config).init(jax.random.key(1), jnp.ones((1, 6)))["params"]
        adapters.append(lora_jax.extract_adapter(randomize_lora(params, seed=10 + i, scale=0.5), config))
    return base, adapters, [0.7, -0.4, 1.2]


def _update_by_hand(adapters, weights, layer):
    """sum_i w_i · scale_i · A_i B_i with each adapter's own scale for that layer's rank."""
    total = 0.0
    for adapter, w in zip(adapters, weights):
        a, b = (np.asarray(adapter.params[layer][k], np.float64) for k in ("lora_A", "lora_B"))
        r, c = a.shape[-1], adapter.config
        total = total + w * (c.alpha / (np.sqrt(r) if c.rslora else r)) * a @ b
    return total


def _update_of(adapter, base, layer):
    merged = lora_jax.merge(lora_jax.apply_adapter(base, adapter), adapter.config)
    return np.asarray(merged[layer]["kernel"], np.float64) - np.asarray(base[layer]["kernel"], np.float64)


def test_cat_combination_is_exact_for_rslora_and_rank_pattern_adapters():
    base, adapters, weights = _combination_inputs()
    combined = lora_jax.add_weighted_adapter(adapters, weights, "cat", base_params=base)
    assert combined.params["fc1"]["lora_A"].shape == (6, 6) and combined.params["fc2"]["lora_A"].shape == (8, 7)
    for layer in ("fc1", "fc2"):
        np.testing.assert_allclose(_update_of(combined, base, layer), _update_by_hand(adapters, weights, layer),
                                   atol=1e-5)


def test_svd_combination_keeps_the_best_low_rank_part_and_reports_what_it_drops():
    base, adapters, weights = _combination_inputs()
    exact = lora_jax.add_weighted_adapter(adapters, weights, "svd", base_params=base, svd_rank=5)
    np.testing.assert_allclose(_update_of(exact, base, "fc2"), _update_by_hand(adapters, weights, "fc2"), atol=1e-5)
    # fc2 (8 -> 5) has rank at most 5: nothing dropped; fc1 (6 -> 8) sums three rank-2 updates: rank 6 > 5
    assert exact.metadata["svd_discarded_energy"]["fc2"] < 1e-10 < exact.metadata["svd_discarded_energy"]["fc1"]
    low = lora_jax.add_weighted_adapter(adapters, weights, "svd", base_params=base, svd_rank=1)
    for layer in ("fc1", "fc2"):
        full = _update_by_hand(adapters, weights, layer)
        u, sv, vh = np.linalg.svd(full, full_matrices=False)
        np.testing.assert_allclose(_update_of(low, base, layer), sv[0] * np.outer(u[:, 0], vh[0]), atol=1e-5)
        np.testing.assert_allclose(low.metadata["svd_discarded_energy"][layer], 1 - sv[0] ** 2 / np.sum(sv ** 2),
                                   rtol=1e-4)
    with pytest.raises(ValueError, match="svd_rank 9 exceeds min"):
        lora_jax.add_weighted_adapter(adapters, weights, "svd", base_params=base, svd_rank=9)


def test_hotswapping_adapters_of_other_ranks_and_scales_does_not_recompile():
    x = jax.random.normal(jax.random.key(3), (4, 10))
    served, slots, params, adapters = served_mlp_and_adapters(x)
    traces = []

    def forward(p, x):
        traces.append(1)
        return served.apply({"params": p}, x)

    forward = jax.jit(forward)
    forward(params, x)
    for own, own_params, adapter in adapters:
        swapped = lora_jax.hotswap_adapter(params, adapter, slots)
        np.testing.assert_allclose(forward(swapped, x), own.apply({"params": own_params}, x), atol=1e-5)
    assert len(traces) == 1
    too_big = lora_jax.Adapter({"fc1": {"lora_A": jnp.ones((10, 9)), "lora_B": jnp.ones((9, 16))}}, adapters[0][2].config)
    with pytest.raises(ValueError, match="rank 9, the running model 8 slots"):
        lora_jax.hotswap_adapter(params, too_big, slots)


def test_nnx_apply_adapter_uses_the_adapters_own_scale_and_refuses_another_variant():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(6, 4, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)

    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 6)))
    a = np.asarray(jax.random.normal(jax.random.key(1), (6, 2)))
    b = np.asarray(jax.random.normal(jax.random.key(2), (2, 4)))
    for adapter_config in (LoraConfig(rank=2, alpha=32, targets=("fc",)),
                           LoraConfig(rank=2, alpha=8, rslora=True, targets=("fc",))):
        model = lora_jax.lora(Net(nnx.Rngs(0)), LoraConfig(rank=2, alpha=4, targets=("fc",)), rngs=nnx.Rngs(1))
        w, bias = np.asarray(model.fc.kernel[...]), np.asarray(model.fc.bias[...])
        lora_jax.apply_adapter(model, lora_jax.Adapter({"fc": {"lora_A": a, "lora_B": b}}, adapter_config))
        scale = adapter_config.alpha / (np.sqrt(2) if adapter_config.rslora else 2)  # the adapter's, not alpha 4's
        np.testing.assert_allclose(model(x), x @ w + bias + scale * (x @ a) @ b, rtol=1e-5, atol=1e-5)
    dora_model = lora_jax.lora(Net(nnx.Rngs(0)), LoraConfig(rank=2, targets=("fc",), use_dora=True), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="'fc' of the model is DoRA and the adapter is plain LoRA"):
        lora_jax.apply_adapter(dora_model, lora_jax.Adapter({"fc": {"lora_A": a, "lora_B": b}},
                                                            LoraConfig(rank=2, targets=("fc",))))


def test_weighted_adapters_refuse_heads_bad_weights_other_widths_and_other_bases():
    config, params = _params()
    a = lora_jax.extract_adapter(randomize_lora(params, seed=1), config)
    b = lora_jax.extract_adapter(randomize_lora(params, seed=2), config)
    with_head = lora_jax.Adapter({**a.params, "fc3": {"kernel": jnp.ones((8, 3))}}, config)
    with pytest.raises(ValueError, match=r"adapter 1 also trained \['fc3/kernel'\] \(a head"):
        lora_jax.add_weighted_adapter([a, with_head], [0.5, 0.5])
    for weights, message in (([1.0, float("nan")], r"weights\[1\] is nan"), ([float("inf"), 1.0], r"weights\[0\] is inf"),
                             ([1.0, "2"], r"weights\[1\] is '2'"), ([True, 1.0], r"weights\[0\] is True")):
        with pytest.raises(ValueError, match=message):
            lora_jax.add_weighted_adapter([a, b], weights)
    with pytest.raises(TypeError, match="a list of weights"):
        lora_jax.add_weighted_adapter([a, b], (w for w in [1.0, 1.0]))
    with pytest.raises(ValueError, match="svd_rank"):
        lora_jax.add_weighted_adapter([a, b], [1.0, 1.0], "svd", base_params=params, svd_rank=True)
    wide = jax.tree.map(lambda v: jnp.concatenate([v, v], 0) if v.shape[0] == 4 else v, dict(b.params))
    with pytest.raises(ValueError, match="layer 'fc1': the adapters' factors .* only the rank may differ"):
        lora_jax.add_weighted_adapter([a, lora_jax.Adapter(wide, config)], [1.0, 1.0], "cat", base_params=params)
    mask = lora_jax.trainable_mask(params, config)
    fp = lora_jax.base_fingerprint(params, mask)
    other_fp = lora_jax.base_fingerprint(jax.tree.map(lambda v: v + 1.0, params), mask)
    same = lora_jax.add_weighted_adapter([lora_jax.Adapter(a.params, config, {"base_fingerprint": fp}),
                                          lora_jax.Adapter(b.params, config, {"base_fingerprint": fp})], [0.5, 0.5])
    assert same.metadata["base_fingerprint"] == fp
    with pytest.raises(ValueError, match="trained on 2 different bases"):
        lora_jax.add_weighted_adapter([lora_jax.Adapter(a.params, config, {"base_fingerprint": fp}),
                                       lora_jax.Adapter(b.params, config, {"base_fingerprint": other_fp})], [0.5, 0.5])
