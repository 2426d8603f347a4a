"""A mixture-of-experts MLP block for the MoE benchmark, examples and tests: a router, top-k of E
SwiGLU experts whose weights are raw params ``w_in`` (E, d, 2f) and ``w_out`` (E, f, d), applied with
``ragged_dot`` over the tokens sorted by expert (Qwen3-MoE's routing: softmax, top-k, renormalised).

``grouped=True`` reads the params as boxes (``self.param(..., unbox=False)``) and applies them with
``lora_jax.ragged_dot``, so a LoRA parameter target's update goes through the rank; otherwise they
are read as weights (``W + scale·A·B`` under a LoRA model).

    >>> import jax, jax.numpy as jnp
    >>> block = MoeBlock(hidden=8, ffn=6, experts=4)
    >>> params = block.init(jax.random.key(0), jnp.ones((5, 8)))["params"]
    >>> block.apply({"params": params}, jnp.ones((5, 8))).shape
    (5, 8)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax


def route_top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(weights (tokens, k), experts (tokens, k)): softmax over experts, the k largest, renormalised."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, chosen = jax.lax.top_k(probs, k)
    return weights / weights.sum(-1, keepdims=True), chosen


def moe_apply(x: jax.Array, weights: jax.Array, chosen: jax.Array, n_experts: int, expert_fn) -> jax.Array:
    """Tokens x (T, d) repeated k times and sorted by expert, ``expert_fn(rows, group_sizes)`` on them,
    each result weighted by its router weight and summed back per token."""
    t, k = chosen.shape
    flat = chosen.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = jnp.repeat(x, k, axis=0)[order]
    sizes = jnp.bincount(flat, length=n_experts)
    out = jnp.zeros((t * k, x.shape[-1]), x.dtype).at[order].set(expert_fn(rows, sizes))
    return (out.reshape(t, k, -1) * weights[..., None].astype(x.dtype)).sum(1)


class MoeBlock(nn.Module):
    """A router and ``experts`` SwiGLU experts (top ``top_k``) on x (tokens, hidden); see the module docstring."""

    hidden: int = 8
    ffn: int = 6
    experts: int = 4
    top_k: int = 2
    grouped: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.3 if self.hidden < 64 else self.hidden ** -0.5)
        w_in = self.param("w_in", init, (self.experts, self.hidden, 2 * self.ffn), unbox=not self.grouped)
        w_out = self.param("w_out", init, (self.experts, self.ffn, self.hidden), unbox=not self.grouped)
        dot = lora_jax.ragged_dot if self.grouped else jax.lax.ragged_dot
        weights, chosen = route_top_k(nn.Dense(self.experts, use_bias=False, name="router")(x), self.top_k)

        def experts(rows: jax.Array, sizes: jax.Array) -> jax.Array:
            gate, up = jnp.split(dot(rows, w_in, sizes), 2, axis=-1)
            return dot(jax.nn.silu(gate) * up, w_out, sizes)

        return moe_apply(x, weights, chosen, self.experts, experts)
