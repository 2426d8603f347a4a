"""core.plans: each kind's plan against hand-written numpy formulas (float64 references)."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from lora_jax.core.plans import LayerReading, compute_dtype, einsum_spec_of_call, plan_call

RNG = np.random.default_rng(0)


def _arr(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_dense_update_and_base_term_match_the_formula():
    w, x, a, b = _arr(6, 4), _arr(3, 6), _arr(6, 2), _arr(2, 4)
    plan = plan_call(LayerReading("dense", jnp.asarray(w)), 2, "fc")
    np.testing.assert_allclose(plan.update(x, a, b), x.astype(np.float64) @ a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plan.base_term(x), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    assert (plan.shapes.a, plan.shapes.b) == ((6, 2), (2, 4))


def test_dense_general_contracts_the_given_axes_negative_or_not():
    w, a, b = _arr(2, 3, 4, 5), _arr(6, 2), _arr(2, 20)
    x = _arr(7, 2, 3)
    for axis in ((-2, -1), (1, 2)):
        plan = plan_call(LayerReading("dense_general", jnp.asarray(w), axis=axis), 2, "attn")
        want = x.reshape(7, 6).astype(np.float64) @ a @ b
        np.testing.assert_allclose(plan.update(x, a, b), want.reshape(7, 4, 5), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(plan.base_term(x), np.einsum("nij,ijkl->nkl", x, w), rtol=1e-5, atol=1e-4)


def test_einsum_update_equals_the_einsum_with_the_dense_update():
    w = _arr(4, 2, 3)
    a, b = _arr(4, 1, 1, 2), _arr(1, 2, 3, 2)
    x = _arr(5, 4)
    plan = plan_call(LayerReading("einsum", jnp.asarray(w), einsum_spec="bd,dhk->bhk"), 2, "e")
    delta = np.einsum("dxyr,zhkr->dhk", a.astype(np.float64), b)
    np.testing.assert_allclose(plan.update(x, a, b), np.einsum("bd,dhk->bhk", x, delta), rtol=1e-5, atol=1e-5)
    assert plan.base_term is None


def test_embed_lookup_and_attend():
    table, a, b = _arr(10, 4), _arr(10, 2), _arr(2, 4)
    ids = np.array([0, 3, 9])
    lookup = plan_call(LayerReading("embed", jnp.asarray(table)), 2, "emb")
    np.testing.assert_allclose(lookup.update(ids, a, b), a[ids].astype(np.float64) @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lookup.base_term(ids), table[ids])
    assert not lookup.uses_dropout
    q = _arr(3, 4)
    attend = plan_call(LayerReading("embed", jnp.asarray(table)), 2, "emb", method="attend")
    np.testing.assert_allclose(attend.update(q, a, b), q.astype(np.float64) @ (a @ b).T, rtol=1e-5, atol=1e-5)


def test_conv_runs_the_layers_own_conv_for_a_and_a_matmul_for_b():
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))

    w, a, b, x = _arr(3, 2, 5), _arr(3, 2, 1), _arr(1, 1, 5), _arr(1, 6, 2)
    plan = plan_call(LayerReading("conv", jnp.asarray(w), conv=conv), 1, "c")
    np.testing.assert_allclose(plan.update(x, a, b), np.asarray(conv(x, a)) @ b.reshape(1, 5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plan.base_term(x), conv(x, w), rtol=1e-6)


def test_compute_dtype_is_the_layers_own_else_the_promotion():
    reading = LayerReading("dense", jnp.ones((2, 2), jnp.bfloat16))
    assert compute_dtype(reading, jnp.ones(2, jnp.float32)) == jnp.float32
    assert compute_dtype(LayerReading("dense", reading.weight, dtype=jnp.bfloat16), jnp.ones(2)) == jnp.bfloat16
    out = plan_call(reading, 1, "fc").update(jnp.ones((1, 2), jnp.bfloat16), jnp.ones((2, 1)), jnp.ones((1, 2)))
    assert out.dtype == jnp.float32  # the fp32 factors promote with a bf16 weight and input only where asked


def test_call_spec_overrides_the_layers():
    assert einsum_spec_of_call(("ab,bc->ac",), {}, "x,y->z") == "ab,bc->ac"


@pytest.mark.parametrize("reading, match", [
    (LayerReading("dense_general", jnp.ones((2, 3)), batch_axes=True), "batch axes"),
    (LayerReading("conv", jnp.ones((3, 2, 2)), conv=lambda x, k: x, grouped=True), "grouped or masked"),
    (LayerReading("einsum", jnp.ones((2, 3)), einsum_spec="...d,dk->...k"), "explicit"),
    (LayerReading("lstm", jnp.ones((2, 3))), "unknown layer kind"),
])
def test_unsupported_forms_name_the_layer(reading, match):
    with pytest.raises((NotImplementedError, ValueError), match=match) as err:
        plan_call(reading, 1, "blocks/0/mix")
    assert "blocks/0/mix" in str(err.value)
