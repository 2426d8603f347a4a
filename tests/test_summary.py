import jax
import jax.numpy as jnp

import lora_jax
from lora_jax import LoraConfig
from experiments.mlp import MLP


def test_print_trainable_parameters_and_table(capsys):
    config = LoraConfig(rank=4, alpha=8, targets=("fc1", "fc2", "fc3"))
    params = lora_jax.lora(MLP((128, 256, 10)), config).init(jax.random.key(0), jnp.ones((1, 784)))["params"]
    lora_jax.print_trainable_parameters(params, config)
    trainable = 4 * (784 + 128) + 4 * (128 + 256) + 4 * (256 + 10)
    total = 784 * 128 + 128 + 128 * 256 + 256 + 256 * 10 + 10 + trainable
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    table = lora_jax.trainable_summary(params, config, per_layer=True).splitlines()
    assert table[0].split() == ["module", "trainable", "total"]
    assert table[2].split() == ["fc1", f"{4 * (784 + 128):,}", f"{784 * 128 + 128 + 4 * (784 + 128):,}"]
