"""merge / unmerge: pure, jittable, exact inverse up to float32 rounding, for every kernel layout."""

import chex
import jax
import jax.numpy as jnp
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.layers import weight_delta
from tests.conftest import AllKinds, TinyTransformerBlock, randomize_lora

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


def test_weight_delta_for_interleaved_einsum_kernel():
    """Kernel (n, d, h) with d contracted: delta[n, d, h] = sum_r A[d, r] B[n, h, r]."""
    a = jax.random.normal(jax.random.key(0), (1, 4, 1, 2))
    b = jax.random.normal(jax.random.key(1), (3, 1, 5, 2))
    expected = jnp.einsum("dr,nhr->ndh", a[0, :, 0], b[:, 0])
    chex.assert_trees_all_close(weight_delta(a, b, (3, 4, 5)), expected, atol=1e-6)


def test_merge_on_transformer_block_with_tight_tolerance():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    config = LoraConfig(rank=4, alpha=8, targets=("query", "key", "value", "attn_out", "intermediate", "output"))
    model = lora_jax.lora(TinyTransformerBlock(), config)
    params = randomize_lora(model.init(jax.random.key(1), x)["params"])
    chex.assert_trees_all_close(TinyTransformerBlock().apply({"params": lora_jax.merge(params, config)}, x),
                                model.apply({"params": params}, x), atol=1e-5)


def test_rank_pattern_gives_per_layer_rank_and_scale():
    from lora_jax.models import MLP

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
