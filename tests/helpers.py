"""Helpers shared by the tests: small models of every layer kind, random LoRA factors, the shared data path."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from experiments.moe import MoeBlock as TinyMoe, moe_apply, route_top_k  # noqa: F401  (the tests' MoE block)

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


def tiny_gpt(vocab: int = 64, dim: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    """A small GPT-style NNX decoder (pre-LN, causal attention, GELU MLP) whose logits reuse the token
    embedding (tied, through ``Embed.attend``)."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1, self.ln2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
            self.query, self.key, self.value = (nnx.Linear(dim, dim, rngs=rngs) for _ in range(3))
            self.out = nnx.Linear(dim, dim, rngs=rngs)
            self.up, self.down = nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.Linear(4 * dim, dim, rngs=rngs)

        def __call__(self, h):
            b, t, _ = h.shape
            split = lambda y: y.reshape(b, t, heads, dim // heads).transpose(0, 2, 1, 3)
            x = self.ln1(h)
            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(dim // heads)
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
            att = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, -1), v).transpose(0, 2, 1, 3).reshape(b, t, dim)
            h = h + self.out(att)
            return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))

    class TinyGpt(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, dim, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
            self.ln_f = nnx.LayerNorm(dim, rngs=rngs)

        def __call__(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = block(h)
            return self.embed.attend(self.ln_f(h))

    return TinyGpt(nnx.Rngs(seed))


def served_mlp_and_adapters(x):
    """A LoRA MLP (10 -> 16 -> 12 -> 3) with rank-8 slots on fc1 and fc2 and a trainable head, and three
    adapters for its base with other ranks, alphas, rsLoRA, targets and heads: a list of
    (the adapter's own model, its params, the Adapter)."""
    import lora_jax
    from experiments.mlp import MLP

    slots = lora_jax.LoraConfig(rank=8, alpha=8, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    served = lora_jax.lora(MLP((16, 12, 3)), slots)
    params = served.init(jax.random.key(0), x)["params"]
    base = {k: {n: v for n, v in layer.items() if not n.startswith("lora_")} for k, layer in params.items()}
    configs = [lora_jax.LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), modules_to_save=("fc3",)),
               lora_jax.LoraConfig(rank=4, alpha=3, targets=("fc1", "fc2"), rslora=True, rank_pattern={"fc2": 1},
                                   modules_to_save=("fc3",)),
               lora_jax.LoraConfig(rank=8, alpha=16, targets=("fc2",), modules_to_save=("fc3",))]
    adapters = []
    for i, config in enumerate(configs):
        own = lora_jax.lora(MLP((16, 12, 3)), config)
        own_params = randomize_lora(lora_jax.init_lora_params(own, base, jax.random.key(i), x), seed=i, scale=0.5)
        own_params["fc3"]["kernel"] = own_params["fc3"]["kernel"] + 0.2 * (i + 1)
        adapters.append((own, own_params, lora_jax.extract_adapter(own_params, config)))
    return served, slots, params, adapters


def stacked_nnx_linears(features: int, layers: int = 3):
    """An NNX model of ``layers`` Linear layers made under ``nnx.vmap`` (kernel (layers, f, f)) and
    run under ``nnx.scan``: h -> tanh(layer(h)), layer by layer."""
    from flax import nnx

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(features, features, rngs=nnx.Rngs(key))

    class Stacked(nnx.Module):
        def __init__(self):
            self.layers = make(jax.random.split(jax.random.key(0), layers))

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(h, layer):
                return jnp.tanh(layer(h))

            return run(x, self.layers)

    return Stacked()


def mlp_lora_params(width=16, rank=2):
    """(model, config, LoRA params with random factors, x) of a LoRA MLP 10 -> width -> 8 -> 3 with
    r on fc1 and fc2 and a trained head fc3: the adapter and resume tests' model."""
    import lora_jax
    from experiments.mlp import MLP

    config = lora_jax.LoraConfig(rank=rank, alpha=4, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    model = lora_jax.lora(MLP((width, 8, 3)), config)
    x = jax.random.normal(jax.random.key(0), (64, 10))
    params = randomize_lora(model.init(jax.random.key(1), x)["params"])
    return model, config, params, x


class NnxTanhMlp(nnx.Module):
    """An NNX MLP n_in -> hidden -> n_out with a tanh between its two Linear layers (fc1, fc2)."""

    def __init__(self, n_in: int, hidden: int, n_out: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(n_in, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, n_out, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


class NnxTinyMoe(nnx.Module):
    """``TinyMoe`` in NNX: the same params (``router/kernel``, ``w_in``, ``w_out``)."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 8, ffn: int = 6, experts: int = 4, grouped: bool = False):
        self.router = nnx.Linear(hidden, experts, use_bias=False, rngs=rngs)
        self.w_in = nnx.Param(0.3 * jax.random.normal(rngs.params(), (experts, hidden, 2 * ffn)))
        self.w_out = nnx.Param(0.3 * jax.random.normal(rngs.params(), (experts, ffn, hidden)))
        self.experts, self.grouped = experts, grouped

    def __call__(self, x):
        import lora_jax

        weights, chosen = route_top_k(self.router(x), 2)
        if self.grouped:  # the boxes: updates through the rank
            w_in, w_out, dot = self.w_in.get_raw_value(), self.w_out.get_raw_value(), lora_jax.ragged_dot
        else:  # read as weights: W + scale·A·B
            w_in, w_out, dot = self.w_in[...], self.w_out[...], jax.lax.ragged_dot

        def experts(rows, sizes):
            gate, up = jnp.split(dot(rows, w_in, sizes), 2, axis=-1)
            return dot(jax.nn.silu(gate) * up, w_out, sizes)

        return moe_apply(x, weights, chosen, self.experts, experts)
