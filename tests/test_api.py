"""api: each public verb takes a param tree or an NNX model; a model goes to the NNX front end once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax
from lora_jax import LoraConfig
from tests.helpers import NnxTanhMlp


def Mlp(rngs):
    return NnxTanhMlp(6, 8, 3, rngs)


def test_reading_verbs_see_the_models_params_and_changing_verbs_return_the_model():
    config = LoraConfig(rank=2, alpha=4, targets=("fc1",), modules_to_save=("fc2",))
    model = lora_jax.lora(Mlp(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
    model.fc1.lora_B[...] = jnp.ones_like(model.fc1.lora_B[...])
    params = lora_jax.nnx_params(model)
    assert lora_jax.trainable_mask(model, config) == lora_jax.trainable_mask(params, config)
    assert lora_jax.count_parameters(model, lora_jax.trainable_mask(params, config)) == (2 * 6 + 2 * 8 + 8 * 3 + 3,
                                                                                          6 * 8 + 8 + 8 * 3 + 3 + 28)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    merged = lora_jax.merge(model, config)  # a model: a merged copy, of the original classes
    assert type(merged.fc1) is nnx.Linear and type(model.fc1) is not nnx.Linear
    kernel = np.asarray(params["fc1"]["kernel"]) + 2.0 * np.asarray(params["fc1"]["lora_A"]) @ np.ones((2, 8))
    expected = np.tanh(np.asarray(x) @ kernel + np.asarray(params["fc1"]["bias"])) @ np.asarray(
        params["fc2"]["kernel"]) + np.asarray(params["fc2"]["bias"])
    np.testing.assert_allclose(merged(x), expected, rtol=1e-5, atol=1e-5)
    tree_merged = lora_jax.merge(params, config)  # a tree: a new tree
    assert "lora_A" not in tree_merged["fc1"] and "lora_A" in params["fc1"]
    with pytest.raises(TypeError, match="merge_requantized takes a linen param tree"):
        lora_jax.merge_requantized(model, config)


def test_a_verb_given_neither_a_tree_nor_a_model_names_itself():
    config = LoraConfig(rank=2, targets=("fc1",))
    for verb in (lora_jax.merge, lora_jax.trainable_mask, lora_jax.quantize, lora_jax.apply_adapter):
        with pytest.raises(TypeError, match=rf"{verb.__name__} takes a param tree \(a nested dict\) or a flax.nnx model, "
                                            r"got NoneType"):
            verb(None, config)
    import optax
    model = lora_jax.lora(Mlp(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
    with pytest.raises(TypeError, match=r"TrainState.create takes a param tree .* lora_jax.nnx_functional\(model\)"):
        lora_jax.TrainState.create(model, lora_jax.trainable_mask(model, config), optax.sgd(0.1), jax.random.key(0))
