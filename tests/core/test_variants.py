"""core.variants: plain LoRA and DoRA outputs and merges against their definitions in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.core.variants import DORA, LORA, PISSA, magnitude_shape, output_norm, variant_of


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
    m = DORA.init_leaves(f32(w), jnp.zeros((5, 1)), jnp.zeros((1, 3)), 1.0, out_ndim=1)
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


def test_pissa_starts_at_the_principal_part_subtracts_it_and_merges_to_its_update(layer):
    w, x = layer["w"], layer["x"]
    scale = 2.0
    a, b = PISSA.init_factors(jnp.asarray(w, jnp.float32), jnp.zeros((5, 2)), jnp.zeros((2, 3)), scale)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(scale * np.asarray(a, np.float64) @ np.asarray(b), (u[:, :2] * s[:2]) @ vh[:2],
                               atol=1e-5)
    leaves = PISSA.init_leaves(jnp.asarray(w), a, b, scale, out_ndim=1)
    low_rank = lambda a_, b_: jnp.asarray(x, jnp.float32) @ a_ @ b_
    base_out = jnp.asarray(x @ w, jnp.float32)
    at_init = PISSA.output(base_out, scale * low_rank(a, b), leaves=leaves, weight=w, scaled_delta=None,
                           base_term=None, low_rank=low_rank, out_ndim=1)
    np.testing.assert_allclose(at_init, x @ w, atol=1e-5)  # the model is unchanged at init
    a2, b2 = a + 0.1, b - 0.2  # trained factors: output = x (W - A0·B0·s + s·A·B)
    want = x @ (w - scale * np.asarray(a, np.float64) @ np.asarray(b) + scale * np.asarray(a2, np.float64) @ np.asarray(b2))
    out = PISSA.output(base_out, scale * low_rank(a2, b2), leaves=leaves, weight=w, scaled_delta=None,
                       base_term=None, low_rank=low_rank, out_ndim=1)
    np.testing.assert_allclose(out, want, atol=1e-4)
    merged = PISSA.merge(jnp.asarray(w, jnp.float32), scale * a2 @ b2, leaves)
    np.testing.assert_allclose(x @ np.asarray(merged, np.float64), want, atol=1e-4)
    np.testing.assert_allclose(PISSA.unmerge(merged, scale * a2 @ b2, leaves), w, atol=1e-5)
    a3, b3 = PISSA.as_plain_lora(a2, b2, leaves, scale)  # plain LoRA of twice the rank, same update
    assert a3.shape == (5, 4) and b3.shape == (4, 3)
    np.testing.assert_allclose(x @ (w + scale * np.asarray(a3, np.float64) @ np.asarray(b3)), want, atol=1e-4)
    none = PISSA.neutral_leaves(jnp.asarray(w), {"lora_A_init": (5, 2), "lora_B_init": (2, 3)})
    assert all(float(jnp.abs(v).max()) == 0 for v in none.values())


def test_one_variant_per_config():
    config = type("C", (), {"use_dora": True, "init": "pissa"})()
    with pytest.raises(ValueError, match="DoRA.*PiSSA.*choose one"):
        variant_of(config)
    assert variant_of(type("C", (), {"use_dora": False, "init": "pissa"})()) is PISSA
