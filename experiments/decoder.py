"""A decoder-shaped language model whose weights dominate its training step (the benchmark's QLoRA case).

Pre-LayerNorm blocks of causal self-attention (``query``, ``key``, ``value``, ``out``) and a GELU
MLP (``up``, ``down``), a tied input/output embedding; at the default size (12 layers, hidden
2048) its kernels take 2,304 MiB in fp32, against about 150 MiB of saved activations at batch 2 × 64.

    >>> import jax, jax.numpy as jnp
    >>> model = Decoder(vocab=64, hidden=32, layers=2, heads=4)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> model.apply({"params": params}, jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 64)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

LINEAR_LAYERS = ("query", "key", "value", "out", "up", "down")


class Block(nn.Module):
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = nn.LayerNorm(name="attention_norm")(x)
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        q, k, v = (split(nn.Dense(d, use_bias=False, name=n)(h)) for n in ("query", "key", "value"))
        attention = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
        x = x + nn.Dense(d, use_bias=False, name="out")(attention)
        h = nn.LayerNorm(name="mlp_norm")(x)
        return x + nn.Dense(d, use_bias=False, name="down")(jax.nn.gelu(nn.Dense(4 * d, use_bias=False, name="up")(h)))


class Decoder(nn.Module):
    """ids (batch, seq) -> next-token logits (batch, seq, vocab)."""

    vocab: int = 8192
    hidden: int = 2048
    layers: int = 12
    heads: int = 16
    remat: bool = False

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        embed = nn.Embed(self.vocab, self.hidden, name="embed")
        x = embed(ids)
        block = nn.remat(Block) if self.remat else Block
        for i in range(self.layers):
            x = block(self.hidden, self.heads, name=f"block_{i}")(x)
        return embed.attend(nn.LayerNorm(name="final_norm")(x))


def next_token_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean cross-entropy of each position's prediction of the next id."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
