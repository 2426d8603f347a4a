"""Base fingerprints: equal for the same base (in any float dtype), different for other weights."""

import hashlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import BaseMismatchError, LoraConfig
from lora_jax.fingerprint import check_base_fingerprint
from experiments.mlp import MLP
from tests.helpers import randomize_lora


@pytest.fixture
def lora_params():
    config = LoraConfig(rank=2, targets=("fc1",), modules_to_save=("fc2",))
    params = lora_jax.lora(MLP((16, 3)), config).init(jax.random.key(0), jnp.ones((1, 10)))["params"]
    return config, params


def test_same_base_same_fingerprint_whatever_the_adapter_and_float_dtype(lora_params):
    config, params = lora_params
    mask = lora_jax.trainable_mask(params, config)
    fp = lora_jax.base_fingerprint(params, mask)
    assert fp.startswith("sampled-v1:")
    trained = randomize_lora(params, seed=4)
    trained["fc2"] = jax.tree.map(lambda x: x + 1.0, trained["fc2"])  # modules_to_save are the adapter's
    assert lora_jax.base_fingerprint(trained, mask) == fp
    as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert lora_jax.base_fingerprint(as_bf16, mask) == fp


def test_other_weights_of_the_same_shapes_change_the_fingerprint(lora_params):
    config, params = lora_params
    mask = lora_jax.trainable_mask(params, config)
    other = dict(params, fc1=dict(params["fc1"], kernel=params["fc1"]["kernel"] * 1.01))
    assert lora_jax.base_fingerprint(other, mask) != lora_jax.base_fingerprint(params, mask)
    one_bias = dict(params, fc1=dict(params["fc1"], bias=params["fc1"]["bias"].at[3].set(0.5)))
    assert lora_jax.base_fingerprint(one_bias, mask) != lora_jax.base_fingerprint(params, mask)


def test_check_raises_or_warns_on_another_base(lora_params):
    config, params = lora_params
    mask = lora_jax.trainable_mask(params, config)
    adapter = lora_jax.extract_adapter(params, config).params
    recorded = lora_jax.base_fingerprint(params, mask)
    _, base = lora_jax.partition(params, mask)
    check_base_fingerprint(base, adapter, recorded)  # the base it came from: silent
    other = jax.tree.map(lambda x: x + 0.1, base)
    with pytest.raises(BaseMismatchError, match="trained on a different base model.*strict=False"):
        check_base_fingerprint(other, adapter, recorded)
    with pytest.warns(UserWarning, match="trained on a different base model"):
        check_base_fingerprint(other, adapter, recorded, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_base_fingerprint(other, adapter, None)  # nothing recorded (an imported PEFT adapter): nothing to check


def test_fingerprints_of_earlier_versions_are_still_checked(lora_params):
    """Adapters written by lora_jax 0.1.0 carry a bare sha256 over every frozen leaf's bytes."""
    config, params = lora_params
    mask = lora_jax.trainable_mask(params, config)
    adapter = lora_jax.extract_adapter(params, config).params
    _, base = lora_jax.partition(params, mask)
    digest = hashlib.sha256()
    for key in (("fc1", "bias"), ("fc1", "kernel")):  # sorted frozen leaves, hashed as 0.1.0 did
        value = np.asarray(base[key[0]][key[1]])
        digest.update(f"{'/'.join(key)}:{value.shape}:{value.dtype};".encode())
        digest.update(value.tobytes())
    check_base_fingerprint(base, adapter, digest.hexdigest())
    with pytest.raises(BaseMismatchError):
        check_base_fingerprint(jax.tree.map(lambda x: -x, base), adapter, digest.hexdigest())


@pytest.mark.parametrize("recorded", [123, ["sampled-v1:00"], {"sha": 1}])
def test_a_recorded_fingerprint_that_is_not_a_string_is_named(lora_params, recorded):
    config, params = lora_params
    mask = lora_jax.trainable_mask(params, config)
    _, base = lora_jax.partition(params, mask)
    with pytest.raises(ValueError, match=r"records base_fingerprint .* a fingerprint is a string"):
        check_base_fingerprint(base, lora_jax.extract_adapter(params, config).params, recorded)
