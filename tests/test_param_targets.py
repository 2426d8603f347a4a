"""Parameter targets (LoRA on raw params, mixture-of-experts weights) against per-expert numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from tests.helpers import TinyMoe, route_top_k

X = jax.random.normal(jax.random.key(0), (10, 8))
CONFIG = LoraConfig(rank=2, alpha=4, targets=("router",), target_parameters=("w_in", "w_out"))


def _reference(params, x, scale=2.0):
    """The MoE block in float64 numpy, each token through its own experts' W + scale·A·B."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    w_in = p["w_in"] + scale * p["w_in_lora"]["lora_A"] @ p["w_in_lora"]["lora_B"]
    w_out = p["w_out"] + scale * p["w_out_lora"]["lora_A"] @ p["w_out_lora"]["lora_B"]
    router = p["router"]["kernel"] + scale * p["router"]["lora_A"] @ p["router"]["lora_B"]
    weights, chosen = (np.asarray(v, np.float64) for v in route_top_k(jnp.asarray(np.asarray(x) @ router), 2))
    out = np.zeros((x.shape[0], x.shape[1]))
    for t in range(x.shape[0]):
        for slot in range(2):
            e = int(chosen[t, slot])
            gate, up = np.split(np.asarray(x[t], np.float64) @ w_in[e], 2)
            out[t] += weights[t, slot] * ((gate / (1 + np.exp(-gate)) * up) @ w_out[e])
    return out


@pytest.fixture(scope="module")
def trained():
    base = TinyMoe().init(jax.random.key(1), X)["params"]
    model = lora_jax.lora(TinyMoe(), CONFIG)
    params = lora_jax.init_lora_params(model, base, jax.random.key(2), X)
    return base, model, params


def _moved(params, seed=3):
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    out = jax.tree.map(lambda v: v, params)
    for name in ("w_in_lora", "w_out_lora"):
        out[name] = {leaf: 0.3 * jax.random.normal(next(keys), v.shape) for leaf, v in out[name].items()}
    out["router"] = {**out["router"], "lora_B": 0.3 * jax.random.normal(next(keys), out["router"]["lora_B"].shape)}
    return out


def test_factors_sit_beside_each_param_per_expert_and_start_as_the_identity(trained):
    base, model, params = trained
    assert jax.tree.map(jnp.shape, params["w_in_lora"]) == {"lora_A": (4, 8, 2), "lora_B": (4, 2, 12)}
    assert jax.tree.map(jnp.shape, params["w_out_lora"]) == {"lora_A": (4, 6, 2), "lora_B": (4, 2, 8)}
    assert params["w_in"] is base["w_in"]
    np.testing.assert_array_equal(model.apply({"params": params}, X), TinyMoe().apply({"params": base}, X))
    mask = lora_jax.trainable_mask(params, CONFIG)
    assert not mask["w_in"] and mask["w_in_lora"]["lora_A"] and mask["w_in_lora"]["lora_B"]


@pytest.mark.parametrize("grouped", [False, True], ids=["read-as-weight", "grouped"])
def test_both_forward_paths_equal_the_per_expert_formula_and_merge_exactly(trained, grouped):
    base, _, params = trained
    params = _moved(params)
    model = lora_jax.lora(TinyMoe(grouped=grouped), CONFIG)
    out = jax.jit(lambda p: model.apply({"params": p}, X))(params)
    np.testing.assert_allclose(out, _reference(params, X), rtol=1e-4, atol=1e-5)
    merged = lora_jax.merge(params, CONFIG)
    assert "w_in_lora" not in merged
    np.testing.assert_allclose(TinyMoe().apply({"params": merged}, X), out, atol=1e-5)
    restored = lora_jax.unmerge(merged, params, CONFIG)
    np.testing.assert_allclose(restored["w_in"], base["w_in"], atol=1e-6)


def test_grouped_gradients_equal_the_read_as_weight_ones(trained):
    _, _, params = trained
    params = _moved(params)
    mask = lora_jax.trainable_mask(params, CONFIG)
    trainable, frozen = lora_jax.partition(params, mask)
    grads = []
    for grouped in (False, True):
        model = lora_jax.lora(TinyMoe(grouped=grouped), CONFIG)
        loss = lambda t: (model.apply({"params": lora_jax.combine(t, frozen)}, X) ** 2).sum()
        grads.append(jax.jit(jax.grad(loss))(trainable))
    jax.tree.map(lambda g0, g1: np.testing.assert_allclose(g0, g1, rtol=1e-4, atol=1e-5), *grads)
    assert float(jnp.abs(grads[0]["w_in_lora"]["lora_A"]).max()) > 0


def test_adapters_save_load_hotswap_bank_and_add_like_layer_adapters(trained, tmp_path):
    base, model, params = trained
    params = _moved(params)
    want = model.apply({"params": params}, X)
    lora_jax.save_adapter(tmp_path / "moe", params, CONFIG)
    adapter = lora_jax.load_adapter(tmp_path / "moe")
    assert set(adapter.params["w_in_lora"]) == {"lora_A", "lora_B"} and adapter.config.target_parameters == ("w_in", "w_out")
    np.testing.assert_allclose(model.apply({"params": lora_jax.apply_adapter(base, adapter)}, X), want, atol=1e-6)
    slots = CONFIG.replace(rank=4, alpha=4)  # a running model with more room: the adapter is padded and rescaled
    running = lora_jax.init_lora_params(lora_jax.lora(TinyMoe(), slots), base, jax.random.key(4), X)
    swapped = lora_jax.hotswap_adapter(running, adapter, slots)
    assert swapped["w_in_lora"]["lora_A"].shape == (4, 8, 4)
    np.testing.assert_allclose(lora_jax.lora(TinyMoe(), slots).apply({"params": swapped}, X), want, atol=1e-5)
    bank = lora_jax.make_bank(running, [adapter], slots)
    rows = lora_jax.bank_apply(lora_jax.lora(TinyMoe(), slots), running, bank, jnp.array([0, -1] * 5), X)
    np.testing.assert_allclose(rows[::2], want[::2], atol=1e-5)
    np.testing.assert_allclose(rows[1::2], TinyMoe().apply({"params": base}, X)[1::2], atol=1e-5)
    both = lora_jax.add_weighted_adapter([adapter, adapter], [0.5, 0.5], "cat", base_params=base)
    np.testing.assert_allclose(model.apply({"params": lora_jax.apply_adapter(base, both)}, X) if both.config.rank == 2
                               else lora_jax.lora(TinyMoe(), both.config).apply(
                                   {"params": lora_jax.apply_adapter(base, both)}, X), want, atol=1e-5)


def test_bad_targets_and_missing_factors_are_named(trained):
    base, _, params = trained
    with pytest.raises(ValueError, match=r"(?s)target_parameters \['w_typo'\] matched no param.*w_in  \(4, 8, 12\)"):
        lora_jax.init_lora_params(lora_jax.lora(TinyMoe(), CONFIG.replace(target_parameters=("w_typo",))), base,
                                  jax.random.key(0), X)
    with pytest.raises(ValueError, match="'w_in', 'w_out'.*hold no factors"):
        lora_jax.lora(TinyMoe(), CONFIG).apply({"params": {**base, "router": params["router"]}}, X)
    with pytest.raises(ValueError, match="plain LoRA only"):
        CONFIG.replace(use_dora=True)
    with pytest.raises(ValueError, match="parameter_in_axis"):
        CONFIG.replace(parameter_in_axis={"w_in": 0})


class _TorchLayoutExperts(__import__("flax").linen.Module):
    """Experts stored (E, out, in), as PyTorch stores them; the grouped path and the weight read."""

    @__import__("flax").linen.compact
    def __call__(self, x):
        w = self.param("w", jax.nn.initializers.normal(0.3), (3, 5, 8), unbox=False)
        sizes = jnp.array([4, 3, 3])
        read = jnp.swapaxes(w.unbox() if isinstance(w, lora_jax.AdaptedParam) else w, 1, 2)
        return lora_jax.ragged_dot(x, w, sizes, in_axis=-1), jax.lax.ragged_dot(x, read, sizes)


def test_a_param_laid_out_out_by_in_draws_its_input_side_factor_and_both_paths_agree():
    config = LoraConfig(rank=2, alpha=2, targets=(), target_parameters=("w",), parameter_in_axis={"w": -1})
    model = lora_jax.lora(_TorchLayoutExperts(), config)
    params = model.init(jax.random.key(0), X)["params"]
    assert float(jnp.abs(params["w_lora"]["lora_A"]).max()) == 0 < float(jnp.abs(params["w_lora"]["lora_B"]).max())
    params["w_lora"]["lora_A"] = jax.random.normal(jax.random.key(1), params["w_lora"]["lora_A"].shape)
    grouped, read = model.apply({"params": params}, X)
    np.testing.assert_allclose(grouped, read, rtol=1e-5, atol=1e-5)
    wrong = lora_jax.lora(_TorchLayoutExperts(), config.replace(parameter_in_axis={}))
    with pytest.raises(ValueError, match="parameter_in_axis"):
        wrong.apply({"params": params}, X)


def test_nf4_experts_are_quantized_per_expert_and_the_grouped_step_keeps_no_dequantized_stack():
    hidden, ffn, experts = 64, 128, 8
    x = jax.random.normal(jax.random.key(0), (16, hidden))
    config = LoraConfig(rank=4, alpha=8, targets=(), target_parameters=("w_in", "w_out"))
    base = TinyMoe(hidden=hidden, ffn=ffn, experts=experts).init(jax.random.key(1), x)["params"]
    params = lora_jax.init_lora_params(lora_jax.lora(TinyMoe(hidden=hidden, ffn=ffn, experts=experts), config), base,
                                       jax.random.key(2), x)
    params = {**params, "w_in_lora": {**params["w_in_lora"], "lora_B": 0.05 * jnp.ones((experts, 4, 2 * ffn))}}
    quantized = lora_jax.quantize(params, config, "nf4")
    assert isinstance(quantized["w_in"], lora_jax.QuantizedKernel) and "router" in quantized  # router: not a target
    # each expert's codes and scales are its own: int8 keeps one scale per output column, which over all
    # experts at once would differ from quantizing each expert alone
    int8 = lora_jax.quantize({"w": params["w_in"]}, LoraConfig(targets=(), target_parameters=("w",)), "int8")
    for e in (0, experts - 1):
        alone = lora_jax.quantize({"w": params["w_in"][e]}, LoraConfig(targets=(), target_parameters=("w",)), "int8")
        np.testing.assert_allclose(int8["w"].unbox()[e], alone["w"].unbox(), rtol=1e-6, atol=1e-7)
    dequantized = {**quantized, "w_in": quantized["w_in"].unbox(), "w_out": quantized["w_out"].unbox()}

    def step(grouped, tree):
        model = lora_jax.lora(TinyMoe(hidden=hidden, ffn=ffn, experts=experts, grouped=grouped), config)
        trainable, frozen = lora_jax.partition(tree, lora_jax.trainable_mask(tree, config))
        loss = lambda t, x, f: (model.apply({"params": lora_jax.combine(t, f)}, x) ** 2).mean()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (trainable, x, frozen)

    results, temps = {}, {}
    for name, grouped, tree in (("read nf4", False, quantized), ("grouped nf4", True, quantized),
                                ("grouped fp32", True, dequantized)):
        fn, args = step(grouped, tree)
        compiled = fn.lower(*args).compile()  # compiled once: run and measured
        results[name] = compiled(*args)
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
    for name in ("read nf4", "grouped nf4"):  # on the quantized base: the model on its dequantized weights
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), results[name],
                     results["grouped fp32"])
    stack = experts * hidden * 2 * ffn * 4  # one fp32 w_in stack
    assert temps["grouped nf4"] <= temps["grouped fp32"], temps
    assert temps["read nf4"] - temps["grouped nf4"] >= stack, (temps, stack)


class _ScannedExperts(__import__("flax").linen.Module):
    """Three layers under nn.scan, each a dense mixture 'td,edf->tf' over 4 experts of (6, 6)."""

    @__import__("flax").linen.compact
    def __call__(self, x):
        def block(module, h, _):
            w = module.param("w", jax.nn.initializers.normal(0.3), (4, 6, 6))
            return jnp.tanh(jnp.einsum("td,edf->tf", h, w)), None

        stack = __import__("flax").linen.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(self, x, None)[0]


def test_params_of_a_scanned_stack_get_factors_per_layer_and_expert():
    x = jax.random.normal(jax.random.key(0), (5, 6))
    config = LoraConfig(rank=2, alpha=2, targets=(), target_parameters=("w",))
    model = lora_jax.lora(_ScannedExperts(), config)
    params = model.init(jax.random.key(1), x)["params"]
    assert jax.tree.map(jnp.shape, params["w_lora"]) == {"lora_A": (3, 4, 6, 2), "lora_B": (3, 4, 2, 6)}
    params["w_lora"]["lora_B"] = 0.1 * jax.random.normal(jax.random.key(2), (3, 4, 2, 6))
    w = np.asarray(params["w"], np.float64) + np.asarray(params["w_lora"]["lora_A"], np.float64) @ np.asarray(
        params["w_lora"]["lora_B"])
    h = np.asarray(x, np.float64)
    for layer in range(3):
        h = np.tanh(np.einsum("td,edf->tf", h, w[layer]))
    np.testing.assert_allclose(model.apply({"params": params}, x), h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_ScannedExperts().apply({"params": lora_jax.merge(params, config)}, x), h, atol=1e-5)


def test_a_bank_over_the_grouped_path_names_jaxs_missing_batching_rule(trained):
    _, _, params = trained
    adapter = lora_jax.extract_adapter(params, CONFIG)
    bank = lora_jax.make_bank(params, [adapter], CONFIG)
    grouped = lora_jax.lora(TinyMoe(grouped=True), CONFIG)
    with pytest.raises(NotImplementedError, match="under jax.vmap.*read the experts as weights"):
        lora_jax.bank_apply(grouped, params, bank, jnp.array([0, -1] * 5), X)


@pytest.mark.parametrize("in_axis", [-2, -1])
def test_ragged_dot_on_a_box_adds_each_experts_own_update(in_axis):
    from lora_jax.core.experts import parameter_shapes
    from tests.core.test_experts import _f32, _per_expert

    sizes = np.array([3, 0, 4, 2])
    x = _f32(9, 6)
    w = _f32(4, 6, 5) if in_axis == -2 else _f32(4, 5, 6)
    shapes = parameter_shapes(w.shape, 2, in_axis)
    a, b = _f32(*shapes.a), _f32(*shapes.b)
    delta = 0.5 * np.einsum("epr,erq->epq", a.astype(np.float64), b)  # in w's own axis order
    w_in, delta_in = (w, delta) if in_axis == -2 else (w.transpose(0, 2, 1), delta.transpose(0, 2, 1))
    box = lora_jax.AdaptedParam.of(jnp.asarray(w), a, b, 0.5, in_axis)
    got = lora_jax.ragged_dot(jnp.asarray(x), box, jnp.asarray(sizes), in_axis=in_axis)
    np.testing.assert_allclose(got, _per_expert(x, w_in, sizes, delta_in), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, w_shape", [("ecd,edf->ecf", (3, 4, 5)), ("ecd,efd->ecf", (3, 5, 4)),
                                           ("tcd,edf->tecf", (3, 4, 5))])
def test_einsum_on_a_box_equals_the_einsum_with_the_dense_update(spec, w_shape):
    from tests.core.test_experts import _f32

    x, w = _f32(3, 7, 4), _f32(*w_shape)  # 'tcd': every expert sees every token
    a, b = _f32(3, w_shape[1], 2), _f32(3, 2, w_shape[2])
    dense = w + 2.0 * np.einsum("epr,erq->epq", a.astype(np.float64), b)
    box = lora_jax.AdaptedParam.of(jnp.asarray(w), a, b, 2.0)
    np.testing.assert_allclose(lora_jax.einsum(spec, x, box), np.einsum(spec, x.astype(np.float64), dense),
                               rtol=1e-5, atol=1e-4)
