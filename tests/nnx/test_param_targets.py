"""NNX parameter targets: raw nnx.Param experts adapted in place, both paths against the numpy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax
from tests.helpers import NnxTinyMoe
from tests.test_param_targets import CONFIG, X, _moved, _reference


@pytest.mark.parametrize("grouped", [False, True], ids=["read-as-weight", "grouped"])
def test_nnx_experts_adapt_in_place_train_and_merge(grouped):
    model = NnxTinyMoe(nnx.Rngs(0), grouped=grouped)
    before = model(X)
    lora_jax.lora(model, CONFIG, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(model(X), before)  # B = 0: the model is unchanged
    params = _moved(lora_jax.nnx_params(model))
    assert jax.tree.map(jnp.shape, params["w_in_lora"]) == {"lora_A": (4, 8, 2), "lora_B": (4, 2, 12)}
    lora_jax.load_nnx_params(model, params)
    np.testing.assert_allclose(model(X), _reference(params, X), rtol=1e-4, atol=1e-5)
    grad = nnx.jit(nnx.grad(lambda m: (m(X) ** 2).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam)))
    grads = grad(model).to_pure_dict()
    assert set(grads) == {"router", "w_in_lora", "w_out_lora"}  # only the factors: w_in, w_out stay frozen
    merged = lora_jax.merge(model, CONFIG)
    assert type(merged) is NnxTinyMoe and not hasattr(merged, "w_in_lora")
    np.testing.assert_allclose(merged(X), model(X), atol=1e-5)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora_jax.lora(model, CONFIG.replace(targets=()), rngs=nnx.Rngs(2))


def test_nnx_experts_quantize_per_expert_and_train_on_the_nf4_base():
    model = NnxTinyMoe(nnx.Rngs(0), grouped=True)
    lora_jax.quantize(model, CONFIG, "nf4")
    assert isinstance(model.w_in, lora_jax.QuantizedParam) and isinstance(model.router.kernel, lora_jax.QuantizedParam)
    dequantized = {"w_in": model.w_in[...], "w_out": model.w_out[...]}
    lora_jax.lora(model, CONFIG, rngs=nnx.Rngs(1))
    params = _moved(lora_jax.nnx_params(model))
    lora_jax.load_nnx_params(model, lora_jax.lora_leaves(params))
    reference = {**params, **dequantized, "router": {**params["router"], "kernel": model.router.kernel[...]}}
    np.testing.assert_allclose(model(X), _reference(reference, X), rtol=1e-4, atol=1e-5)
    assert isinstance(model.w_in.get_raw_value().value, lora_jax.QuantizedKernel)  # the view's box holds the codes


def test_nnx_experts_hotswap_in_place_and_serve_a_bank():
    model = NnxTinyMoe(nnx.Rngs(0))
    lora_jax.lora(model, CONFIG, rngs=nnx.Rngs(1))
    params = _moved(lora_jax.nnx_params(model))
    adapter = lora_jax.extract_adapter(params, CONFIG)
    lora_jax.hotswap_adapter(model, adapter, CONFIG)
    want = _reference(params, X)
    np.testing.assert_allclose(model(X), want, rtol=1e-4, atol=1e-5)
    bank = lora_jax.make_bank(model, [adapter], CONFIG)
    rows = np.asarray(lora_jax.bank_apply(model, None, bank, jnp.array([0, -1] * 5), X))
    np.testing.assert_allclose(rows[::2], want[::2], rtol=1e-4, atol=1e-5)
