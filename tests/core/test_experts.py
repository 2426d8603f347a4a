"""core.experts: the grouped low-rank products against per-expert numpy formulas (float64)."""

import numpy as np
import jax.numpy as jnp
import pytest

from lora_jax.core.experts import (adapted_einsum, adapted_ragged_dot, parameter_shapes, parse_expert_einsum,
                                   ragged_low_rank)

RNG = np.random.default_rng(0)


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _per_expert(x, w, sizes, delta):
    """Each row through its own expert's W + delta, rows grouped by expert in order."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for e, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
        out.append(x[lo:hi].astype(np.float64) @ (w[e] + delta[e]))
    return np.concatenate(out)


@pytest.mark.parametrize("in_axis", [-2, -1])
def test_ragged_dot_adds_each_experts_own_update(in_axis):
    sizes = np.array([3, 0, 4, 2])
    x = _f32(9, 6)
    w = _f32(4, 6, 5) if in_axis == -2 else _f32(4, 5, 6)
    shapes = parameter_shapes(w.shape, 2, in_axis)
    a, b = _f32(*shapes.a), _f32(*shapes.b)
    delta = 0.5 * np.einsum("epr,erq->epq", a.astype(np.float64), b)  # in w's own axis order
    w_in, delta_in = (w, delta) if in_axis == -2 else (w.transpose(0, 2, 1), delta.transpose(0, 2, 1))
    got = adapted_ragged_dot(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), a, b, 0.5, in_axis=in_axis)
    np.testing.assert_allclose(got, _per_expert(x, w_in, sizes, delta_in), rtol=1e-5, atol=1e-5)
    assert shapes.fan_in == 6 and shapes.n_out == 5


@pytest.mark.parametrize("spec, w_shape", [("ecd,edf->ecf", (3, 4, 5)), ("ecd,efd->ecf", (3, 5, 4)),
                                           ("tcd,edf->tecf", (3, 4, 5))])
def test_einsum_with_an_expert_axis_equals_the_einsum_with_the_dense_update(spec, w_shape):
    x, w = _f32(3, 7, 4), _f32(*w_shape)  # 'tcd': every expert sees every token
    a, b = _f32(3, w_shape[1], 2), _f32(3, 2, w_shape[2])
    dense = w + 2.0 * np.einsum("epr,erq->epq", a.astype(np.float64), b)
    np.testing.assert_allclose(adapted_einsum(spec, x, w, a, b, 2.0), np.einsum(spec, x.astype(np.float64), dense),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec", ["ecd,edf->ecfd", "cd,edf->cf", "...d,edf->...f", "ecd,dfe->ecf"])
def test_expert_einsums_without_an_input_and_output_axis_last_are_refused(spec):
    with pytest.raises(ValueError, match="expert einsum"):
        parse_expert_einsum(spec)


def test_shapes_need_two_axes_and_a_known_input_axis():
    with pytest.raises(ValueError, match="at least 2-D"):
        parameter_shapes((8,), 2)
    with pytest.raises(ValueError, match="in_axis"):
        parameter_shapes((2, 3, 4), 2, in_axis=0)


@pytest.mark.parametrize("method", ["ragged", "stacked"])
def test_both_grouped_methods_give_each_rows_own_update_and_zero_past_the_groups(method):
    sizes = np.array([2, 3, 0, 1])  # 6 of 8 rows belong to an expert; the last two to none
    x, a, b = _f32(8, 5), _f32(4, 5, 3), _f32(4, 3, 7)
    got = np.asarray(ragged_low_rank(jnp.asarray(x), a, b, jnp.asarray(sizes), 1.5, method=method))
    want = _per_expert(x[:6], np.zeros((4, 5, 7)), sizes, 1.5 * np.einsum("epr,erq->epq", a.astype(np.float64), b))
    np.testing.assert_allclose(got[:6], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[6:], 0.0)
