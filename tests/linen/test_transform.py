"""The module transform: params beside kernels, identity at init, every layer kind, targeting errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from experiments.mlp import MLP
from tests.helpers import AllKinds, TinyTransformerBlock, randomize_lora


def strip_lora(params):
    return jax.tree_util.tree_map(lambda x: x, lora_jax.partition(params, _lora_only_mask(params))[1])


def _lora_only_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key.startswith("lora_"), params)


def test_mlp_params_sit_beside_kernels_and_init_is_bit_identical():
    base = MLP((32, 16, 10))
    x = jax.random.normal(jax.random.key(0), (5, 784))
    model = lora_jax.lora(base, LoraConfig(rank=4, alpha=8, targets=("fc1", "fc2", "fc3")))
    params = model.init(jax.random.key(1), x)["params"]
    assert set(params["fc1"]) == {"kernel", "bias", "lora_A", "lora_B"}
    chex.assert_shape(params["fc1"]["lora_A"], (784, 4))
    chex.assert_shape(params["fc1"]["lora_B"], (4, 32))
    assert not np.any(np.asarray(params["fc2"]["lora_B"]))
    base_params = strip_lora(params)
    np.testing.assert_array_equal(model.apply({"params": params}, x), base.apply({"params": base_params}, x))
    np.testing.assert_array_equal(jax.jit(model.apply)({"params": params}, x),
                                  jax.jit(base.apply)({"params": base_params}, x))


def test_transformer_block_init_is_bit_identical():
    block = TinyTransformerBlock()
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    model = lora_jax.lora(block, LoraConfig(rank=2, alpha=4, targets=("query", "value", "output")))
    params = model.init(jax.random.key(1), x)["params"]
    assert {k for k in params if "lora_A" in params[k]} == {"query", "value", "output"}
    base_params = strip_lora(params)
    # Op by op, the LoRA model adds an exact zero to each targeted layer: bit-identical output.
    np.testing.assert_array_equal(model.apply({"params": params}, x), block.apply({"params": base_params}, x))
    # Under jit, XLA fuses the two (different) graphs differently (softmax, LayerNorm, gelu), and
    # even the base model's jitted output differs from its own op-by-op output by a few ulps.
    chex.assert_trees_all_close(jax.jit(model.apply)({"params": params}, x),
                                jax.jit(block.apply)({"params": base_params}, x), atol=1e-6, rtol=0)


def test_every_layer_kind_gets_lora_with_expected_shapes(all_kinds_inputs):
    config = LoraConfig(rank=2, alpha=4, targets=("emb", "dg_split", "dg_merge", "einsum", "conv", "fc"))
    params = lora_jax.lora(AllKinds(), config).init(jax.random.key(0), *all_kinds_inputs)["params"]
    shapes = {k: (params[k]["lora_A"].shape, params[k]["lora_B"].shape)
              for k in ("emb", "dg_split", "dg_merge", "einsum", "conv")}
    assert shapes == {
        "emb": ((20, 2), (2, 8)),
        "dg_split": ((8, 2), (2, 8)),
        "dg_merge": ((8, 2), (2, 6)),
        "einsum": ((1, 6, 1, 2), (3, 1, 5, 2)),   # kernel (h=3, d=6, k=5): d contracted, h/k out
        "conv": ((3, 3, 3, 2), (1, 1, 2, 4)),     # PEFT's form: kxk conv into r, then 1x1 conv
    }
    assert set(params["head"]["fc"]) == {"kernel", "bias", "lora_A", "lora_B"}


def test_every_layer_kind_matches_explicit_formula(all_kinds_inputs):
    """Each adapted layer computes base(x) + scale * x·A·B: check against the merged kernel."""
    config = LoraConfig(rank=2, alpha=6, targets=("emb", "dg_split", "dg_merge", "einsum", "conv", "fc"))
    model = lora_jax.lora(AllKinds(), config)
    params = randomize_lora(model.init(jax.random.key(0), *all_kinds_inputs)["params"])
    y = model.apply({"params": params}, *all_kinds_inputs)
    y_merged = AllKinds().apply({"params": lora_jax.merge(params, config)}, *all_kinds_inputs)
    chex.assert_trees_all_close(y, y_merged, atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(y - AllKinds().apply({"params": strip_lora(params)}, *all_kinds_inputs)).max()) > 1e-3


def test_dense_update_formula_by_hand():
    x = jax.random.normal(jax.random.key(0), (3, 6))
    config = LoraConfig(rank=2, alpha=3, targets=("fc1",))
    model = lora_jax.lora(MLP((4,)), config)
    p = randomize_lora(model.init(jax.random.key(1), x)["params"])["fc1"]
    expected = x @ p["kernel"] + p["bias"] + 1.5 * (x @ p["lora_A"]) @ p["lora_B"]
    chex.assert_trees_all_close(model.apply({"params": {"fc1": p}}, x), expected, atol=1e-6)


def test_unknown_target_lists_existing_layers():
    model = lora_jax.lora(MLP((8, 4)), LoraConfig(rank=2, targets=("fc1", "qurey")))
    with pytest.raises(ValueError, match=r"\['qurey'\] matched no layer") as err:
        model.init(jax.random.key(0), jnp.ones((1, 6)))
    assert "fc1  (dense)" in str(err.value) and "fc2  (dense)" in str(err.value)


def test_exclude_and_regex_targets():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    config = LoraConfig(rank=2, targets=("re:(query|key|value)",), exclude=("key",))
    params = lora_jax.lora(TinyTransformerBlock(), config).init(jax.random.key(1), x)["params"]
    assert {k for k in params if "lora_A" in params[k]} == {"query", "value"}
    everything_excluded = LoraConfig(rank=2, targets=("query",), exclude=("re:.*",))
    with pytest.raises(ValueError, match="excluded"):
        lora_jax.lora(TinyTransformerBlock(), everything_excluded).init(jax.random.key(1), x)


def test_rank_larger_than_layer_is_rejected():
    model = lora_jax.lora(MLP((3,)), LoraConfig(rank=4, targets=("fc1",)))
    with pytest.raises(ValueError, match=r"rank 4 exceeds min\(in, out\) = min\(6, 3\) at layer 'fc1'"):
        model.init(jax.random.key(0), jnp.ones((1, 6)))


def test_apply_without_lora_leaves_gives_clear_error():
    base = MLP((4,))
    x = jnp.ones((1, 6))
    base_params = base.init(jax.random.key(0), x)["params"]
    model = lora_jax.lora(base, LoraConfig(rank=2, targets=("fc1",)))
    with pytest.raises(ValueError, match="init_lora_params"):
        model.apply({"params": base_params}, x)


def test_shape_mismatch_in_lora_leaf_names_the_leaf():
    x = jnp.ones((1, 6))
    model = lora_jax.lora(MLP((4,)), LoraConfig(rank=2, targets=("fc1",)))
    params = model.init(jax.random.key(0), x)["params"]
    params["fc1"]["lora_A"] = jnp.zeros((6, 3))
    with pytest.raises(ValueError, match=r"lora_A at 'fc1' has shape \(6, 3\), but this layer needs \(6, 2\)"):
        model.apply({"params": params}, x)


def test_init_lora_params_keeps_base_leaves_untouched():
    base = MLP((8, 4))
    x = jnp.ones((2, 6))
    base_params = base.init(jax.random.key(0), x)["params"]
    model = lora_jax.lora(base, LoraConfig(rank=2, targets=("fc1", "fc2")))
    params = lora_jax.init_lora_params(model, base_params, jax.random.key(1), x)
    for layer in ("fc1", "fc2"):
        assert params[layer]["kernel"] is base_params[layer]["kernel"]
        assert params[layer]["bias"] is base_params[layer]["bias"]
        assert params[layer]["lora_A"].shape[-1] == 2
    assert "lora_A" not in base_params["fc1"]  # input tree not mutated
    np.testing.assert_array_equal(model.apply({"params": params}, x), base.apply({"params": base_params}, x))


def test_dropout_only_with_its_rng_stream():
    x = jax.random.normal(jax.random.key(0), (4, 6))
    config = LoraConfig(rank=2, targets=("fc1",), dropout=0.5)
    model = lora_jax.lora(MLP((4,)), config)
    params = randomize_lora(model.init(jax.random.key(1), x)["params"], scale=1.0)
    eval_a = model.apply({"params": params}, x)
    eval_b = model.apply({"params": params}, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply({"params": params}, x, rngs={"lora_dropout": jax.random.key(2)})
    train_b = model.apply({"params": params}, x, rngs={"lora_dropout": jax.random.key(3)})
    assert float(jnp.abs(train_a - eval_a).max()) > 1e-3
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3


class ScannedStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.Dense(h.shape[-1], name="mix")(nn.relu(h)), None

        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = stack(name="layers")(x, None)
        return nn.remat(nn.Dense)(5, name="head")(h)


def test_scan_and_remat_wrapped_layers():
    x = jax.random.normal(jax.random.key(0), (2, 6))
    config = LoraConfig(rank=2, alpha=4, targets=("mix", "head"))
    model = lora_jax.lora(ScannedStack(), config)
    params = model.init(jax.random.key(1), x)["params"]
    chex.assert_shape(params["layers"]["mix"]["lora_A"], (3, 6, 2))  # stacked per layer
    chex.assert_shape(params["layers"]["mix"]["lora_B"], (3, 2, 6))
    chex.assert_shape(params["head"]["lora_A"], (6, 2))
    # nn.scan compiles its body with XLA even outside jit: same few-ulp fusion effect as under jit.
    chex.assert_trees_all_close(model.apply({"params": params}, x),
                                ScannedStack().apply({"params": strip_lora(params)}, x), atol=1e-6, rtol=0)
    params = randomize_lora(params)
    y = model.apply({"params": params}, x)
    merged = lora_jax.merge(params, config)
    chex.assert_trees_all_close(ScannedStack().apply({"params": merged}, x), y, atol=1e-5)
    grads = jax.grad(lambda p: model.apply({"params": p}, x).sum())(params)
    assert np.all(np.abs(np.asarray(grads["layers"]["mix"]["lora_B"])).sum(axis=(1, 2)) > 0)  # every layer


def test_user_module_with_setup_and_shared_layer():
    class Tied(nn.Module):
        def setup(self):
            self.proj = nn.Dense(6)
            self.out = nn.Dense(2)

        def __call__(self, x):
            return self.out(self.proj(self.proj(x)))  # proj used twice

    x = jax.random.normal(jax.random.key(0), (3, 6))
    config = LoraConfig(rank=2, targets=("proj",))
    model = lora_jax.lora(Tied(), config)
    params = randomize_lora(model.init(jax.random.key(1), x)["params"])
    chex.assert_trees_all_close(model.apply({"params": params}, x),
                                Tied().apply({"params": lora_jax.merge(params, config)}, x), atol=1e-5)


def test_transform_rejects_non_modules():
    with pytest.raises(TypeError, match="flax.linen Module"):
        lora_jax.lora(lambda x: x, LoraConfig())


class TiedLM(nn.Module):
    """GPT-style tied embeddings: the same table embeds tokens and, through ``attend``, scores them."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(50, 16, name="wte")
        h = embed(ids)
        h = h + nn.Dense(16, name="mlp")(jnp.tanh(h))
        return embed.attend(h)


def test_tied_embedding_attend_gets_the_same_update_so_merge_is_exact():
    ids = jnp.arange(12).reshape(2, 6)
    config = LoraConfig(rank=4, alpha=8, targets=("wte",))
    model = lora_jax.lora(TiedLM(), config)
    params = randomize_lora(model.init(jax.random.key(0), ids)["params"], scale=0.3)
    p = params["wte"]
    h = jnp.take(p["embedding"] + 2.0 * p["lora_A"] @ p["lora_B"], ids, axis=0)  # hand-written: W' = E + s·A·B
    h = h + jnp.tanh(h) @ params["mlp"]["kernel"] + params["mlp"]["bias"]
    expected = h @ (p["embedding"] + 2.0 * p["lora_A"] @ p["lora_B"]).T
    out = model.apply({"params": params}, ids)
    chex.assert_trees_all_close(out, expected, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(TiedLM().apply({"params": lora_jax.merge(params, config)}, ids), out,
                                atol=2e-5, rtol=2e-5)


class ScannedDropoutStack(nn.Module):
    split_lora_dropout: bool

    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.Dense(h.shape[-1], name="mix")(h), None

        split = {"params": True, "lora_dropout": True} if self.split_lora_dropout else {"params": True}
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs=split, length=3)(name="layers")(x, None)
        return h


def test_lora_dropout_inside_scan_needs_its_stream_split_and_then_works():
    x = jax.random.normal(jax.random.key(0), (4, 6))
    config = LoraConfig(rank=2, targets=("mix",), dropout=0.5)
    unsplit = lora_jax.lora(ScannedDropoutStack(False), config)
    params = randomize_lora(unsplit.init(jax.random.key(1), x)["params"], scale=0.5)
    unsplit.apply({"params": params}, x)  # evaluation (no rng) is fine
    with pytest.raises(ValueError, match=r"layer 'layers/mix' cannot see it.*split_rngs.*'lora_dropout': True"):
        unsplit.apply({"params": params}, x, rngs={"lora_dropout": jax.random.key(2)})
    split = lora_jax.lora(ScannedDropoutStack(True), config)
    eval_out = split.apply({"params": params}, x)
    train_out = split.apply({"params": params}, x, rngs={"lora_dropout": jax.random.key(2)})
    assert float(jnp.abs(train_out - eval_out).max()) > 1e-3  # dropout is really on


def test_lora_factors_are_float32_on_a_bf16_base_unless_asked_otherwise():
    x = jax.random.normal(jax.random.key(0), (3, 6))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="fc")(x)

    params = lora_jax.lora(Net(), LoraConfig(rank=2, targets=("fc",))).init(jax.random.key(1), x)["params"]
    assert params["fc"]["kernel"].dtype == jnp.bfloat16
    assert params["fc"]["lora_A"].dtype == jnp.float32 and params["fc"]["lora_B"].dtype == jnp.float32
    half = lora_jax.lora(Net(), LoraConfig(rank=2, targets=("fc",), param_dtype="bfloat16"))
    assert half.init(jax.random.key(1), x)["params"]["fc"]["lora_A"].dtype == jnp.bfloat16


def test_a_method_using_only_some_layers_runs_with_the_adapter():
    """Targets are resolved when the adapter is created: `encode` touches fc1 only, fc2 is targeted too."""

    class EncodeDecode(nn.Module):
        def setup(self):
            self.fc1, self.fc2 = nn.Dense(4), nn.Dense(3)

        def encode(self, x):
            return self.fc1(x)

        def __call__(self, x):
            return self.fc2(nn.relu(self.encode(x)))

    x = jax.random.normal(jax.random.key(0), (2, 5))
    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"))
    model = lora_jax.lora(EncodeDecode(), config)
    params = randomize_lora(model.init(jax.random.key(1), x)["params"])
    encoded = model.apply({"params": params}, "encode", x, method=model.call_method)
    p = params["fc1"]
    np.testing.assert_allclose(encoded, x @ p["kernel"] + p["bias"] + 2.0 * x @ p["lora_A"] @ p["lora_B"], atol=1e-5)
    # with no adapter in the params at all, a target that matches nothing is still named
    bare = {"fc1": {k: v for k, v in params["fc1"].items() if not k.startswith("lora_")},
            "fc2": {k: v for k, v in params["fc2"].items() if not k.startswith("lora_")}}
    typo = lora_jax.lora(EncodeDecode(), LoraConfig(rank=2, targets=("fc9",)))
    with pytest.raises(ValueError, match=r"\['fc9'\] matched no layer"):
        typo.apply({"params": bare}, "encode", x, method=typo.call_method)
