"""LoRA+: lora_B moves ``ratio`` times as fast as every other trainable leaf."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax


def test_sgd_updates_of_lora_b_are_ratio_times_the_rest():
    params = {"fc": {"lora_A": jnp.ones((3, 2)), "lora_B": jnp.ones((2, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
    grads = {"fc": {"lora_A": jnp.full((3, 2), 0.5), "lora_B": jnp.full((2, 4), 0.5)}, "head": {"kernel": jnp.full((4, 2), 0.5)}}
    tx = lora_jax.lora_plus(optax.sgd, 0.1, ratio=16)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["fc"]["lora_A"], -0.1 * 0.5)  # plain SGD: -lr * g
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 0.5)
    np.testing.assert_allclose(updates["fc"]["lora_B"], -16 * 0.1 * 0.5)


def test_a_schedule_is_scaled_at_every_step():
    params = {"fc": {"lora_A": jnp.ones(2), "lora_B": jnp.ones(2)}}
    grads = {"fc": {"lora_A": jnp.ones(2), "lora_B": jnp.ones(2)}}
    tx = lora_jax.lora_plus(optax.sgd, optax.linear_schedule(1.0, 0.0, 10), ratio=4)
    state = tx.init(params)
    for step in range(3):
        updates, state = tx.update(grads, state, params)
        lr = 1.0 - step / 10
        np.testing.assert_allclose(updates["fc"]["lora_A"], -lr, rtol=1e-6)
        np.testing.assert_allclose(updates["fc"]["lora_B"], -4 * lr, rtol=1e-6)


def test_ratio_must_be_positive():
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        lora_jax.lora_plus(optax.sgd, 0.1, ratio=0)
