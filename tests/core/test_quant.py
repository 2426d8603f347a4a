"""core.quant: the NF4 code table, int8 against numpy, error bounds, packing, double quantization."""

import jax.numpy as jnp
import numpy as np

from lora_jax.core import quant

# QLoRA paper, Appendix E (the NF4 data type), typed from the paper
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
             1.0]


def test_nf4_code_values_are_the_papers():
    np.testing.assert_array_equal(quant.NF4_CODE, np.array(PAPER_NF4, np.float32))


def test_int8_matches_a_numpy_reference():
    w = np.random.RandomState(0).randn(33, 7).astype(np.float32)
    scale = np.abs(w).max(axis=0, keepdims=True) / 127
    q = quant.quantize_int8(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(q.data), np.clip(np.round(w / scale), -127, 127).astype(np.int8))
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-7)
    assert np.abs(np.asarray(quant.dequantize_int8(q)) - w).max() <= scale.max() / 2 + 1e-7


def test_nf4_error_bound_packing_and_double_quantized_scales():
    rng = np.random.RandomState(1)
    w = (rng.randn(130, 50) * np.linspace(0.1, 3.0, 50)).astype(np.float32)  # 6,500 values: a partial last block
    q = quant.quantize_nf4(jnp.asarray(w))
    assert q.data.size == 3250 and q.scale_codes.shape == (102,)  # two codes a byte; one int8 scale a block
    back = np.asarray(quant.dequantize_nf4(q))
    blocks = np.pad(w.reshape(-1), (0, 102 * 64 - w.size)).reshape(-1, 64)
    absmax = np.repeat(np.abs(blocks).max(axis=1), 64)[: w.size].reshape(w.shape)
    widest_half_gap = np.max(np.diff(quant.NF4_CODE)) / 2
    # a code's own error plus the int8 error of the double-quantized absmax (at most half its step)
    scale_err = float(np.max(np.asarray(q.scale_scale))) / 2
    assert np.all(np.abs(back - w) <= absmax * widest_half_gap + scale_err + 1e-6)
    codes = np.random.RandomState(2).randint(0, 16, 77).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(quant.pack_nibbles(jnp.asarray(codes)), 77)), codes)
