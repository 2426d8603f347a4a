"""merge / unmerge: pure, jittable, exact inverse up to float32 rounding, for every kernel layout."""

import chex
import jax
import jax.numpy as jnp
import pytest

import lora_jax
from lora_jax import LoraConfig
import numpy as np
from tests.helpers import AllKinds, TinyTransformerBlock, randomize_lora

TARGETS = ("emb", "dg_split", "dg_merge", "einsum", "conv", "fc")


@pytest.fixture
def adapted(all_kinds_inputs):
    config = LoraConfig(rank=2, alpha=5, targets=TARGETS, rslora=True)
    model = lora_jax.lora(AllKinds(), config)
    params = randomize_lora(model.init(jax.random.key(0), *all_kinds_inputs)["params"], seed=3)
    return model, config, params


def test_merged_params_fit_untransformed_model_and_match_outputs(adapted, all_kinds_inputs):
    model, config, params = adapted
    merged = jax.jit(lora_jax.merge, static_argnums=1)(params, config)
    assert not any("lora_" in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
    base_shapes = jax.tree.map(jnp.shape, AllKinds().init(jax.random.key(9), *all_kinds_inputs)["params"])
    assert jax.tree.map(jnp.shape, merged) == base_shapes
    chex.assert_trees_all_close(AllKinds().apply({"params": merged}, *all_kinds_inputs),
                                model.apply({"params": params}, *all_kinds_inputs), atol=1e-5, rtol=1e-5)


def test_unmerge_inverts_merge(adapted):
    _, config, params = adapted
    adapter = lora_jax.lora_leaves(params)
    restored = jax.jit(lora_jax.unmerge, static_argnums=2)(lora_jax.merge(params, config), adapter, config)
    chex.assert_trees_all_equal_structs(restored, params)
    chex.assert_trees_all_close(restored, params, atol=1e-6, rtol=1e-6)


def test_unmerge_refuses_unmerged_params(adapted):
    _, config, params = adapted
    with pytest.raises(ValueError, match="already holds LoRA leaves"):
        lora_jax.unmerge(params, params, config)


def test_merge_does_not_modify_its_input(adapted):
    _, config, params = adapted
    before = jax.tree.map(jnp.copy, params)
    lora_jax.merge(params, config)
    chex.assert_trees_all_equal(params, before)


def test_merge_on_transformer_block_with_tight_tolerance():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    config = LoraConfig(rank=4, alpha=8, targets=("query", "key", "value", "attn_out", "intermediate", "output"))
    model = lora_jax.lora(TinyTransformerBlock(), config)
    params = randomize_lora(model.init(jax.random.key(1), x)["params"])
    chex.assert_trees_all_close(TinyTransformerBlock().apply({"params": lora_jax.merge(params, config)}, x),
                                model.apply({"params": params}, x), atol=1e-5)


def test_rank_pattern_gives_per_layer_rank_and_scale():
    from experiments.mlp import MLP

    x = jax.random.normal(jax.random.key(0), (4, 12))
    config = LoraConfig(rank=6, alpha=12, targets=("fc1", "fc2"), rank_pattern={"fc2": 3})
    model = lora_jax.lora(MLP((8, 3)), config)
    params = randomize_lora(model.init(jax.random.key(1), x)["params"])
    assert params["fc1"]["lora_A"].shape == (12, 6) and params["fc2"]["lora_A"].shape == (8, 3)
    p2 = params["fc2"]
    h = model.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])[1]
    fc2_in = h["intermediates"]["fc1"]["__call__"][0]
    expected = jax.nn.relu(fc2_in) @ p2["kernel"] + p2["bias"] + (12 / 3) * jax.nn.relu(fc2_in) @ p2["lora_A"] @ p2["lora_B"]
    chex.assert_trees_all_close(model.apply({"params": params}, x), expected, atol=1e-5)
    chex.assert_trees_all_close(MLP((8, 3)).apply({"params": lora_jax.merge(params, config)}, x),
                                model.apply({"params": params}, x), atol=1e-5)
    assert LoraConfig.from_json(config.to_json()) == config


def _with_random_magnitudes(params, seed=5):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        v * (1.0 + 0.5 * jax.random.uniform(k, v.shape)) if p[-1].key == "lora_magnitude" else v
        for (p, v), k in zip(leaves, keys)])


def test_dora_merge_matches_the_dora_model_and_the_formula(all_kinds_inputs):
    config = LoraConfig(rank=2, alpha=5, targets=("emb", "dg_split", "dg_merge", "conv", "fc"), use_dora=True)
    model = lora_jax.lora(AllKinds(), config)
    params = _with_random_magnitudes(randomize_lora(model.init(jax.random.key(0), *all_kinds_inputs)["params"],
                                                    seed=3))
    merged = jax.jit(lora_jax.merge, static_argnums=1)(params, config)
    chex.assert_trees_all_close(AllKinds().apply({"params": merged}, *all_kinds_inputs),
                                model.apply({"params": params}, *all_kinds_inputs), atol=1e-5, rtol=1e-5)
    fc = {k: np.asarray(v, np.float64) for k, v in params["head"]["fc"].items()}
    adapted = fc["kernel"] + 2.5 * fc["lora_A"] @ fc["lora_B"]
    expected = fc["lora_magnitude"] / np.linalg.norm(adapted, axis=0, keepdims=True) * adapted
    np.testing.assert_allclose(np.asarray(merged["head"]["fc"]["kernel"]), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="DoRA merge cannot be undone"):
        lora_jax.unmerge(merged, lora_jax.lora_leaves(params), config)


def test_dora_merge_of_scanned_layers_keeps_each_layer_apart():
    """Stacked (nn.scan) kernels (L, in, out) with magnitudes (L, 1, out): one norm per layer and output."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.tanh(nn.Dense(6, name="fc")(h)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(x, None)[0]

    x = jax.random.normal(jax.random.key(0), (4, 6))
    config = LoraConfig(rank=2, alpha=4, targets=("fc",), use_dora=True)
    model = lora_jax.lora(Stack(), config)
    params = _with_random_magnitudes(randomize_lora(model.init(jax.random.key(1), x)["params"]))
    assert params["layers"]["fc"]["lora_magnitude"].shape == (3, 1, 6)
    chex.assert_trees_all_close(Stack().apply({"params": lora_jax.merge(params, config)}, x),
                                model.apply({"params": params}, x), atol=1e-5, rtol=1e-5)


def test_merge_refuses_dora_leaves_under_a_plain_config():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="fc")(x)

    dora = LoraConfig(rank=2, targets=("fc",), use_dora=True)
    params = lora_jax.lora(Net(), dora).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    with pytest.raises(ValueError, match=r"'fc' holds \['lora_magnitude'\].*use_dora"):
        lora_jax.merge(params, dora.replace(use_dora=False))
