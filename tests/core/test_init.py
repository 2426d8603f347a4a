"""core.init: lora_A's initialisers have the distributions PEFT uses."""

import jax
import numpy as np
import pytest

from lora_jax.core.init import a_initializer


def test_kaiming_uniform_bound_and_spread():
    a = np.asarray(a_initializer("kaiming_uniform", fan_in=64, rank=8)(jax.random.key(0), (64, 512)))
    assert np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.95 / 8
    np.testing.assert_allclose(a.std(), (1 / 8) / np.sqrt(3), rtol=0.03)  # U(-b, b) has std b / sqrt(3)


def test_gaussian_and_lookup_table_scales():
    g = np.asarray(a_initializer("gaussian", fan_in=64, rank=4)(jax.random.key(1), (256, 256)))
    np.testing.assert_allclose(g.std(), 1 / 4, rtol=0.03)
    e = np.asarray(a_initializer("kaiming_uniform", fan_in=64, rank=4, lookup_table=True)(jax.random.key(2), (256, 256)))
    np.testing.assert_allclose(e.std(), 1.0, rtol=0.03)
    with pytest.raises(ValueError, match="unknown lora_A init 'xavier'"):
        a_initializer("xavier", 4, 2)
