"""Fast dropout: the quantised keep probability, the exact scale, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.core.dropout import dropout, keep_mask, keep_probability


def test_rate_0_1_keeps_230_of_256_and_scales_by_exactly_256_over_230():
    assert keep_probability(0.1) == 230 / 256  # round(256 * 0.9) = 230
    x = jnp.full((64, 1000), 3.0)
    y = np.asarray(dropout(x, 0.1, jax.random.key(0)))
    kept = y != 0
    assert np.all(y[kept] == np.float32(3.0) * np.float32(256 / 230))  # bit-exact scale
    n, p = kept.size, 230 / 256
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)  # binomial tolerance


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.9, 0.001])
def test_keep_fraction_and_expectation(rate):
    shape = (256, 1024)
    mask = np.asarray(keep_mask(jax.random.key(1), shape, rate))
    p = keep_probability(rate)
    assert abs(p - (1 - rate)) <= 1 / 512
    assert abs(mask.mean() - p) < 5 * np.sqrt(p * (1 - p) / mask.size)
    # E[dropout(x)] = x: the mean over many independent masks converges to x
    x = jnp.linspace(-2, 2, 1024)
    means = jnp.mean(jax.vmap(lambda k: dropout(x, rate, k))(jax.random.split(jax.random.key(2), 4000)), axis=0)
    sd = np.abs(np.asarray(x)) * np.sqrt((1 - p) / p / 4000)
    assert np.all(np.abs(np.asarray(means) - np.asarray(x)) <= 6 * sd + 1e-6)


def test_the_four_byte_lanes_of_a_word_are_independent():
    mask = np.asarray(keep_mask(jax.random.key(3), (4096, 256), 0.5)).reshape(-1, 4).astype(np.float64)
    lanes = mask.mean(axis=0)
    assert np.all(np.abs(lanes - 0.5) < 5 * np.sqrt(0.25 / mask.shape[0]))
    corr = np.corrcoef(mask.T)[np.triu_indices(4, 1)]
    assert np.all(np.abs(corr) < 5 / np.sqrt(mask.shape[0]))


def test_same_key_same_mask_identity_without_key_or_rate_and_odd_shapes():
    x = jax.random.normal(jax.random.key(0), (3, 5, 7))  # 105 elements: not a multiple of four
    a, b = dropout(x, 0.3, jax.random.key(9)), dropout(x, 0.3, jax.random.key(9))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, dropout(x, 0.3, jax.random.key(10)))
    assert dropout(x, 0.3, None) is x and dropout(x, 0.0, jax.random.key(9)) is x
    np.testing.assert_array_equal(jax.jit(dropout, static_argnums=1)(x, 0.3, jax.random.key(9)), a)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        dropout(x, 1.0, jax.random.key(0))
