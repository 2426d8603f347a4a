"""masking: the trainable mask per LoRA config, and partition / combine of param trees."""

import chex
import jax
import jax.numpy as jnp
import pytest

import lora_jax
from lora_jax import LoraConfig
from experiments.mlp import MLP


def _params(config=None):
    config = config or LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    model = lora_jax.lora(MLP((16, 8, 3)), config)
    return config, model.init(jax.random.key(1), jnp.ones((4, 10)))["params"]


def test_mask_marks_lora_leaves_bias_mode_and_modules_to_save():
    config, params = _params()
    mask = lora_jax.trainable_mask(params, config)
    assert mask["fc1"] == {"kernel": False, "bias": False, "lora_A": True, "lora_B": True}
    assert mask["fc3"] == {"kernel": True, "bias": True}
    only = lora_jax.trainable_mask(params, config.replace(bias="lora_only", modules_to_save=()))
    assert only["fc1"]["bias"] and only["fc2"]["bias"] and not only["fc3"]["bias"]
    every = lora_jax.trainable_mask(params, config.replace(bias="all", modules_to_save=()))
    assert every["fc3"]["bias"] and not every["fc3"]["kernel"]


def test_modules_to_save_that_matches_nothing_is_an_error():
    config, params = _params()
    with pytest.raises(ValueError, match=r"modules_to_save pattern\(s\) \['classifier'\] match no module"):
        lora_jax.trainable_mask(params, config.replace(modules_to_save=("classifier",)))


def test_partition_combine_round_trip_and_disjointness():
    config, params = _params()
    trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    assert set(trainable["fc1"]) == {"lora_A", "lora_B"} and set(frozen["fc1"]) == {"kernel", "bias"}
    chex.assert_trees_all_equal(lora_jax.combine(trainable, frozen), params)
    with pytest.raises(ValueError, match="present in more than one tree"):
        lora_jax.combine(trainable, trainable)
    with pytest.raises(ValueError, match="mask does not match params"):
        lora_jax.partition(params, {"fc1": {"kernel": True}})


def test_dora_magnitudes_train_and_are_adapter_leaves():
    config = LoraConfig(rank=2, alpha=4, targets=("fc1",), use_dora=True)
    params = lora_jax.lora(MLP((16, 3)), config).init(jax.random.key(1), jnp.ones((4, 10)))["params"]
    assert lora_jax.trainable_mask(params, config)["fc1"] == {"kernel": False, "bias": False, "lora_A": True,
                                                              "lora_B": True, "lora_magnitude": True}
    assert set(lora_jax.lora_leaves(params)["fc1"]) == {"lora_A", "lora_B", "lora_magnitude"}
