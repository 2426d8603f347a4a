"""lora_jax.nn.Dropout: the fast dropout as a linen module, under nn.remat and nn.scan."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lora_jax


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        kept = lora_jax.nn.Dropout(0.5)(jnp.ones_like(h), deterministic=False) != 0
        return lora_jax.nn.Dropout(0.5)(nn.Dense(h.shape[-1])(h), deterministic=False), kept


class Stack(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, h):
        block = nn.remat(Block) if self.remat else Block
        return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       length=3)(name="layers")(h, None)


def test_linen_dropout_replays_under_remat_and_differs_per_scanned_layer():
    x = jnp.ones((4, 16))
    params = Stack(False).init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)["params"]
    loss = lambda p, remat: Stack(remat).apply({"params": p}, x, rngs={"dropout": jax.random.key(2)})[0].sum()
    plain, rematerialised = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
    jax.tree.map(np.testing.assert_array_equal, plain, rematerialised)  # the recomputed masks are the same masks
    _, kept = Stack(False).apply({"params": params}, x, rngs={"dropout": jax.random.key(2)})
    assert kept.shape == (3, 4, 16)
    assert not np.array_equal(kept[0], kept[1]) and not np.array_equal(kept[1], kept[2])  # one mask per layer
    np.testing.assert_array_equal(lora_jax.nn.Dropout(0.5).apply({}, x, deterministic=True), x)


def test_a_star_import_does_not_shadow_flax_linen():
    namespace = {"nn": nn}
    exec("from lora_jax import *", namespace)
    assert namespace["nn"] is nn and callable(namespace["lora"])
