"""core.variants: plain LoRA and DoRA outputs and merges against their definitions in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.core.variants import DORA, LORA, magnitude_shape, output_norm


@pytest.fixture
def layer():
    rng = np.random.RandomState(0)
    return {"w": rng.randn(5, 3), "d": 0.2 * rng.randn(5, 3), "x": rng.randn(4, 5), "bias": rng.randn(3)}


def test_plain_lora_adds_the_update_and_merges_by_addition(layer):
    w, d = jnp.asarray(layer["w"]), jnp.asarray(layer["d"])
    out = LORA.output(jnp.ones((4, 3)), jnp.full((4, 3), 2.0), leaves={}, weight=w, scaled_delta=None,
                      base_term=None, out_ndim=1)
    np.testing.assert_array_equal(out, np.full((4, 3), 3.0))
    np.testing.assert_allclose(LORA.merge(w, d, {}), layer["w"] + layer["d"], rtol=1e-6)
    np.testing.assert_allclose(LORA.unmerge(LORA.merge(w, d, {}), d, {}), layer["w"], rtol=1e-5, atol=1e-6)


def test_dora_output_and_merge_follow_the_definition(layer):
    w, d, x, bias = layer["w"], layer["d"], layer["x"], layer["bias"]
    m = np.linalg.norm(w, axis=0, keepdims=True) * np.array([[0.5, 1.0, 2.0]])
    gain = m / np.linalg.norm(w + d, axis=0, keepdims=True)
    expected = gain * (x @ (w + d)) + bias
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    out = DORA.output(f32(x @ w + bias), f32(x @ d), leaves={"lora_magnitude": f32(m)}, weight=f32(w),
                      scaled_delta=lambda: f32(d), base_term=lambda: f32(x @ w), out_ndim=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(DORA.merge(f32(w), f32(d), {"lora_magnitude": f32(m)}), gain * (w + d), rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be undone"):
        DORA.unmerge(f32(w), f32(d), {"lora_magnitude": f32(m)})


def test_dora_norm_is_a_constant_in_the_gradient(layer):
    """d out / d delta holds only the gain's direct path: the norm's dependence on ΔW is stopped."""
    w, x = jnp.asarray(layer["w"], jnp.float32), jnp.asarray(layer["x"], jnp.float32)
    m = {"lora_magnitude": jnp.ones((1, 3))}

    def f(d):
        return DORA.output(x @ w, x @ d, leaves=m, weight=w, scaled_delta=lambda: d, base_term=lambda: x @ w,
                           out_ndim=1).sum()

    d0 = jnp.zeros_like(w)
    gain = 1.0 / np.linalg.norm(layer["w"], axis=0, keepdims=True)
    np.testing.assert_allclose(jax.grad(f)(d0), np.broadcast_to(layer["x"].sum(0)[:, None], (5, 3)) * gain, rtol=1e-5)


def test_magnitude_layout_and_norm_axes():
    assert magnitude_shape((3, 3, 4, 8), 1) == (1, 1, 1, 8)
    assert magnitude_shape((6, 2, 4), 2) == (1, 2, 4)
    w = np.arange(24.0).reshape(2, 3, 4)  # stacked (L=2, in=3, out=4): norms per layer and output
    np.testing.assert_allclose(output_norm(jnp.asarray(w), (2, 1, 4)), np.linalg.norm(w, axis=1, keepdims=True),
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(1, 4\) does not fit a weight of shape \(2, 3, 4\)"):
        output_norm(jnp.asarray(w), (1, 4))


def test_dora_on_an_all_zero_column_stays_finite_and_zero_there(layer):
    w, x = layer["w"].copy(), layer["x"]
    w[:, 1] = 0.0  # a dead output unit: ||W + ΔW|| = 0 there at init
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    m = DORA.init_leaves(f32(w), jnp.zeros((5, 3)), out_ndim=1)
    out = DORA.output(f32(x @ w), jnp.zeros((4, 3)), leaves=m, weight=f32(w), scaled_delta=lambda: jnp.zeros((5, 3)),
                      base_term=lambda: f32(x @ w), out_ndim=1)
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-6)  # the base, column 1 = 0 (not NaN)
    merged = DORA.merge(f32(w), jnp.zeros((5, 3)), m)
    np.testing.assert_allclose(merged, w, rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda mag: DORA.output(f32(x @ w), jnp.zeros((4, 3)), leaves={"lora_magnitude": mag},
                                            weight=f32(w), scaled_delta=lambda: jnp.zeros((5, 3)),
                                            base_term=lambda: f32(x @ w), out_ndim=1).sum())(m["lora_magnitude"])
    assert np.isfinite(np.asarray(grad)).all()


def test_the_neutral_dora_magnitude_is_the_weights_column_norm(layer):
    w = jnp.asarray(layer["w"], jnp.float32)
    neutral = DORA.neutral_leaves(w, {"lora_magnitude": (1, 3)})["lora_magnitude"]
    np.testing.assert_allclose(neutral, np.linalg.norm(layer["w"], axis=0, keepdims=True), rtol=1e-6)
    assert LORA.neutral_leaves(w, {}) == {}
