"""PEFT target_parameters both ways, against peft on transformers' Qwen3-MoE and a Flax twin of it."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.peft_param_targets import from_peft, to_peft
from tests.helpers import moe_apply, route_top_k

try:
    import peft
    import torch
    import transformers
except ImportError:
    peft = torch = transformers = None
needs_torch = pytest.mark.skipif(torch is None, reason="parity with peft needs torch, transformers and peft")

SIZES = dict(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
             decoder_sparse_step=1, max_position_embeddings=64, norm_topk_prob=True)
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # the torch module's parameter order


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)).astype(x.dtype)


def _rotate(x, positions, theta=10000.0):
    half = x.shape[-1] // 2
    inv = 1.0 / theta ** (jnp.arange(0, x.shape[-1], 2, dtype=jnp.float32) / x.shape[-1])
    angles = positions[:, None] * inv[None]
    cos, sin = jnp.cos(jnp.concatenate([angles, angles], -1)), jnp.sin(jnp.concatenate([angles, angles], -1))
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        heads, kv, dim = SIZES["num_attention_heads"], SIZES["num_key_value_heads"], SIZES["head_dim"]
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
        q = RMSNorm(name="q_norm")(dense(heads * dim, "q_proj")(x).reshape(b, t, heads, dim))
        k = RMSNorm(name="k_norm")(dense(kv * dim, "k_proj")(x).reshape(b, t, kv, dim))
        v = dense(kv * dim, "v_proj")(x).reshape(b, t, kv, dim)
        pos = jnp.arange(t, dtype=jnp.float32)
        q, k = _rotate(q, pos), _rotate(k, pos)
        k, v = jnp.repeat(k, heads // kv, axis=2), jnp.repeat(v, heads // kv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * dim ** -0.5
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, heads * dim)
        return dense(x.shape[-1], "o_proj")(out)


class Experts(nn.Module):
    """Experts stored as transformers stores them, (E, out, in): parameter_in_axis -1."""

    grouped: bool = False

    @nn.compact
    def __call__(self, rows, sizes):
        e, d, f = SIZES["num_experts"], SIZES["hidden_size"], SIZES["moe_intermediate_size"]
        gate_up = self.param("gate_up_proj", nn.initializers.normal(0.1), (e, 2 * f, d), unbox=not self.grouped)
        down = self.param("down_proj", nn.initializers.normal(0.1), (e, d, f), unbox=not self.grouped)
        if self.grouped:  # through the rank: never an (E, out, in) update
            dot = lambda x, w: lora_jax.ragged_dot(x, w, sizes, in_axis=-1)
        else:  # the params read as weights (W + scale·A·B)
            dot = lambda x, w: jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), sizes)
        gate, up = jnp.split(dot(rows, gate_up), 2, axis=-1)
        return dot(jax.nn.silu(gate) * up, down)


class Qwen3MoeTwin(nn.Module):
    """transformers' Qwen3MoeForCausalLM (one layer) in Flax, with the same param paths."""

    grouped: bool = False

    @nn.compact
    def __call__(self, ids):
        hidden = _Model(grouped=self.grouped, name="model")(ids)
        return nn.Dense(SIZES["vocab_size"], use_bias=False, name="lm_head")(hidden)


class _SparseMoe(nn.Module):
    grouped: bool = False

    @nn.compact
    def __call__(self, h):
        flat = h.reshape(-1, h.shape[-1])
        weights, chosen = route_top_k(nn.Dense(SIZES["num_experts"], use_bias=False, name="gate")(flat),
                                      SIZES["num_experts_per_tok"])
        experts = Experts(grouped=self.grouped, name="experts")
        return moe_apply(flat, weights, chosen, SIZES["num_experts"], experts).reshape(h.shape)


class _Layer(nn.Module):
    grouped: bool = False

    @nn.compact
    def __call__(self, x):
        x = x + Attention(name="self_attn")(RMSNorm(name="input_layernorm")(x))
        return x + _SparseMoe(grouped=self.grouped, name="mlp")(RMSNorm(name="post_attention_layernorm")(x))


class _Layers(nn.Module):
    grouped: bool = False

    @nn.compact
    def __call__(self, x):
        return _Layer(grouped=self.grouped, name="0")(x)


class _Model(nn.Module):
    grouped: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(SIZES["vocab_size"], SIZES["hidden_size"], name="embed_tokens")(ids)
        x = _Layers(grouped=self.grouped, name="layers")(x)
        return RMSNorm(name="norm")(x)


def _flax_params(torch_model):
    """The torch model's weights in the twin's tree (Linear weights transposed, experts as they are)."""
    tree: dict = {}
    for name, value in torch_model.state_dict().items():
        parts, array = name.split("."), value.detach().numpy().copy()
        if parts[-1] == "weight" and array.ndim == 2 and "embed_tokens" not in parts:
            parts, array = parts[:-1] + ["kernel"], array.T
        elif parts[-1] == "weight" and array.ndim == 2:
            parts = parts[:-1] + ["embedding"]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = array
    return tree


def _torch_moe(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(**SIZES)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def _peft_model(attention: bool):
    return peft.get_peft_model(_torch_moe(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"] if attention else [], target_parameters=list(EXPERTS),
        init_lora_weights=False)).eval()  # random A and B: a non-zero update


def test_factors_round_trip_through_peft_layout_for_both_axis_orders():
    rng = np.random.default_rng(0)
    for in_axis, shape in ((-2, (3, 6, 5)), (-1, (3, 5, 6)), (-2, (6, 5))):
        a = rng.standard_normal(shape[:-1] + (2,))
        b = rng.standard_normal(shape[:-2] + (2, shape[-1]))
        t = to_peft(a, b, in_axis)
        back = from_peft(t["lora_A"], t["lora_B"], shape, in_axis)
        np.testing.assert_array_equal(back[0], a)
        np.testing.assert_array_equal(back[1], b)
        if len(shape) == 3:  # PEFT's delta: einsum("o r e, e r i -> e ...") of its reshaped factors
            n_in = shape[in_axis]
            a_p = t["lora_A"].reshape(3, 2, n_in)
            b_p = t["lora_B"].reshape(-1, 2, 3)
            delta = np.einsum("ore,eri->eio", b_p, a_p)  # (E, in, out)
            ours = a @ b if in_axis == -2 else np.swapaxes(a @ b, 1, 2)
            np.testing.assert_allclose(delta, ours, atol=1e-12)


@pytest.mark.parametrize("attention", [True, False], ids=["attention+experts", "experts"])
@needs_torch
def test_qwen3_moe_twin_matches_peft_both_ways(tmp_path, attention):
    ids = np.random.RandomState(0).randint(0, SIZES["vocab_size"], (2, 7))
    theirs_model = _peft_model(attention)
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(ids)).logits.numpy()
    theirs_model.save_pretrained(str(tmp_path / "peft"))
    base = _flax_params(_torch_moe())
    with torch.no_grad():  # the adapter moves the logits: the parity below is not the base's
        assert np.abs(_torch_moe()(torch.tensor(ids)).logits.numpy() - theirs).max() > 1e-3

    adapter = lora_jax.import_peft(tmp_path / "peft", base_params=base)
    layer = "model/layers/0/mlp/experts"
    assert adapter.config.target_parameters == (f"{layer}/gate_up_proj", f"{layer}/down_proj")
    assert dict(adapter.config.parameter_in_axis) == {f"{layer}/gate_up_proj": -1, f"{layer}/down_proj": -1}
    params = lora_jax.apply_adapter(base, adapter)
    for grouped in (False, True):
        ours = np.asarray(lora_jax.lora(Qwen3MoeTwin(grouped=grouped), adapter.config).apply({"params": params}, ids))
        print(f"PEFT -> ours ({'grouped' if grouped else 'read as weight'}): max |logit diff| = "
              f"{np.abs(ours - theirs).max():.2e}")
        np.testing.assert_allclose(ours, theirs, atol=1e-5)

    lora_jax.export_peft(tmp_path / "ours", params, adapter.config)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(written["target_parameters"]) == sorted(f"model.layers.0.{p}" for p in EXPERTS)
    reloaded = peft.PeftModel.from_pretrained(_torch_moe(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        again = reloaded(torch.tensor(ids)).logits.numpy()
    print(f"ours -> PEFT: max |logit diff| = {np.abs(again - theirs).max():.2e}")
    np.testing.assert_allclose(again, theirs, atol=1e-5)


@needs_torch
def test_an_adapter_trained_here_exports_in_the_torch_parameter_order(tmp_path):
    ids = np.random.RandomState(1).randint(0, SIZES["vocab_size"], (2, 5))
    base = _flax_params(_torch_moe())
    layer = "model/layers/0/mlp/experts"
    config = LoraConfig(rank=2, alpha=4, targets=("q_proj",), target_parameters=(f"{layer}/gate_up_proj",
                                                                                    f"{layer}/down_proj"),
                        parameter_in_axis={"experts/gate_up_proj": -1, "experts/down_proj": -1})
    model = lora_jax.lora(Qwen3MoeTwin(), config)
    params = lora_jax.init_lora_params(model, base, jax.random.key(0), ids)
    for name in ("gate_up_proj_lora", "down_proj_lora"):  # move A (zero at init for this layout) off zero
        node = params["model"]["layers"]["0"]["mlp"]["experts"][name]
        node["lora_A"] = 0.2 * jax.random.normal(jax.random.key(len(name)), node["lora_A"].shape)
    ours = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(ours - np.asarray(Qwen3MoeTwin().apply({"params": base}, ids))).max() > 1e-3
    lora_jax.export_peft(tmp_path / "trained", params, config)
    reloaded = peft.PeftModel.from_pretrained(_torch_moe(), str(tmp_path / "trained")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(ids)).logits.numpy(), ours, atol=1e-5)


def test_square_params_need_their_layout_and_stacked_params_have_no_peft_form(tmp_path):
    base = {"moe": {"w": np.ones((2, 4, 4), np.float32)}}
    a, b = np.ones((2, 4, 1), np.float32), np.ones((2, 1, 4), np.float32)
    lora = {"moe": {"w": base["moe"]["w"], "w_lora": {"lora_A": a, "lora_B": b}}}
    config = LoraConfig(rank=1, alpha=1, targets=(), target_parameters=("w",))
    lora_jax.export_peft(tmp_path / "square", lora, config)
    (tmp_path / "square" / "lora_jax_export.json").unlink()  # as PEFT's own files: no record of the layout
    with pytest.raises(ValueError, match=r"square.*parameter_in_axis"):
        lora_jax.import_peft(tmp_path / "square", base_params=base)
    again = lora_jax.import_peft(tmp_path / "square", base_params=base, parameter_in_axis={"moe/w": -2})
    np.testing.assert_array_equal(again.params["moe"]["w_lora"]["lora_A"], a)
    stacked = {"moe": {"w": np.ones((3, 2, 4, 5), np.float32), "w_lora": {"lora_A": np.ones((3, 2, 4, 1), np.float32),
                                                                        "lora_B": np.ones((3, 2, 1, 5), np.float32)}}}
    with pytest.raises(ValueError, match="parameter 'moe/w'.*no PEFT form"):
        lora_jax.export_peft(tmp_path / "stacked", stacked, config)
