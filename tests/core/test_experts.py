"""core.experts: the grouped low-rank products against per-expert numpy formulas (float64)."""

import numpy as np
import jax.numpy as jnp
import pytest

from lora_jax.core.experts import parameter_shapes, parse_expert_einsum, ragged_low_rank

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


@pytest.mark.parametrize("in_axis", [-2, -1])
def test_shapes_follow_the_params_axis_order_and_its_input_axis(in_axis):
    shapes = parameter_shapes((4, 6, 5) if in_axis == -2 else (4, 5, 6), 2, in_axis)
    assert shapes.fan_in == 6 and shapes.n_out == 5
    assert (shapes.a, shapes.b) == (((4, 6, 2), (4, 2, 5)) if in_axis == -2 else ((4, 5, 2), (4, 2, 6)))
