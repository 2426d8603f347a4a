"""quantize: a LoRA model on an int8 / NF4 base runs as on the dequantized kernels, trains only the
adapter, merges to plain arrays, and takes about an eighth of the bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from experiments.mlp import MLP
from lora_jax import LoraConfig
from tests.helpers import randomize_lora


def _setup():
    config = LoraConfig(rank=4, alpha=8, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    model = lora_jax.lora(MLP((256, 128, 3)), config)
    x = jax.random.normal(jax.random.key(0), (16, 64))
    return config, model, randomize_lora(model.init(jax.random.key(1), x)["params"], scale=0.2), x


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_base_runs_as_its_dequantized_kernels_and_trains_only_the_adapter(fmt):
    config, model, params, x = _setup()
    small = lora_jax.quantize(params, config, fmt)
    box = small["fc1"]["kernel"]
    assert isinstance(box, lora_jax.QuantizedKernel) and box.shape == (64, 256)
    assert not isinstance(small["fc3"]["kernel"], lora_jax.QuantizedKernel)  # not a target: stays as it was
    dense = {**small, "fc1": {**small["fc1"], "kernel": box.unbox()}, "fc2": {**small["fc2"], "kernel": small["fc2"]["kernel"].unbox()}}
    np.testing.assert_array_equal(model.apply({"params": small}, x), model.apply({"params": dense}, x))
    error = float(jnp.abs(box.unbox() - params["fc1"]["kernel"]).max() / jnp.abs(params["fc1"]["kernel"]).max())
    assert error < (0.01 if fmt == "int8" else 0.16)

    mask = lora_jax.trainable_mask(small, config)
    tx = optax.adam(1e-2)
    loss_fn = lambda p, b, r: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, b), jnp.arange(16) % 3).mean()
    state = lora_jax.TrainState.create(small, mask, tx, jax.random.key(2))
    assert isinstance(state.frozen["fc1"]["kernel"], lora_jax.QuantizedKernel)  # stays small in the state
    step = lora_jax.make_train_step(loss_fn, tx, mask)
    for _ in range(3):
        state, metrics = step(state, x)
    jax.tree.map(np.testing.assert_array_equal, state.frozen["fc1"]["kernel"], box)
    assert float(jnp.abs(state.trainable["fc1"]["lora_B"] - params["fc1"]["lora_B"]).max()) > 0

    merged = lora_jax.merge(state.params, config)  # adapted kernels come back dequantized and merged
    p = state.params["fc1"]
    np.testing.assert_allclose(merged["fc1"]["kernel"], box.unbox() + 2.0 * p["lora_A"] @ p["lora_B"], atol=1e-5)
    np.testing.assert_allclose(MLP((256, 128, 3)).apply({"params": merged}, x), model.apply({"params": state.params}, x),
                               atol=1e-4)


def test_nf4_bytes_and_layer_selection():
    config, _, params, _ = _setup()
    fp32 = params["fc1"]["kernel"].nbytes + params["fc2"]["kernel"].nbytes
    small = lora_jax.quantize(params, config, "nf4")
    nf4 = small["fc1"]["kernel"].nbytes + small["fc2"]["kernel"].nbytes
    assert nf4 <= 0.16 * fp32, nf4 / fp32
    every = lora_jax.quantize(params, config, "int8", layers="all")
    assert not isinstance(every["fc3"]["kernel"], lora_jax.QuantizedKernel)  # modules_to_save train: never quantized
    assert isinstance(every["fc1"]["kernel"], lora_jax.QuantizedKernel)
    with pytest.raises(ValueError, match="format must be 'int8' or 'nf4'"):
        lora_jax.quantize(params, config, "int4")
    with pytest.raises(ValueError, match="no kernel matched"):
        lora_jax.quantize(params, config.replace(targets=("nothing",)), "int8")
