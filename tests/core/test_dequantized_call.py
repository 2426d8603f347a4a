"""dequantized_call: the product with a quantized weight and its input / bias gradients match the
hand-written formulas, and the backward pass keeps no dequantized kernel alive."""

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core.dequantized_call import dequantized_call, tie_to
from lora_jax.core.quant import dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4


def test_output_and_gradients_match_the_formulas():
    rng = np.random.default_rng(0)
    w, x, bias, g = (rng.normal(size=s).astype(np.float32) for s in ((16, 8), (5, 16), (8,), (5, 8)))
    q = quantize_nf4(w)
    kernel = np.asarray(dequantize_nf4(q))
    fn = lambda x, k, b: x @ k + b
    out, pullback = jax.vjp(lambda x, b: dequantized_call(fn, q, dequantize_nf4, x, b), x, bias)
    dx, dbias = pullback(g)
    np.testing.assert_allclose(out, x @ kernel + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g @ kernel.T, rtol=1e-5, atol=1e-5)  # d(xW + b)/dx = g W^T
    np.testing.assert_allclose(dbias, g.sum(0), rtol=1e-5, atol=1e-5)
    no_bias = jax.grad(lambda x: dequantized_call(lambda x, k, b: x @ k, q, dequantize_nf4, x).sum())(x)
    np.testing.assert_allclose(no_bias, np.ones((5, 8)) @ kernel.T, rtol=1e-5, atol=1e-5)


def test_tie_keeps_values_whatever_the_anchor():
    q = quantize_int8(np.arange(12, dtype=np.float32).reshape(3, 4))
    for anchor in (jnp.array([np.inf, 1.0]), jnp.array([np.nan]), jnp.zeros((0,)), jnp.array([3], jnp.int32)):
        np.testing.assert_array_equal(dequantize_int8(tie_to(q, anchor)), dequantize_int8(q))


def test_backward_keeps_no_dequantized_kernel_alive():
    # 8 layers of (256, 1024) kernels: 1 MiB each in float32. Plain autodiff of x @ dequantize(codes)
    # keeps every dequantized kernel for the backward pass; dequantized_call keeps only the codes.
    layers, d, f = 8, 256, 1024
    rng = np.random.default_rng(1)
    codes = [quantize_int8(rng.normal(size=(d, f) if i % 2 == 0 else (f, d)).astype(np.float32)) for i in range(layers)]
    kernel_bytes = d * f * 4

    def loss(a, codes, x):
        for i, q in enumerate(codes):
            x = jnp.tanh(dequantized_call(lambda x, k, b: x @ k, q, dequantize_int8, x) + (x @ a[i][0]) @ a[i][1])
        return (x ** 2).sum()

    a = [(jnp.zeros((d if i % 2 == 0 else f, 4)), jnp.zeros((4, f if i % 2 == 0 else d))) for i in range(layers)]
    x = jnp.ones((4, d))
    memory = jax.jit(jax.grad(loss)).lower(a, codes, x).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 3 * kernel_bytes, memory.temp_size_in_bytes / kernel_bytes


def test_a_weight_shared_by_vmapped_rows_is_dequantized_once():
    # an adapter bank runs the model under jax.vmap over rows, the base shared: one dequantized kernel
    # (16 MiB), not one per row
    q = quantize_int8(np.random.default_rng(2).normal(size=(1024, 4096)).astype(np.float32))
    rows = jax.vmap(lambda x: dequantized_call(lambda x, k, b: x @ k, q, dequantize_int8, x))
    x = jax.random.normal(jax.random.key(0), (16, 3, 1024))
    np.testing.assert_allclose(rows(x), x @ dequantize_int8(q), rtol=1e-4, atol=1e-3)
    memory = jax.jit(rows).lower(x).compile().memory_analysis()
    assert memory.temp_size_in_bytes <= 1024 * 4096 * 4 * 1.5, memory.temp_size_in_bytes / 2**20
