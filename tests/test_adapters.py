"""Adapters as values: applying one onto a base checks what it is given."""

import jax
import jax.numpy as jnp
import pytest

import lora_jax
from lora_jax import LoraConfig
from experiments.mlp import MLP


def _params():
    config = LoraConfig(rank=2, targets=("fc1", "fc2"))
    params = lora_jax.lora(MLP((8, 3)), config).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    return config, params


def test_apply_adapter_names_wrong_argument_types():
    config, params = _params()
    _, base = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    with pytest.raises(TypeError, match="takes an Adapter .* got list"):
        lora_jax.apply_adapter(base, [1, 2])
    with pytest.raises(TypeError, match="base params as a nested dict, got str"):
        lora_jax.apply_adapter("base", lora_jax.extract_adapter(params, config))


def test_lora_leaves_outside_the_targets_are_named():
    config, params = _params()
    adapter = lora_jax.extract_adapter(params, config).params
    lora_jax.check_targets_cover(adapter, config)  # consistent: silent
    with pytest.raises(ValueError, match=r"does not target \(\['fc2'\]; targets \['fc1'\]"):
        lora_jax.check_targets_cover(adapter, config.replace(targets=("fc1",)))
    with pytest.raises(ValueError, match=r"does not target \(\['fc1'\]"):
        lora_jax.check_targets_cover(adapter, config.replace(exclude=("fc1",)))
