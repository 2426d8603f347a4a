"""boxes: sharding boxes unboxed, quantized kernels kept boxed, each placing its own leaves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.boxes import replicated_like, stays_boxed, unbox_but_stored


def test_sharding_boxes_are_unboxed_and_quantized_kernels_kept():
    config = lora_jax.LoraConfig(rank=1, targets=("fc",))
    kernel = jnp.linspace(-1, 1, 64).reshape(16, 4)
    quantized = lora_jax.quantize({"fc": {"kernel": kernel, "lora_A": jnp.zeros((16, 1)),
                                          "lora_B": jnp.zeros((1, 4))}}, config, "int8")
    tree = {"fc": quantized["fc"], "head": {"kernel": nn.Partitioned(jnp.ones((4, 2)), names=("model", None))}}
    out = unbox_but_stored(tree)
    assert stays_boxed(out["fc"]["kernel"]) and isinstance(out["head"]["kernel"], jax.Array)
    np.testing.assert_allclose(out["fc"]["kernel"].unbox(), kernel, atol=1.0 / 127)


def test_replicated_like_spans_the_same_devices():
    device = jax.devices()[0]
    replicated = replicated_like(jax.sharding.SingleDeviceSharding(device))
    assert replicated.device_set == {device} and replicated.is_fully_replicated
