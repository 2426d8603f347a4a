"""core.kinds: factor shapes per kind, einsum parsing, the weight update and the low-rank products,
each against numpy written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.core import kinds


def test_factor_shapes_per_kind():
    assert (kinds.dense_shapes((6, 4), 2).a, kinds.dense_shapes((6, 4), 2).b) == ((6, 2), (2, 4))
    dg = kinds.dense_general_shapes((2, 3, 4, 5), n_in_axes=2, rank=3)
    assert (dg.a, dg.b, dg.n_in, dg.n_out, dg.out_ndim) == ((6, 3), (3, 20), 6, 20, 2)
    conv = kinds.conv_shapes((3, 5, 4, 8), 2)
    assert (conv.a, conv.b, conv.fan_in) == ((3, 5, 4, 2), (1, 1, 2, 8), 60)
    axes = kinds.parse_einsum("b t d, h d k -> b t h k", "attn")
    assert (axes.in_axes, axes.out_axes) == ((1,), (0, 2))
    ein = kinds.einsum_shapes((3, 6, 5), axes, 2)
    assert (ein.a, ein.b, ein.n_in, ein.n_out) == ((1, 6, 1, 2), (3, 1, 5, 2), 6, 15)


@pytest.mark.parametrize("spec, message", [
    ("...d,dk->...k", "explicit 'x,kernel->out'"),
    ("bd,dk,kz->bz", "explicit 'x,kernel->out'"),
    ("bd,bk->bk", "both batch and weight axes"),
])
def test_einsum_forms_lora_cannot_adapt_name_the_layer(spec, message):
    with pytest.raises(NotImplementedError, match=f"(?s)'my/layer'.*|{message}") as err:
        kinds.parse_einsum(spec, "my/layer")
    assert message in str(err.value) and "my/layer" in str(err.value)


def test_rank_above_the_weights_rank_is_refused():
    kinds.check_rank(4, 4, 9, "fc")
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(in, out\) = min\(4, 9\) at layer 'fc'"):
        kinds.check_rank(5, 4, 9, "fc")


def test_delta_matmul_and_broadcast_layouts():
    rng = np.random.RandomState(0)
    a, b = rng.randn(6, 2), rng.randn(2, 20)
    np.testing.assert_allclose(kinds.delta(jnp.asarray(a), jnp.asarray(b), (2, 3, 4, 5)),
                               (a @ b).reshape(2, 3, 4, 5), rtol=1e-5, atol=1e-6)
    # einsum kernel (n, d, h) with d contracted: delta[n, d, h] = sum_r A[d, r] B[n, h, r]
    a, b = rng.randn(1, 4, 1, 2), rng.randn(3, 1, 5, 2)
    expected = np.einsum("dr,nhr->ndh", a[0, :, 0], b[:, 0])
    np.testing.assert_allclose(kinds.delta(jnp.asarray(a), jnp.asarray(b), (3, 4, 5)), expected, rtol=1e-5, atol=1e-6)
    # stacked (scan) layers: (L, in, r) @ (L, r, out)
    a, b = rng.randn(3, 4, 2), rng.randn(3, 2, 5)
    np.testing.assert_allclose(kinds.delta(jnp.asarray(a), jnp.asarray(b), (3, 4, 5)),
                               np.stack([a[i] @ b[i] for i in range(3)]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_low_rank_products_against_numpy(dtype):
    rng = np.random.RandomState(1)
    x, a, b = rng.randn(2, 3, 6), rng.randn(6, 2), rng.randn(2, 4)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    got = kinds.low_rank_matmul(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), dtype)
    assert got.dtype == jnp.float32  # bf16 products accumulate and return in float32
    np.testing.assert_allclose(got, x @ a @ b, rtol=tol, atol=tol * 10)
    # DenseGeneral contracting axes (1, 2) of x (5, 2, 3): flattened in C order
    x = rng.randn(5, 2, 3)
    got = kinds.low_rank_dense_general(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), (1, 2), (2, 2), dtype)
    np.testing.assert_allclose(got, (x.reshape(5, 6) @ a @ b).reshape(5, 2, 2), rtol=tol, atol=tol * 10)
    ids, table_a = np.array([[0, 3], [2, 2]]), rng.randn(5, 2)
    np.testing.assert_allclose(kinds.low_rank_embed(jnp.asarray(ids), jnp.asarray(table_a), jnp.asarray(b), dtype),
                               table_a[ids] @ b, rtol=tol, atol=tol * 10)
    q = rng.randn(3, 4)
    np.testing.assert_allclose(kinds.low_rank_attend(jnp.asarray(q), jnp.asarray(table_a), jnp.asarray(b), dtype),
                               q @ (table_a @ b).T, rtol=tol, atol=tol * 10)


def test_low_rank_einsum_equals_einsum_with_the_full_update():
    rng = np.random.RandomState(2)
    axes = kinds.parse_einsum("btd,hdk->bthk", "x")
    x, a, b = rng.randn(2, 3, 6), rng.randn(1, 6, 1, 2), rng.randn(4, 1, 5, 2)
    full = np.einsum("dr,hkr->hdk", a[0, :, 0], b[:, 0])
    got = kinds.low_rank_einsum(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), (4, 6, 5), axes, jnp.float32)
    np.testing.assert_allclose(got, np.einsum("btd,hdk->bthk", x, full), rtol=1e-5, atol=1e-5)


def test_low_rank_conv_is_a_conv_with_the_full_update():
    rng = np.random.RandomState(3)
    x, a, b = rng.randn(1, 7, 3), rng.randn(3, 3, 2), rng.randn(1, 2, 4)  # 1-D conv, width 3, 3 -> 4 channels
    conv = lambda inp, k: jax.lax.conv_general_dilated(inp, k, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    full = (a.reshape(-1, 2) @ b.reshape(2, 4)).reshape(3, 3, 4)
    expected = np.stack([np.einsum("wc,wco->o", x[0, i:i + 3], full) for i in range(5)])[None]
    got = kinds.low_rank_conv(jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), conv)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_factor_layout_reads_each_kinds_own_shapes():
    from lora_jax.core.kinds import BROADCAST, MATRIX, KIND, conv_shapes, dense_general_shapes, dense_shapes, einsum_shapes, factor_layout, parse_einsum
    ein = einsum_shapes((4, 2, 3), parse_einsum("bd,dhk->bhk", "e"), 2)
    assert factor_layout(ein.a, (4, 2, 3)) == BROADCAST == KIND["einsum"].layout
    assert factor_layout(dense_general_shapes((2, 3, 4, 5), 2, 2).a, (2, 3, 4, 5)) == MATRIX
    assert factor_layout(conv_shapes((3, 3, 4, 8), 2).a, (3, 3, 4, 8)) != BROADCAST
    assert factor_layout((7,) + dense_shapes((6, 4), 2).a, (7, 6, 4)) == MATRIX  # a scanned stack
