"""Mixed precision: bf16 matmul inputs with float32 results, forward and backward, against a hand-written reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models.precision import mixed_dot_general


def _bf16(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def test_dense_matmul_rounds_inputs_to_bf16_and_returns_float32_with_bf16_gradients():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x, w, g = jax.random.normal(k1, (4, 5, 16)), jax.random.normal(k2, (16, 8)), jax.random.normal(k3, (4, 5, 8))
    dot = mixed_dot_general(jnp.bfloat16)
    dims = (((2,), (0,)), ((), ()))
    y, vjp = jax.vjp(lambda a, b: dot(a, b, dims), x, w)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, np.einsum("bti,io->bto", _bf16(x), _bf16(w)), rtol=1e-5, atol=1e-5)
    dx, dw = vjp(g)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    # hand-written transposes, each product of bf16-rounded operands accumulated in float32
    np.testing.assert_allclose(dx, np.einsum("bto,io->bti", _bf16(g), _bf16(w)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bti,bto->io", _bf16(x), _bf16(g)), rtol=1e-5, atol=1e-4)


def test_float32_compute_uses_flax_default_and_other_contractions_still_work():
    assert mixed_dot_general(jnp.float32) is None
    dot = mixed_dot_general(jnp.bfloat16)
    a, b = jnp.ones((3, 4)), jnp.ones((5, 4))
    out = dot(a, b, (((1,), (1,)), ((), ())))  # contracts rhs's last axis: not the Dense pattern
    assert out.dtype == jnp.float32 and out.shape == (3, 5) and float(out[0, 0]) == 4.0


@pytest.mark.slow
def test_bert_in_bfloat16_stays_close_to_float32_and_lora_factors_stay_float32():
    import lora_jax
    from lora_jax.models import BertConfig, BertForSequenceClassification

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=200,
                 num_labels=3)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 200)
    f32 = BertForSequenceClassification(BertConfig(**small))
    params = f32.init(jax.random.key(0), ids)["params"]
    bf16 = BertForSequenceClassification(BertConfig(dtype="bfloat16", **small))
    ref, low = f32.apply({"params": params}, ids), bf16.apply({"params": params}, ids)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(ref - low).max()) < 3e-2 * float(jnp.abs(ref).max()) + 1e-3
    config = lora_jax.LoraConfig(rank=4, targets=("query", "value"))
    lora_params = lora_jax.init_lora_params(lora_jax.lora(bf16, config), params, jax.random.key(2), ids)
    a = lora_params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["lora_A"]
    assert a.dtype == jnp.float32
