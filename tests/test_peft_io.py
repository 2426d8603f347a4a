"""PEFT interop proven against peft + transformers on the packaged MiniLM."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.models import from_pretrained, packaged_minilm_path
from tests.helpers import randomize_lora

try:  # the parity tests need PyTorch, transformers and peft; the rest of this file runs without them
    import peft
    import torch
    import transformers
except ImportError:
    peft = torch = transformers = None
needs_torch = pytest.mark.skipif(torch is None, reason="parity with peft needs torch, transformers and peft")

SENTENCES = ["The battery life is amazing but the camera is terrible.", "Fast boot.", "Sound is tinny and weak."]


@pytest.fixture(scope="module")
def classifier():
    model, params, tokenizer = from_pretrained("packaged:minilm", num_labels=3)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="np")
    return model, params, enc


def _ours(model, params, enc):
    return np.asarray(model.apply({"params": params}, *(jnp.asarray(enc[k]) for k in
                                                          ("input_ids", "attention_mask", "token_type_ids"))))


def _theirs(torch_model, enc):
    with torch.no_grad():
        return torch_model(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()


@pytest.mark.slow
@needs_torch
def test_trained_adapter_exports_and_peft_reproduces_our_logits(classifier, tmp_path):
    model, params, enc = classifier
    config = LoraConfig(rank=8, alpha=16, targets=("query", "value"), modules_to_save=("classifier",))
    lora_model = lora_jax.lora(model, config)
    lora_params = lora_jax.init_lora_params(lora_model, params, jax.random.key(0), jnp.asarray(enc["input_ids"]))
    mask = lora_jax.trainable_mask(lora_params, config)
    labels = jnp.array([0, 2, 1])

    def loss_fn(p, batch, rng):
        logits = lora_model.apply({"params": p}, batch["input_ids"], batch["attention_mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.adam(1e-2)
    state = lora_jax.TrainState.create(lora_params, mask, tx, jax.random.key(1))
    step = lora_jax.make_train_step(loss_fn, tx, mask)
    batch = {k: jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask")}
    for _ in range(3):
        state, _ = step(state, batch)
    assert float(jnp.abs(state.params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["lora_B"]).max()) > 0
    ours = _ours(lora_model, state.params, enc)

    lora_jax.export_peft(tmp_path, state.params, config, str(packaged_minilm_path()), task_type="SEQ_CLS")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["target_modules"] == ["query", "value"]
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification.from_pretrained(str(packaged_minilm_path()), num_labels=3).eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    theirs = _theirs(peft_model, enc)
    print(f"export -> PEFT: max |logit diff| = {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()

    # and back: import our own export, bit-identical adapter and the same logits
    imported = lora_jax.import_peft(tmp_path, base_params=params)
    assert imported.config.modules_to_save == ("classifier",)
    round_trip = lora_jax.apply_adapter(params, imported)
    jax.tree.map(np.testing.assert_array_equal, lora_jax.extract_adapter(round_trip, imported.config).params,
                 lora_jax.extract_adapter(state.params, config).params)
    np.testing.assert_allclose(_ours(lora_jax.lora(model, imported.config), round_trip, enc), ours, atol=1e-6)


@pytest.mark.slow
@needs_torch
def test_peft_written_adapter_imports_and_matches_peft_outputs(classifier, tmp_path):
    model, params, enc = classifier
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification.from_pretrained(str(packaged_minilm_path()), num_labels=3).eval()
    peft_config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["query", "key", "dense"], init_lora_weights=False,
                                  modules_to_save=["classifier"], task_type="SEQ_CLS", use_rslora=True)
    peft_model = peft.get_peft_model(base, peft_config).eval()
    with torch.no_grad():  # a trained-looking head, so the round trip must carry it
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_(0.0, 0.1)
    peft_model.save_pretrained(tmp_path)
    theirs = _theirs(peft_model, enc)

    adapter = lora_jax.import_peft(tmp_path, base_params=params)
    assert adapter.config.rslora and adapter.config.rank == 4
    lora_params = lora_jax.apply_adapter(params, adapter)
    ours = _ours(lora_jax.lora(model, adapter.config), lora_params, enc)
    print(f"PEFT -> import: max |logit diff| = {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    # "dense" matched attention.output.dense, intermediate.dense, output.dense and the pooler, as in PEFT
    layer0 = lora_params["bert"]["encoder"]["layer"]["0"]
    assert "lora_A" in layer0["intermediate"]["dense"] and "lora_A" in lora_params["bert"]["pooler"]["dense"]


def test_unsupported_peft_options_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["query"], "use_qalora": True}))
    with pytest.raises(ValueError, match=r"\['use_qalora'\].*not supported"):
        lora_jax.import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["query"]}))
    with pytest.raises(ValueError, match="PEFT IA3 adapter; only LORA"):
        lora_jax.import_peft(tmp_path)


def test_export_refuses_layers_without_peft_equivalent(tmp_path):
    import flax.linen as nn

    class Conv1d(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3,), name="proj")(x)

    config = LoraConfig(rank=2, targets=("proj",))
    params = lora_jax.lora(Conv1d(), config).init(jax.random.key(0), jnp.ones((1, 5, 6)))["params"]
    with pytest.raises(ValueError, match="'proj'.*no PEFT equivalent"):
        lora_jax.export_peft(tmp_path, params, config)


@pytest.mark.parametrize("config_text, message", [
    ("{not json", r"adapter_config.json is not valid JSON"),
    ("[1, 2]", r"holds a JSON list, not an object"),
    ('{"peft_type": "LORA", "lora_alpha": 8, "target_modules": ["query"]}', r"lacks the field 'r'"),
    ('{"peft_type": "LORA", "r": "8", "lora_alpha": 8, "target_modules": ["query"]}', r"r is '8' \(str\); it must be an integer"),
    ('{"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["query"]}', r"rank must be a positive integer"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": "x", "target_modules": ["query"]}', r"lora_alpha is 'x' \(str\)"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["query"], "use_rslora": "false"}',
     r"use_rslora is 'false' \(str\); it must be true or false"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["query"], "use_dora": "no"}',
     r"use_dora is 'no'"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": 7}', r"target_modules is 7 \(int\)"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q"], "rank_pattern": {"q": "4"}}',
     r"rank_pattern is \{'q': '4'\}"),
])
def test_broken_peft_configs_name_the_file_and_field(tmp_path, config_text, message):
    (tmp_path / "adapter_config.json").write_text(config_text)
    with pytest.raises(ValueError, match=message) as err:
        lora_jax.import_peft(tmp_path)
    assert "adapter_config.json" in str(err.value)


def test_broken_peft_weights_are_named(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "target_modules": ["fc1"]}))
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        lora_jax.import_peft(tmp_path)
    save_file({"base_model.model.fc1.lora_A.weight": np.zeros((3, 10), np.float32),  # rank 3, config says 2
               "base_model.model.fc1.lora_B.weight": np.zeros((16, 3), np.float32)}, str(weights))
    with pytest.raises(ValueError, match=r"layer 'fc1' has factors of rank 3 .* gives it rank 2"):
        lora_jax.import_peft(tmp_path)
    save_file({"base_model.model.fc2.lora_A.weight": np.zeros((2, 10), np.float32),
               "base_model.model.fc2.lora_B.weight": np.zeros((16, 2), np.float32)}, str(weights))
    with pytest.raises(ValueError, match=r"lora_A/lora_B for layers its config does not target \(\['fc2'\]"):
        lora_jax.import_peft(tmp_path)


# ---------------------------------------------------------------- every PEFT layer kind, LoRA and DoRA


def _TorchKinds():
    """An Embedding, a Linear and a Conv2d: each kind PEFT adapts, side by side."""

    class Kinds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(12, 6)
            self.fc = torch.nn.Linear(6, 5)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, ids, img):
            return self.fc(self.emb(ids)), self.conv(img)

    return Kinds()


def _flax_kinds():
    import flax.linen as nn

    class Kinds(nn.Module):
        @nn.compact
        def __call__(self, ids, img):  # img: (batch, h, w, channels)
            return nn.Dense(5, name="fc")(nn.Embed(12, 6, name="emb")(ids)), nn.Conv(4, (3, 3), padding=1, name="conv")(img)

    return Kinds()


def _flax_base_params(tm):
    t = lambda x: np.asarray(x.detach().numpy())
    return {"emb": {"embedding": t(tm.emb.weight)},
            "fc": {"kernel": t(tm.fc.weight).T, "bias": t(tm.fc.bias)},
            "conv": {"kernel": np.transpose(t(tm.conv.weight), (2, 3, 1, 0)), "bias": t(tm.conv.bias)}}


def _peft_kinds_model(use_dora):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["emb", "fc", "conv"], use_dora=use_dora,
                             init_lora_weights=False)  # random A and B, so the update is not zero
    model = peft.get_peft_model(_TorchKinds(), config)
    if use_dora:  # move the magnitudes off ||W + ΔW||, so DoRA's rescaling shows
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.0 + 0.3 * torch.rand_like(param))
    return model


def _peft_outputs(folder, theirs_model, ids, img):
    """PEFT loads the adapter in ``folder`` onto a twin with ``theirs_model``'s base weights; its outputs."""
    reloaded = peft.PeftModel.from_pretrained(_TorchKinds(), str(folder)).eval()
    reloaded.get_base_model().load_state_dict(theirs_model.get_base_model().state_dict(), strict=False)
    with torch.no_grad():
        return [o.numpy() for o in reloaded(torch.tensor(ids), torch.tensor(img))]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@needs_torch
def test_embed_dense_conv_adapters_match_peft_both_ways(tmp_path, use_dora):
    rng = np.random.RandomState(0)
    ids, img = rng.randint(0, 12, (2, 7)), rng.randn(2, 3, 5, 5).astype(np.float32)
    theirs_model = _peft_kinds_model(use_dora).eval()
    with torch.no_grad():
        theirs = [o.numpy() for o in theirs_model(torch.tensor(ids), torch.tensor(img))]
    theirs[1] = np.transpose(theirs[1], (0, 2, 3, 1))
    theirs_model.save_pretrained(str(tmp_path / "peft"))
    base_params = _flax_base_params(theirs_model.get_base_model())

    adapter = lora_jax.import_peft(tmp_path / "peft", base_params=base_params)
    assert adapter.config.use_dora == use_dora
    model = lora_jax.lora(_flax_kinds(), adapter.config)
    params = lora_jax.apply_adapter(base_params, adapter)
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(np.transpose(img, (0, 2, 3, 1))))
    print(f"{'DoRA' if use_dora else 'LoRA'} Embed/Linear/Conv2d, PEFT's adapter imported: max |diff| = "
          f"{max(float(np.abs(np.asarray(o) - t).max()) for o, t in zip(ours, theirs)):.2e}")
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(o), t, atol=2e-5)

    # and out again: PEFT loads our export and reproduces the same outputs
    lora_jax.export_peft(tmp_path / "ours", params, adapter.config)
    again = _peft_outputs(tmp_path / "ours", theirs_model, ids, img)
    np.testing.assert_allclose(again[0], theirs[0], atol=1e-6)
    np.testing.assert_allclose(again[1], np.transpose(theirs[1], (0, 3, 1, 2)), atol=1e-6)


@needs_torch
def test_dora_gradients_match_peft(tmp_path):
    """The magnitude, A and B gradients of a DoRA layer equal PEFT's (its norm is a constant in the gradient)."""
    rng = np.random.RandomState(1)
    ids, img = rng.randint(0, 12, (2, 7)), rng.randn(2, 3, 5, 5).astype(np.float32)
    theirs_model = _peft_kinds_model(use_dora=True).train()
    out = theirs_model(torch.tensor(ids), torch.tensor(img))
    (out[0].square().sum() + out[1].square().sum()).backward()
    theirs_model.save_pretrained(str(tmp_path))
    base_params = _flax_base_params(theirs_model.get_base_model())
    adapter = lora_jax.import_peft(tmp_path, base_params=base_params)
    model = lora_jax.lora(_flax_kinds(), adapter.config)
    params = lora_jax.apply_adapter(base_params, adapter)

    def loss(p):
        a, b = model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(np.transpose(img, (0, 2, 3, 1))))
        return jnp.sum(a ** 2) + jnp.sum(b ** 2)

    grads = jax.grad(loss)(params)
    by_name = dict(theirs_model.named_parameters())
    for layer in ("fc", "conv"):
        g = {part: p.grad.numpy() for n, p in by_name.items() if f".{layer}." in n and p.grad is not None
             for part in ("lora_A", "lora_B", "lora_magnitude_vector") if f".{part}." in n}
        ga, gb, gm = (np.asarray(grads[layer][k]) for k in ("lora_A", "lora_B", "lora_magnitude"))
        print(f"DoRA {layer}: |grad| max {max(np.abs(ga).max(), np.abs(gb).max(), np.abs(gm).max()):.3f}, "
              f"magnitude grad max |diff| {np.abs(gm.reshape(-1) - g['lora_magnitude_vector'].reshape(-1)).max():.2e}")
        if layer == "fc":
            np.testing.assert_allclose(ga, g["lora_A"].T, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(gb, g["lora_B"].T, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(gm.reshape(-1), g["lora_magnitude_vector"].reshape(-1), rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_allclose(ga, np.transpose(g["lora_A"], (2, 3, 1, 0)), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(gb.reshape(gb.shape[-2:]), g["lora_B"].reshape(g["lora_B"].shape[:2]).T,
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(gm.reshape(-1), g["lora_magnitude_vector"].reshape(-1), rtol=1e-4, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_nnx_model_matches_peft_both_ways(tmp_path, use_dora):
    """The same Embedding / Linear / Conv2d adapters on an NNX model: PEFT's adapter imported reproduces
    PEFT's outputs, and the NNX model's export loads in PEFT."""
    from flax import nnx

    class Kinds(nnx.Module):
        def __init__(self, rngs):
            self.emb, self.fc = nnx.Embed(12, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs)
            self.conv = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)

        def __call__(self, ids, img):
            return self.fc(self.emb(ids)), self.conv(img)

    rng = np.random.RandomState(0)
    ids, img = rng.randint(0, 12, (2, 7)), rng.randn(2, 3, 5, 5).astype(np.float32)
    theirs_model = _peft_kinds_model(use_dora).eval()
    with torch.no_grad():
        theirs = [o.numpy() for o in theirs_model(torch.tensor(ids), torch.tensor(img))]
    theirs_model.save_pretrained(str(tmp_path / "peft"))
    adapter = lora_jax.import_peft(tmp_path / "peft", base_params=_flax_base_params(theirs_model.get_base_model()))

    model = Kinds(nnx.Rngs(0))
    lora_jax.load_nnx_params(model, _flax_base_params(theirs_model.get_base_model()))
    lora_jax.lora(model, adapter.config, rngs=nnx.Rngs(1))
    lora_jax.apply_adapter(model, adapter)
    ours = model(jnp.asarray(ids), jnp.asarray(np.transpose(img, (0, 2, 3, 1))))
    np.testing.assert_allclose(np.asarray(ours[0]), theirs[0], atol=2e-5)
    np.testing.assert_allclose(np.transpose(np.asarray(ours[1]), (0, 3, 1, 2)), theirs[1], atol=2e-5)

    lora_jax.export_peft(tmp_path / "ours", model, adapter.config)
    again = _peft_outputs(tmp_path / "ours", theirs_model, ids, img)
    np.testing.assert_allclose(again[0], theirs[0], atol=1e-6)
    np.testing.assert_allclose(again[1], theirs[1], atol=1e-6)


# ---------------------------------------------------------------- a GPT-style twin: DenseGeneral, Einsum, nn.scan


def _flax_gpt():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            q = nn.DenseGeneral((2, 4), name="q")(h)                                           # (b, t, 2, 4)
            v = nn.Einsum((8, 2, 4), "btd,dhk->bthk", use_bias=False, name="v")(h)           # (b, t, 2, 4)
            return h + jnp.tanh(nn.DenseGeneral(8, axis=(-2, -1), name="o")(q * v)), None

    class Gpt(nn.Module):
        @nn.compact
        def __call__(self, x):
            blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return nn.Dense(3, name="head")(blocks(name="blocks")(x, None)[0])

    return Gpt()


def _torch_gpt(q_dim_major: bool = False):
    """``q_dim_major``: q's Linear orders its outputs (head_dim, heads), not (heads, head_dim)."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v, self.o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8)

        def forward(self, h):
            b, t, _ = h.shape
            q = self.q(h).view(b, t, 4, 2).transpose(2, 3) if q_dim_major else self.q(h).view(b, t, 2, 4)
            v = self.v(h).view(b, t, 2, 4)
            return h + torch.tanh(self.o((q * v).reshape(b, t, 8)))

    class Gpt(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.head = torch.nn.ModuleList([Block(), Block()]), torch.nn.Linear(8, 3)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    return Gpt()


def _torch_gpt_with(flax_params, q_dim_major: bool = False):
    """The torch twin carrying the flax base weights: each kernel flattened (in..., out...) -> (out, in)
    (q's outputs as (head_dim, heads) with ``q_dim_major``)."""
    twin, p = _torch_gpt(q_dim_major), flax_params
    state = {"head.weight": np.asarray(p["head"]["kernel"]).T, "head.bias": np.asarray(p["head"]["bias"])}
    for i in range(2):
        for name in ("q", "v", "o"):
            kernel = np.asarray(p["blocks"][name]["kernel"][i])
            kernel = kernel.transpose(0, 2, 1) if name == "q" and q_dim_major else kernel
            state[f"blocks.{i}.{name}.weight"] = kernel.reshape(8, 8).T
        for name in ("q", "o"):
            bias = np.asarray(p["blocks"][name]["bias"][i])
            state[f"blocks.{i}.{name}.bias"] = (bias.T if name == "q" and q_dim_major else bias).reshape(8)
    twin.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()})
    return twin.eval()


def _gpt_with_adapter():
    """(x, config, LoRA params with a random adapter, our output) for the GPT-style flax model."""
    x = np.random.RandomState(0).randn(2, 5, 8).astype(np.float32)
    config = LoraConfig(rank=2, alpha=4, targets=("q", "v", "o"))
    model = lora_jax.lora(_flax_gpt(), config)
    params = randomize_lora(model.init(jax.random.key(0), jnp.asarray(x))["params"], scale=0.3)
    return x, config, params, np.asarray(model.apply({"params": params}, jnp.asarray(x)))


@needs_torch
def test_gpt_twin_with_dense_general_einsum_and_scanned_blocks_matches_peft_both_ways(tmp_path):
    import warnings

    x, config, params, ours = _gpt_with_adapter()
    assert params["blocks"]["v"]["lora_A"].shape == (2, 8, 1, 1, 2)  # stacked einsum factors
    lora_jax.export_peft(tmp_path / "ours", params, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs_model = peft.PeftModel.from_pretrained(_torch_gpt_with(params), str(tmp_path / "ours")).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(x)).numpy()
    print(f"GPT twin, our export in PEFT: max |diff| = {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(theirs, ours, atol=1e-4)

    # PEFT-written adapters for the twin come back stacked and in our layouts
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(_torch_gpt_with(params), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q", "v", "o"], init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        theirs = peft_model(torch.tensor(x)).numpy()
    adapter = lora_jax.import_peft(tmp_path / "theirs", base_params=params)
    assert adapter.params["blocks"]["v"]["lora_B"].shape == (2, 1, 2, 4, 2)
    mine = np.asarray(lora_jax.lora(_flax_gpt(), adapter.config).apply(
        {"params": lora_jax.apply_adapter(params, adapter)}, jnp.asarray(x)))
    print(f"GPT twin, PEFT's adapter imported: max |diff| = {np.abs(mine - theirs).max():.2e}")
    np.testing.assert_allclose(mine, theirs, atol=1e-4)


@needs_torch
def test_flatten_order_matches_a_torch_linear_with_other_output_order_both_ways(tmp_path):
    x, config, params, ours = _gpt_with_adapter()
    order = {"q": {"out": (1, 0)}}  # torch's q outputs: (head_dim, heads)
    twin = _torch_gpt_with(params, q_dim_major=True)
    with torch.no_grad():
        assert np.abs(twin(torch.tensor(x)).numpy() - ours).max() > 1e-3  # the adapter matters here
    lora_jax.export_peft(tmp_path / "ours", params, config, flatten_order=order)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(twin, str(tmp_path / "ours")).eval()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    lora_jax.export_peft(tmp_path / "default", params, config)  # the default order is wrong for this twin
    with torch.no_grad():
        wrong = peft.PeftModel.from_pretrained(_torch_gpt_with(params, q_dim_major=True), str(tmp_path / "default"))(
            torch.tensor(x)).numpy()
    assert np.abs(wrong - ours).max() > 1e-3

    torch.manual_seed(1)
    peft_model = peft.get_peft_model(_torch_gpt_with(params, q_dim_major=True), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q", "v", "o"], init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        theirs = peft_model(torch.tensor(x)).numpy()
    adapter = lora_jax.import_peft(tmp_path / "theirs", base_params=params, flatten_order=order)
    mine = np.asarray(lora_jax.lora(_flax_gpt(), adapter.config).apply(
        {"params": lora_jax.apply_adapter(params, adapter)}, jnp.asarray(x)))
    np.testing.assert_allclose(mine, theirs, atol=1e-4)
    with pytest.raises(ValueError, match="not a permutation"):
        lora_jax.export_peft(tmp_path / "bad", params, config, flatten_order={"q": {"out": (0, 0)}})
    with pytest.raises(ValueError, match="apply to Dense / DenseGeneral"):
        lora_jax.export_peft(tmp_path / "bad", params, config, flatten_order={"v": {"in": (0,)}})


def test_name_map_bridges_flax_and_torch_module_names(tmp_path):
    import flax.linen as nn
    from safetensors.numpy import load_file

    class Listed(nn.Module):  # a setup list names its layers blocks_0, blocks_1; torch says blocks.0, blocks.1
        def setup(self):
            self.blocks = [nn.Dense(4), nn.Dense(4)]

        def __call__(self, x):
            return self.blocks[1](self.blocks[0](x))

    config = LoraConfig(rank=2, targets=("re:blocks_\\d+",))
    params = randomize_lora(lora_jax.lora(Listed(), config).init(jax.random.key(0), jnp.ones((1, 4)))["params"])
    name_map = {r"blocks_(\d+)": r"blocks.\1"}
    lora_jax.export_peft(tmp_path, params, config, name_map=name_map)
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.blocks.0.lora_A.weight" and len(keys) == 4
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["blocks.0", "blocks.1"]
    back = lora_jax.import_peft(tmp_path, base_params=params, name_map=name_map)
    jax.tree.map(np.testing.assert_array_equal, back.params, lora_jax.lora_leaves(params))
    with pytest.raises(ValueError, match=r"needs '\{i\}' where the layer index goes"):
        lora_jax.peft_io.torch_module_name("blocks/q", {"blocks/(.*)": r"layers.\1"}, index=0)


def test_the_export_records_its_flatten_order_and_name_map_for_the_import(tmp_path):
    _, config, params, _ = _gpt_with_adapter()
    order = {"q": {"out": (1, 0)}}
    lora_jax.export_peft(tmp_path / "a", params, config, flatten_order=order)
    back = lora_jax.import_peft(tmp_path / "a", base_params=params)  # the order is read from the folder
    jax.tree.map(np.testing.assert_array_equal, back.params, lora_jax.lora_leaves(params))
    with pytest.raises(ValueError, match="flatten_order given .* differs from the one"):
        lora_jax.import_peft(tmp_path / "a", base_params=params, flatten_order={"q": {"out": (0, 1)}})
    names = {r"blocks/(.*)": r"layers.{i}.\1"}
    lora_jax.export_peft(tmp_path / "b", params, config, name_map=names)
    back = lora_jax.import_peft(tmp_path / "b", base_params=params)
    jax.tree.map(np.testing.assert_array_equal, back.params, lora_jax.lora_leaves(params))


@pytest.mark.parametrize("kwargs, message", [
    ({"flatten_order": {"qq": {"out": (1, 0)}}}, r"flatten_order 'qq' matches no layer of the adapter"),
    ({"name_map": {r"block/(.*)": r"layers.{i}.\1"}}, r"name_map 'block/\(\.\*\)' matches no layer"),
    ({"name_map": {r"blocks/(.*)": r"layers.{i}.x"}}, r"gives 'blocks/o' layer 0 and 'blocks/q' layer 0 the same "
                                                       r"torch name 'layers.0.x'|the same torch name"),
    ({"name_map": {r"blocks/(.*)": r"layers.{i}.\1", "head": "head.{i}"}}, r"has '\{i\}', but 'head' is not a stack"),
    ({"name_map": {r"blocks/(.*": "x"}}, r"name_map pattern 'blocks/\(\.\*' is not a valid regex"),
])
def test_patterns_that_match_nothing_or_collide_are_refused(tmp_path, kwargs, message):
    _, config, params, _ = _gpt_with_adapter()
    config = config.replace(modules_to_save=("head",)) if "head" in str(kwargs) else config
    with pytest.raises(ValueError, match=message):
        lora_jax.export_peft(tmp_path / "a", params, config, **kwargs)
    assert not (tmp_path / "a").exists()


def test_export_swaps_the_folder_atomically_and_never_mixes_versions(tmp_path, monkeypatch):
    from lora_jax import folder_swap

    _, config, params, _ = _gpt_with_adapter()
    folder = lora_jax.export_peft(tmp_path / "a", params, config)
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    newer = jax.tree.map(lambda v: v * 2, params)
    calls = []

    def dies_between_renames(src, dst):  # the old folder moved aside, then the process dies
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        src.rename(dst)

    monkeypatch.setattr(folder_swap, "_rename", dies_between_renames)
    with pytest.raises(KeyboardInterrupt):
        lora_jax.export_peft(folder, newer, config.replace(alpha=8.0))
    monkeypatch.undo()
    back = lora_jax.import_peft(folder, base_params=params)  # the import finds the old version whole
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old and back.config.alpha == config.alpha
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="also holds \\['notes.txt'\\]"):
        lora_jax.export_peft(folder, newer, config)
    assert (folder / "notes.txt").read_text() == "mine"


def test_non_finite_or_misshapen_peft_tensors_are_named(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "target_modules": ["fc1"]}))
    weights = str(tmp_path / "adapter_model.safetensors")
    a = np.ones((2, 10), np.float32)
    for tensors, message in (
            ({"base_model.model.fc1.lora_A.weight": np.full((2, 10), np.nan, np.float32),
              "base_model.model.fc1.lora_B.weight": np.ones((16, 2), np.float32)}, r"'base_model.model.fc1.lora_A.weight' holds inf or NaN"),
            ({"base_model.model.fc1.lora_A.weight": np.ones(20, np.float32),
              "base_model.model.fc1.lora_B.weight": np.ones((16, 2), np.float32)}, r"fc1.lora_A.weight' of shape \(20,\): a LoRA factor is 2-D"),
            ({"base_model.model.fc1.lora_A.weight": a, "base_model.model.fc1.lora_B.weight": np.ones((16, 2), np.float32),
              "base_model.model.fc1.lora_magnitude_vector": np.ones((2, 16), np.float32)}, r"a per-output lora_magnitude_vector is \(out,\)")):
        save_file(tensors, weights)
        with pytest.raises(ValueError, match=message):
            lora_jax.import_peft(tmp_path)
    save_file({"base_model.model.fc1.lora_A.weight": np.ones((2, 12), np.float32),  # 12 inputs; the layer has 10
               "base_model.model.fc1.lora_B.weight": np.ones((16, 2), np.float32)}, weights)
    from experiments.mlp import MLP
    config = LoraConfig(rank=2, targets=("fc1",))
    params = lora_jax.lora(MLP((16, 3)), config).init(jax.random.key(0), jnp.ones((1, 10)))["params"]
    with pytest.raises(ValueError, match=r"lora_A of 'fc1' .* does not fit layer 'fc1'"):
        lora_jax.import_peft(tmp_path, base_params=params)


# ---------------------------------------------------------------- PiSSA: a second variant, against peft


def _torch_mlp():
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    return Mlp()


def _flax_mlp():
    import flax.linen as nn

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="fc2")(jnp.tanh(nn.Dense(8, name="fc1")(x)))

    return Mlp()


@needs_torch
def test_pissa_matches_peft_at_init_after_training_and_in_both_conversions(tmp_path):
    import copy

    torch.manual_seed(0)
    original = _torch_mlp().eval()
    t = lambda v: v.detach().numpy().copy()
    base_params = {n: {"kernel": t(getattr(original, n).weight).T, "bias": t(getattr(original, n).bias)}
                   for n in ("fc1", "fc2")}
    theirs = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights="pissa")).eval()
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the conversion's reference
    theirs.save_pretrained(str(tmp_path / "start"))
    x = np.random.RandomState(0).randn(4, 6).astype(np.float32)

    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"), init="pissa")
    model = lora_jax.lora(_flax_mlp(), config)
    params = lora_jax.init_lora_params(model, base_params, jax.random.key(0), jnp.asarray(x))
    layers = {n: getattr(theirs.base_model.model, n) for n in ("fc1", "fc2")}
    for name, layer in layers.items():  # scale·A·B: the weight's top-2 singular part, as PEFT's
        w = base_params[name]["kernel"].astype(np.float64)
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        top = (u[:, :2] * s[:2]) @ vh[:2]
        ours = 2.0 * np.asarray(params[name]["lora_A"], np.float64) @ np.asarray(params[name]["lora_B"])
        peft_part = 2.0 * (t(layer.lora_B["default"].weight) @ t(layer.lora_A["default"].weight)).T
        np.testing.assert_allclose(ours, top, atol=1e-5)
        np.testing.assert_allclose(peft_part, top, atol=1e-5)
    with torch.no_grad():
        base_out = original(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)), base_out, atol=1e-5)
    mask = lora_jax.trainable_mask(params, config)
    assert not mask["fc1"]["lora_A_init"] and not mask["fc1"]["lora_B_init"] and mask["fc1"]["lora_A"]

    # "training": both sides' A and B moved to the same values
    gen = np.random.RandomState(1)
    with torch.no_grad():
        for name, layer in layers.items():
            for factor in (layer.lora_A["default"], layer.lora_B["default"]):
                factor.weight.add_(torch.tensor(0.3 * gen.randn(*factor.weight.shape).astype(np.float32)))
            params[name]["lora_A"] = jnp.asarray(t(layer.lora_A["default"].weight).T)
            params[name]["lora_B"] = jnp.asarray(t(layer.lora_B["default"].weight).T)
        trained = theirs(torch.tensor(x)).numpy()
    ours = np.asarray(model.apply({"params": params}, x))
    print(f"PiSSA, trained factors: max |ours - PEFT| = {np.abs(ours - trained).max():.2e}")
    np.testing.assert_allclose(ours, trained, atol=1e-5)
    merged = _flax_mlp().apply({"params": lora_jax.merge(params, config)}, x)
    np.testing.assert_allclose(np.asarray(merged), trained, atol=1e-5)

    # ours out: a plain LoRA of rank 4 that PEFT loads onto the original (untouched) base
    lora_jax.export_peft(tmp_path / "ours", params, config)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] is True
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(x)).numpy(), trained, atol=1e-5)

    # PEFT's own conversion in: the same model on the original base, as plain LoRA
    theirs.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "start"))
    adapter = lora_jax.import_peft(tmp_path / "converted", base_params=base_params)
    back = lora_jax.lora(_flax_mlp(), adapter.config).apply(
        {"params": lora_jax.apply_adapter(base_params, adapter)}, x)
    np.testing.assert_allclose(np.asarray(back), trained, atol=1e-5)

    # an unconverted PiSSA folder fits PEFT's residual base only: refused with the way out
    theirs.peft_config["default"].init_lora_weights = "pissa"
    theirs.save_pretrained(str(tmp_path / "residual"))
    with pytest.raises(ValueError, match="changes the base weights.*path_initial_model_for_weight_conversion"):
        lora_jax.import_peft(tmp_path / "residual")
