"""quantize: a LoRA model on an int8 / NF4 base runs as on the dequantized kernels, trains only the
adapter, merges to plain arrays, and takes about an eighth of the bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from experiments.mlp import MLP
from lora_jax import LoraConfig
from lora_jax.core import quant
from tests.helpers import randomize_lora, stacked_nnx_linears


def _setup():
    config = LoraConfig(rank=4, alpha=8, targets=("fc1", "fc2"), modules_to_save=("fc3",))
    model = lora_jax.lora(MLP((256, 128, 3)), config)
    x = jax.random.normal(jax.random.key(0), (16, 64))
    return config, model, randomize_lora(model.init(jax.random.key(1), x)["params"], scale=0.2), x


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_base_runs_as_its_dequantized_kernels_and_trains_only_the_adapter(fmt):
    config, model, params, x = _setup()
    small = lora_jax.quantize(params, config, fmt)
    box = small["fc1"]["kernel"]
    assert isinstance(box, lora_jax.QuantizedKernel) and box.shape == (64, 256)
    assert not isinstance(small["fc3"]["kernel"], lora_jax.QuantizedKernel)  # not a target: stays as it was
    dense = {**small, "fc1": {**small["fc1"], "kernel": box.unbox()}, "fc2": {**small["fc2"], "kernel": small["fc2"]["kernel"].unbox()}}
    np.testing.assert_array_equal(model.apply({"params": small}, x), model.apply({"params": dense}, x))
    error = float(jnp.abs(box.unbox() - params["fc1"]["kernel"]).max() / jnp.abs(params["fc1"]["kernel"]).max())
    assert error < (0.01 if fmt == "int8" else 0.16)

    mask = lora_jax.trainable_mask(small, config)
    tx = optax.adam(1e-2)
    loss_fn = lambda p, b, r: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, b), jnp.arange(16) % 3).mean()
    state = lora_jax.TrainState.create(small, mask, tx, jax.random.key(2))
    assert isinstance(state.frozen["fc1"]["kernel"], lora_jax.QuantizedKernel)  # stays small in the state
    step = lora_jax.make_train_step(loss_fn, tx, mask)
    for _ in range(3):
        state, metrics = step(state, x)
    jax.tree.map(np.testing.assert_array_equal, state.frozen["fc1"]["kernel"], box)
    assert float(jnp.abs(state.trainable["fc1"]["lora_B"] - params["fc1"]["lora_B"]).max()) > 0

    merged = lora_jax.merge(state.params, config)  # adapted kernels come back dequantized and merged
    p = state.params["fc1"]
    np.testing.assert_allclose(merged["fc1"]["kernel"], box.unbox() + 2.0 * p["lora_A"] @ p["lora_B"], atol=1e-5)
    np.testing.assert_allclose(MLP((256, 128, 3)).apply({"params": merged}, x), model.apply({"params": state.params}, x),
                               atol=1e-4)


def test_nf4_bytes_and_layer_selection():
    config, _, params, _ = _setup()
    fp32 = params["fc1"]["kernel"].nbytes + params["fc2"]["kernel"].nbytes
    small = lora_jax.quantize(params, config, "nf4")
    nf4 = small["fc1"]["kernel"].nbytes + small["fc2"]["kernel"].nbytes
    assert nf4 <= 0.16 * fp32, nf4 / fp32
    every = lora_jax.quantize(params, config, "int8", layers="all")
    assert not isinstance(every["fc3"]["kernel"], lora_jax.QuantizedKernel)  # modules_to_save train: never quantized
    assert isinstance(every["fc1"]["kernel"], lora_jax.QuantizedKernel)
    with pytest.raises(ValueError, match="format must be 'int8' or 'nf4'"):
        lora_jax.quantize(params, config, "int4")
    with pytest.raises(ValueError, match="no kernel matched"):
        lora_jax.quantize(params, config.replace(targets=("nothing",)), "int8")


def test_nnx_model_quantized_in_place_trains_only_the_adapter_and_merges_to_plain_params():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(64, 32, rngs=rngs), nnx.Linear(32, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    config = LoraConfig(rank=4, alpha=8, targets=("fc1",), modules_to_save=("fc2",))
    model = lora_jax.lora(Net(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
    model.fc1.lora_B[...] = 0.2 * jax.random.normal(jax.random.key(2), (4, 32))
    kernel = np.asarray(model.fc1.kernel[...])
    codes = quant.quantize_nf4(kernel)
    assert lora_jax.quantize(model, config, "nf4") is model
    assert isinstance(model.fc1.kernel, lora_jax.QuantizedParam) and type(model.fc2.kernel) is nnx.Param
    assert not isinstance(model.fc1.kernel, nnx.Param)  # frozen: full fine-tuning over nnx.Param leaves it alone
    x = np.asarray(jax.random.normal(jax.random.key(3), (8, 64)))

    def by_hand(w1):  # numpy: the dequantized kernel, the adapter at scale alpha / r = 2
        a, b = np.asarray(model.fc1.lora_A[...]), np.asarray(model.fc1.lora_B[...])
        h = np.maximum(x @ w1 + np.asarray(model.fc1.bias[...]) + 2.0 * (x @ a) @ b, 0)
        return h @ np.asarray(model.fc2.kernel[...]) + np.asarray(model.fc2.bias[...])

    dequantized = np.asarray(quant.dequantize_nf4(codes))
    np.testing.assert_allclose(model(x), by_hand(dequantized), atol=1e-4)
    assert isinstance(lora_jax.nnx_params(model)["fc1"]["kernel"], lora_jax.QuantizedKernel)  # not read out

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lora_jax.nnx_trainable(model, config))
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), jnp.arange(8) % 3).mean()
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, lora_jax.nnx_trainable(model, config)))(model)
    optimizer.update(model, grads)
    jax.tree.map(np.testing.assert_array_equal, model.fc1.kernel.get_raw_value().weight, codes)
    merged = lora_jax.merge(model, config)
    assert type(merged.fc1) is nnx.Linear and type(merged.fc1.kernel) is nnx.Param
    np.testing.assert_allclose(merged(x), model(x), atol=1e-4)


def test_stacked_layers_quantize_one_by_one_and_run_under_scan():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(16, name="fc")(h)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return blocks(name="blocks")(x, None)[0]

    config = LoraConfig(rank=2, targets=("fc",))
    model = lora_jax.lora(Net(), config)
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 16)))
    params = randomize_lora(model.init(jax.random.key(1), x)["params"], scale=0.3)
    p = {k: np.asarray(v) for k, v in params["blocks"]["fc"].items()}
    for fmt, quantize_one, dequantize_one in (("nf4", quant.quantize_nf4, quant.dequantize_nf4),
                                              ("int8", quant.quantize_int8, quant.dequantize_int8)):
        small = lora_jax.quantize(params, config, fmt, stacked=("blocks",))
        assert small["blocks"]["fc"]["kernel"].shape == (3, 16, 16)
        h = x
        for i in range(3):  # each layer quantized on its own, by hand
            w = np.asarray(dequantize_one(quantize_one(p["kernel"][i])))
            h = np.tanh(h @ w + p["bias"][i] + config.scale * (h @ p["lora_A"][i]) @ p["lora_B"][i])
        np.testing.assert_allclose(model.apply({"params": small}, x), h, atol=1e-5)
    with pytest.raises(ValueError, match="too few axes"):
        lora_jax.quantize({"fc": {"kernel": jnp.ones((4, 4))}}, config, "nf4", stacked=("fc",))

    stacked = stacked_nnx_linears(16)
    kernels, bias = np.asarray(stacked.layers.kernel[...]), np.asarray(stacked.layers.bias[...])
    lora_jax.quantize(stacked, config.replace(targets=("layers",)), "nf4")
    h = x
    for i in range(3):
        h = np.tanh(h @ np.asarray(quant.dequantize_nf4(quant.quantize_nf4(kernels[i])))
                    + bias[i])
    np.testing.assert_allclose(stacked(x), h, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_merge_requantized_reports_the_error_it_adds(fmt):
    config, model, params, x = _setup()
    small = lora_jax.quantize(params, config, fmt)
    merged, error = lora_jax.merge_requantized(small, config)
    box = merged["fc1"]["kernel"]
    assert isinstance(box, lora_jax.QuantizedKernel) and box.format == fmt and sorted(error) == ["fc1", "fc2"]
    p = small["fc1"]
    exact = np.asarray(p["kernel"].unbox()) + 2.0 * np.asarray(p["lora_A"]) @ np.asarray(p["lora_B"])
    again = np.asarray(box.unbox())
    np.testing.assert_allclose(error["fc1"]["relative"], np.linalg.norm(again - exact) / np.linalg.norm(exact), rtol=1e-4)
    np.testing.assert_allclose(error["fc1"]["max_abs"], np.abs(again - exact).max(), rtol=1e-4)
    assert 0 < error["fc1"]["relative"] < (0.01 if fmt == "int8" else 0.12)
    unboxed = jax.tree.map(lambda v: v.unbox() if isinstance(v, lora_jax.QuantizedKernel) else v, merged,
                           is_leaf=lambda v: isinstance(v, lora_jax.QuantizedKernel))
    plain = MLP((256, 128, 3))  # the untransformed model takes the boxes
    np.testing.assert_array_equal(plain.apply({"params": merged}, x), plain.apply({"params": unboxed}, x))
    with pytest.raises(ValueError, match="no quantized kernel"):
        lora_jax.merge_requantized(params, config)


class _EveryKind:
    """Dense, DenseGeneral (two output axes), Einsum and Conv layers, with and without bias, and a head."""

    @staticmethod
    def linen():
        import flax.linen as nn

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):  # x (batch, 6, 8)
                h = jnp.tanh(nn.Dense(16, name="dense")(x))
                h = jnp.tanh(nn.DenseGeneral((2, 8), name="general")(h)).reshape(*h.shape[:-1], 16)
                h = jnp.tanh(nn.Einsum((16, 12), "btd,df->btf", name="einsum")(h))
                h = jnp.tanh(nn.Conv(8, (3,), use_bias=False, name="conv")(h))
                return nn.Dense(3, name="head")(h.mean(1))

        return Net()


@pytest.mark.parametrize("fmt,use_dora", [("nf4", False), ("int8", False), ("nf4", True)])
def test_gradients_on_a_quantized_base_equal_those_on_its_dequantized_kernels(fmt, use_dora):
    targets = ("dense", "general", "conv") + (() if use_dora else ("einsum",))  # DoRA: not on Einsum
    config = LoraConfig(rank=2, alpha=4, targets=targets, modules_to_save=("head",), use_dora=use_dora)
    model = lora_jax.lora(_EveryKind.linen(), config)
    x = jax.random.normal(jax.random.key(0), (4, 6, 8))
    base = _EveryKind.linen().init(jax.random.key(1), x)["params"]
    # the base quantized first, the adapter (DoRA's magnitude from the dequantized kernel) added on it
    small = lora_jax.init_lora_params(model, lora_jax.quantize(base, config, fmt, layers="all"), jax.random.key(2), x)
    small = randomize_lora(small, scale=0.3)
    assert {k for k in small if isinstance(small[k]["kernel"], lora_jax.QuantizedKernel)} == \
        {"dense", "general", "einsum", "conv"}
    dense = jax.tree.map(lambda v: v.unbox() if isinstance(v, lora_jax.QuantizedKernel) else v, small,
                         is_leaf=lambda v: isinstance(v, lora_jax.QuantizedKernel))
    mask = lora_jax.trainable_mask(small, config)
    labels = jnp.arange(4) % 3

    @jax.jit
    def value_and_grad(trainable, frozen):
        loss = lambda t: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": lora_jax.combine(t, frozen)}, x), labels).mean()
        return jax.value_and_grad(loss)(trainable)

    grads = lambda tree: value_and_grad(*lora_jax.partition(tree, mask))

    (loss_q, grad_q), (loss_d, grad_d) = grads(small), grads(dense)
    np.testing.assert_allclose(loss_q, loss_d, rtol=1e-6)
    flat_q, flat_d = jax.tree.leaves(grad_q), jax.tree.leaves(grad_d)
    assert len(flat_q) == len(flat_d) > 8  # lora_A / lora_B (and magnitudes) of every layer, the head
    for gq, gd in zip(flat_q, flat_d):
        np.testing.assert_allclose(gq, gd, atol=1e-5, rtol=1e-5)


def test_nnx_layers_of_every_kind_dequantize_at_the_point_of_use_with_equal_gradients():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(8, 16, rngs=rngs)
            self.general = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
            self.conv = nnx.Conv(16, 8, (3,), use_bias=False, rngs=rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            h = jnp.tanh(self.dense(x))
            h = jnp.tanh(self.general(h)).reshape(*h.shape[:-1], 16)
            return self.head(jnp.tanh(self.conv(h)).mean(1))

    config = LoraConfig(rank=2, alpha=4, targets=("dense", "conv"), modules_to_save=("head",))
    x = jax.random.normal(jax.random.key(0), (4, 6, 8))
    model = lora_jax.lora(Net(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
    model.dense.lora_B[...] = 0.3 * jax.random.normal(jax.random.key(2), (2, 16))
    reference = nnx.clone(model)
    lora_jax.quantize(model, config, "nf4", layers="all")  # 'general' is not a target: its class changes
    assert type(model.general).__name__ == "QuantizedLinearGeneral" and isinstance(model.general, nnx.LinearGeneral)
    for name in ("dense", "general", "conv"):  # the reference holds the dequantized kernels as plain params
        getattr(reference, name).kernel[...] = getattr(model, name).kernel[...]
    wrt = lora_jax.nnx_trainable(model, config)
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), jnp.arange(4) % 3).mean()
    grad_q = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    grad_d = nnx.grad(loss, argnums=nnx.DiffState(0, lora_jax.nnx_trainable(reference, config)))(reference)
    flat_q, flat_d = jax.tree.leaves(grad_q), jax.tree.leaves(grad_d)
    assert len(flat_q) == len(flat_d) == 6
    for gq, gd in zip(flat_q, flat_d):
        np.testing.assert_allclose(gq, gd, atol=1e-5, rtol=1e-5)
    merged = lora_jax.merge(model, config)  # adapted layers back to the user's classes
    assert type(merged.dense) is nnx.Linear and type(merged.conv) is nnx.Conv
    np.testing.assert_allclose(merged(x), model(x), atol=1e-5)


def test_step_memory_holds_no_dequantized_kernel_per_layer():
    import flax.linen as nn

    class Net(nn.Module):  # weights dominate: 8 blocks of 256 -> 1024 -> 256, batch 2 x 8
        @nn.compact
        def __call__(self, x):
            for i in range(8):
                x = x + nn.Dense(256, name=f"down_{i}")(jax.nn.gelu(nn.Dense(1024, name=f"up_{i}")(x)))
            return nn.Dense(3, name="head")(x.mean(1))

    config = LoraConfig(rank=4, targets=("re:(up|down)_\\d+",), modules_to_save=("head",))
    model = lora_jax.lora(Net(), config)
    x = jnp.ones((2, 8, 256))
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.adamw(1e-3)
    loss_fn = lambda p, b, r: (model.apply({"params": p}, b) ** 2).mean()

    def step_bytes(tree):
        mask = lora_jax.trainable_mask(tree, config)
        state = lora_jax.TrainState.create(tree, mask, tx, jax.random.key(1))
        memory = lora_jax.make_train_step(loss_fn, tx, mask).lower(state, x).compile().memory_analysis()
        return memory.argument_size_in_bytes + memory.temp_size_in_bytes

    fp32, nf4 = step_bytes(params), step_bytes(lora_jax.quantize(params, config, "nf4", layers="all"))
    assert nf4 < 0.4 * fp32, nf4 / fp32  # the kernels are 16 MiB of fp32's ~17; NF4 keeps ~2 MiB of codes


def test_bad_kernels_and_orders_are_refused_with_the_layer_named():
    config, model, params, x = _setup()
    for bad in (np.nan, np.inf):
        kernel = np.array(params["fc1"]["kernel"])
        kernel[3, 5] = bad
        for fmt in ("int8", "nf4"):
            with pytest.raises(ValueError, match="kernel at 'fc1' holds NaN or inf"):
                lora_jax.quantize({**params, "fc1": {**params["fc1"], "kernel": kernel}}, config, fmt)
    for block in (0, 10**9, 2.5, True):
        with pytest.raises(ValueError, match="block must be an integer from 1 to 4096"):
            lora_jax.quantize(params, config, "nf4", block=block)
    small = lora_jax.quantize(params, config, "nf4")
    with pytest.raises(ValueError, match="already quantized"):
        lora_jax.quantize(small, config, "nf4")
    dora = LoraConfig(rank=4, alpha=8, targets=("fc1",), use_dora=True)
    dora_params = lora_jax.lora(MLP((256, 128, 3)), dora).init(jax.random.key(1), x)["params"]
    with pytest.raises(ValueError, match="'fc1' has \\['lora_magnitude'\\].*Quantize the base first"):
        lora_jax.quantize(dora_params, dora, "nf4")
    merged, _ = lora_jax.merge_requantized(small, config)
    with pytest.raises(ValueError, match="unmerge: the kernel at 'fc1' is quantized"):
        lora_jax.unmerge(merged, small, config)


def test_a_stack_without_stacked_is_named_and_outliers_are_reported():
    stack = {"blocks": {"fc": {"kernel": np.ones((3, 16, 8), np.float32), "bias": np.zeros((3, 8), np.float32)}}}
    config = LoraConfig(rank=2, targets=("fc",))
    with pytest.raises(ValueError, match=r"share a leading axis of 3.*stacked=\('blocks',\)"):
        lora_jax.quantize(stack, config, "nf4")
    assert isinstance(lora_jax.quantize(stack, config, "nf4", stacked=("blocks",))["blocks"]["fc"]["kernel"],
                      lora_jax.QuantizedKernel)
    general = {"fc": {"kernel": np.ones((16, 2, 8), np.float32), "bias": np.zeros((2, 8), np.float32)}}
    lora_jax.quantize(general, config, "nf4")  # a DenseGeneral's bias is its kernel's trailing axes: no stack

    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 256)).astype(np.float32)
    errors = {}
    lora_jax.quantize({"fc": {"kernel": w}}, config, "nf4", errors=errors)
    w_q = np.asarray(quant.dequantize_nf4(quant.quantize_nf4(w)))
    np.testing.assert_allclose(errors["fc"]["relative"], np.linalg.norm(w_q - w) / np.linalg.norm(w), rtol=1e-4)
    np.testing.assert_allclose(errors["fc"]["max_abs"], np.abs(w_q - w).max(), rtol=1e-4)
    assert errors["fc"]["relative_ordinary"] < 0.1  # a Gaussian kernel: well under the warning
    outlier = w.copy()
    outlier[5, 7] *= 1000.0  # sets the scale of its block and, through the double-quantized scales, of its group
    with pytest.warns(UserWarning, match=r"nf4 changes the ordinary weights \(within 6 rms\) of the kernel at 'fc' by"):
        lora_jax.quantize({"fc": {"kernel": outlier}}, config, "nf4", errors=errors)
    inliers = np.abs(outlier) < 100
    q = np.asarray(quant.dequantize_nf4(quant.quantize_nf4(outlier)))
    np.testing.assert_allclose(errors["fc"]["relative_ordinary"],
                               np.linalg.norm((q - outlier)[inliers]) / np.linalg.norm(outlier[inliers]), rtol=1e-3)
