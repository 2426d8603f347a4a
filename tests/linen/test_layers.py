"""Every layer kind's adapted output against a hand-written formula in numpy (float64), in the
kind's own axes: ``y = base(x) + scale · x·ΔW`` with ΔW built from A and B by hand, never through
``merge``. Each kind runs with and without jit, in float32 and bfloat16 compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from tests.helpers import randomize_lora

ALPHA, RANK = 6.0, 2
SCALE = ALPHA / RANK


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _dense(p, x):
    return x @ _np(p["kernel"]) + _np(p["bias"]), x @ _np(p["lora_A"]) @ _np(p["lora_B"])


def _dense_general_split(p, x):  # DenseGeneral((2, 4), axis=-1): kernel (6, 2, 4)
    delta = (_np(p["lora_A"]) @ _np(p["lora_B"])).reshape(6, 2, 4)
    return np.einsum("bti,ijk->btjk", x, _np(p["kernel"])) + _np(p["bias"]), np.einsum("bti,ijk->btjk", x, delta)


def _dense_general_merge(p, x):  # DenseGeneral(5, axis=(-2, -1)): kernel (2, 4, 5)
    delta = (_np(p["lora_A"]) @ _np(p["lora_B"])).reshape(2, 4, 5)
    return np.einsum("btij,ijk->btk", x, _np(p["kernel"])) + _np(p["bias"]), np.einsum("btij,ijk->btk", x, delta)


def _einsum(p, x):  # Einsum((3, 6, 5), "btd,hdk->bthk"): A (1, 6, 1, r), B (3, 1, 5, r)
    delta = np.einsum("dr,hkr->hdk", _np(p["lora_A"])[0, :, 0], _np(p["lora_B"])[:, 0])
    base = np.einsum("btd,hdk->bthk", x, _np(p["kernel"])) + _np(p["bias"])
    return base, np.einsum("btd,hdk->bthk", x, delta)


def _conv_linear_map(x, kernel):  # 3x3, stride 2, SAME padding on 8x8 -> 4x4, by loops
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # SAME for 8, k3, s2: 0 before, 1 after
    out = np.zeros(x.shape[:1] + (4, 4, kernel.shape[-1]))
    for i in range(4):
        for j in range(4):
            patch = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
    return out


def _conv(p, x):
    delta = (_np(p["lora_A"]).reshape(-1, RANK) @ _np(p["lora_B"]).reshape(RANK, -1)).reshape(3, 3, 3, 4)
    return _conv_linear_map(x, _np(p["kernel"])) + _np(p["bias"]), _conv_linear_map(x, delta)


def _embed(p, ids):
    return _np(p["embedding"])[ids], _np(p["lora_A"])[ids] @ _np(p["lora_B"])


def _attend(p, q):
    delta = _np(p["lora_A"]) @ _np(p["lora_B"])
    return q @ _np(p["embedding"]).T, q @ delta.T


class _Attend(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q):
        return nn.Embed(20, 8, dtype=self.dtype, name="layer").attend(q)


def _layer(kind, dtype):
    return {
        "dense": lambda: nn.Dense(5, dtype=dtype, name="layer"),
        "dense_general_split": lambda: nn.DenseGeneral((2, 4), axis=-1, dtype=dtype, name="layer"),
        "dense_general_merge": lambda: nn.DenseGeneral(5, axis=(-2, -1), dtype=dtype, name="layer"),
        "einsum": lambda: nn.Einsum((3, 6, 5), "btd,hdk->bthk", dtype=dtype, name="layer"),
        "conv": lambda: nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", dtype=dtype, name="layer"),
        "embed": lambda: nn.Embed(20, 8, dtype=dtype, name="layer"),
    }[kind]


class _Wrap(nn.Module):
    kind: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _layer(self.kind, self.dtype)()(x)


CASES = {
    "dense": (_dense, lambda k: jax.random.normal(k, (2, 3, 6))),
    "dense_general_split": (_dense_general_split, lambda k: jax.random.normal(k, (2, 3, 6))),
    "dense_general_merge": (_dense_general_merge, lambda k: jax.random.normal(k, (2, 3, 2, 4))),
    "einsum": (_einsum, lambda k: jax.random.normal(k, (2, 4, 6))),
    "conv": (_conv, lambda k: jax.random.normal(k, (2, 8, 8, 3))),
    "embed": (_embed, lambda k: jax.random.randint(k, (2, 6), 0, 20)),
    "attend": (_attend, lambda k: jax.random.normal(k, (2, 8))),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_adapted_layer_equals_hand_formula(kind, jit, dtype):
    formula, make_input = CASES[kind]
    x = make_input(jax.random.key(0))
    base = _Attend(dtype) if kind == "attend" else _Wrap(kind, dtype)
    model = lora_jax.lora(base, LoraConfig(rank=RANK, alpha=ALPHA, targets=("layer",)))
    params = randomize_lora(model.init(jax.random.key(1), x)["params"], scale=0.3)
    apply = jax.jit(model.apply) if jit else model.apply
    y = np.asarray(apply({"params": params}, x), np.float64)
    x64 = np.asarray(x) if x.dtype.kind == "i" else _np(x)
    base_out, update = formula(params["layer"], x64)
    expected = base_out + SCALE * update
    assert y.shape == expected.shape
    tol = 1e-5 if dtype == jnp.float32 else 4e-2
    np.testing.assert_allclose(y, expected, atol=tol * max(1.0, np.abs(expected).max()), rtol=tol)
    assert np.abs(SCALE * update).max() > 10 * tol  # the update is large enough to be seen


# ---------------------------------------------------------------- DoRA


def _dora_expected(kind, p, x):
    """DoRA by its definition: g = m / ||W + s·ΔW|| per output, y = g·(x·(W + s·ΔW)) + bias."""
    base_out, update = CASES[kind][0](p, x)
    kernel = _np(p["kernel"] if "kernel" in p else p["embedding"])
    bias = _np(p["bias"]) if "bias" in p else 0.0
    delta_w = {"dense": lambda: _np(p["lora_A"]) @ _np(p["lora_B"]),
               "dense_general_split": lambda: (_np(p["lora_A"]) @ _np(p["lora_B"])).reshape(kernel.shape),
               "dense_general_merge": lambda: (_np(p["lora_A"]) @ _np(p["lora_B"])).reshape(kernel.shape),
               "embed": lambda: _np(p["lora_A"]) @ _np(p["lora_B"]),
               "conv": lambda: (_np(p["lora_A"]).reshape(-1, RANK) @ _np(p["lora_B"]).reshape(RANK, -1)).reshape(
                   kernel.shape)}[kind]()
    out_ndim = 2 if kind == "dense_general_split" else 1
    axes = tuple(range(kernel.ndim - out_ndim))
    norm = np.sqrt(np.sum((kernel + SCALE * delta_w) ** 2, axis=axes))
    gain = _np(p["lora_magnitude"]).reshape(norm.shape) / norm
    return gain * (base_out - bias + SCALE * update) + bias


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kind", ["dense", "dense_general_split", "dense_general_merge", "conv", "embed"])
def test_dora_layer_equals_its_definition(kind, jit):
    formula, make_input = CASES[kind]
    x = make_input(jax.random.key(0))
    model = lora_jax.lora(_Wrap(kind), LoraConfig(rank=RANK, alpha=ALPHA, targets=("layer",), use_dora=True))
    params = model.init(jax.random.key(1), x)["params"]
    layer = params["layer"]
    weight = _np(layer["kernel"] if "kernel" in layer else layer["embedding"])
    out_ndim = 2 if kind == "dense_general_split" else 1
    # at init m = ||W|| per output (B = 0), with the weight's rank and 1 on contracted axes
    norm = np.sqrt(np.sum(weight ** 2, axis=tuple(range(weight.ndim - out_ndim)), keepdims=True))
    np.testing.assert_allclose(_np(layer["lora_magnitude"]), norm, rtol=1e-6)
    params = randomize_lora(params, scale=0.3)
    params["layer"]["lora_magnitude"] = layer["lora_magnitude"] * (1.0 + 0.5 * jax.random.uniform(
        jax.random.key(2), layer["lora_magnitude"].shape))
    y = np.asarray((jax.jit(model.apply) if jit else model.apply)({"params": params}, x), np.float64)
    x64 = np.asarray(x) if x.dtype.kind == "i" else _np(x)
    expected = _dora_expected(kind, params["layer"], x64)
    np.testing.assert_allclose(y, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=1e-5)
    assert np.abs(y - np.asarray(_Wrap(kind).apply({"params": {"layer": {
        k: v for k, v in params["layer"].items() if not k.startswith("lora_")}}}, x))).max() > 1e-2


def test_dora_refuses_layers_it_cannot_rescale():
    x = jax.random.normal(jax.random.key(0), (2, 4, 6))
    model = lora_jax.lora(_Wrap("einsum"), LoraConfig(rank=RANK, targets=("layer",), use_dora=True))
    with pytest.raises(NotImplementedError, match="'dora' is not supported on layer 'layer'.*einsum"):
        model.init(jax.random.key(0), x)


def test_adapter_and_config_variant_must_agree():
    x = jax.random.normal(jax.random.key(0), (2, 3, 6))
    dora = LoraConfig(rank=RANK, targets=("layer",), use_dora=True)
    params = lora_jax.lora(_Wrap("dense"), dora).init(jax.random.key(1), x)["params"]
    with pytest.raises(ValueError, match=r"holds \['lora_magnitude'\].*use_dora"):
        lora_jax.lora(_Wrap("dense"), dora.replace(use_dora=False)).apply({"params": params}, x)
    plain = {"layer": {k: v for k, v in params["layer"].items() if k != "lora_magnitude"}}
    with pytest.raises(ValueError, match="hold no lora_magnitude"):
        lora_jax.lora(_Wrap("dense"), dora).apply({"params": plain}, x)


@pytest.mark.parametrize("kind", ["einsum", "conv"])
def test_unsupported_layer_forms_raise_not_implemented(kind):
    x = jnp.ones((2, 6)) if kind == "einsum" else jnp.ones((1, 5, 5, 4))

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            if kind == "einsum":
                return nn.Einsum((6, 5), "...d,dk->...k", name="layer")(x)
            return nn.Conv(4, (3, 3), feature_group_count=2, name="layer")(x)

    with pytest.raises(NotImplementedError, match="'layer'"):
        lora_jax.lora(One(), LoraConfig(rank=1, targets=("layer",))).init(jax.random.key(0), x)
