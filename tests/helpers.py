"""Helpers shared by the tests: small models of every layer kind, random LoRA factors, the shared data path."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)


def randomize_lora(params, seed: int = 0, scale: float = 0.1):
    """Give every lora_A / lora_B leaf random values (B is zero at init, which hides bugs)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        scale * jax.random.normal(k, v.shape, v.dtype) if str(getattr(p[-1], "key", "")).startswith("lora_") else v
        for (p, v), k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


class TinyTransformerBlock(nn.Module):
    """A post-LN attention + MLP block with BERT-like names."""

    hidden: int = 16
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        b, t, h = x.shape
        split = lambda y: y.reshape(b, t, self.heads, h // self.heads)
        q = split(nn.Dense(h, name="query")(x))
        k = split(nn.Dense(h, name="key")(x))
        v = split(nn.Dense(h, name="value")(x))
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, h)
        x = nn.LayerNorm(name="ln1")(x + nn.Dense(h, name="attn_out")(o))
        m = nn.Dense(4 * h, name="intermediate")(x)
        return nn.LayerNorm(name="ln2")(x + nn.Dense(h, name="output")(nn.gelu(m)))


class AllKinds(nn.Module):
    """One layer of every supported kind, nested one level."""

    @nn.compact
    def __call__(self, ids, img):
        e = nn.Embed(20, 8, name="emb")(ids)                                    # (b, t, 8)
        g = nn.DenseGeneral((2, 4), axis=-1, name="dg_split")(e)                # (b, t, 2, 4)
        g = nn.DenseGeneral(6, axis=(-2, -1), name="dg_merge")(g)               # (b, t, 6)
        s = nn.Einsum((3, 6, 5), "btd,hdk->bthk", name="einsum")(g)             # (b, t, 3, 5)
        c = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", name="conv")(img)  # (b, 4, 4, 4)

        class Sub(nn.Module):
            @nn.compact
            def __call__(self, z):
                return nn.Dense(3, name="fc")(z)

        feats = jnp.concatenate([s.mean((1, 2)), c.mean((1, 2))], -1)
        return Sub(name="head")(feats)
