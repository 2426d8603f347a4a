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
from tests.conftest import randomize_lora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

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
                                                               "target_modules": ["query"], "use_dora": True}))
    with pytest.raises(ValueError, match=r"\['use_dora'\].*not supported"):
        lora_jax.import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["query"]}))
    with pytest.raises(ValueError, match="PEFT IA3 adapter; only LORA"):
        lora_jax.import_peft(tmp_path)


def test_export_refuses_layers_without_peft_equivalent(tmp_path):
    import flax.linen as nn

    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((2, 4), name="proj")(x)

    config = LoraConfig(rank=2, targets=("proj",))
    params = lora_jax.lora(Heads(), config).init(jax.random.key(0), jnp.ones((1, 6)))["params"]
    with pytest.raises(ValueError, match="'proj'.*no PEFT equivalent"):
        lora_jax.export_peft(tmp_path, params, config)


def test_multiple_adapters_switch_without_recompiling():
    from lora_jax.models import MLP

    config = LoraConfig(rank=2, alpha=4, targets=("fc1", "fc2"))
    model = lora_jax.lora(MLP((16, 3)), config)
    x = jax.random.normal(jax.random.key(0), (4, 10))
    params = model.init(jax.random.key(1), x)["params"]
    _, base = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    adapters = [lora_jax.extract_adapter(randomize_lora(params, seed=s), config) for s in (1, 2, 3)]
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    outputs = [forward(lora_jax.apply_adapter(base, a), x) for a in adapters]
    assert forward._cache_size() == 1
    assert float(jnp.abs(outputs[0] - outputs[1]).max()) > 1e-3
    np.testing.assert_allclose(outputs[2], model.apply({"params": lora_jax.apply_adapter(base, adapters[2])}, x))


def _delta(adapter, module):
    p = adapter.params[module]
    return adapter.config.scale_for(p["lora_A"].shape[-1]) * (p["lora_A"] @ p["lora_B"])


def test_weighted_adapter_math():
    from lora_jax.models import MLP

    x = jnp.ones((1, 10))
    c1 = LoraConfig(rank=2, alpha=4, targets=("fc1",))
    c2 = LoraConfig(rank=3, alpha=3, targets=("fc1",))
    p1 = randomize_lora(lora_jax.lora(MLP((16,)), c1).init(jax.random.key(1), x)["params"], seed=1)
    p2 = randomize_lora(lora_jax.lora(MLP((16,)), c2).init(jax.random.key(2), x)["params"], seed=2)
    a1, a2 = lora_jax.extract_adapter(p1, c1), lora_jax.extract_adapter(p2, c2)
    cat = lora_jax.add_weighted_adapter([a1, a2], [0.7, -0.4], "cat", base_params=p1)
    assert cat.config.rank == 5 and cat.config.scale == 1.0
    np.testing.assert_allclose(_delta(cat, "fc1"), 0.7 * _delta(a1, "fc1") - 0.4 * _delta(a2, "fc1"), atol=1e-6)

    a3 = lora_jax.extract_adapter(randomize_lora(p1, seed=3), c1)
    lin = lora_jax.add_weighted_adapter([a1, a3], [0.5, 2.0], "linear")
    s1, s3 = 0.5 * c1.scale, 2.0 * c1.scale
    A = np.sqrt(s1) * a1.params["fc1"]["lora_A"] + np.sqrt(s3) * a3.params["fc1"]["lora_A"]
    B = np.sqrt(s1) * a1.params["fc1"]["lora_B"] + np.sqrt(s3) * a3.params["fc1"]["lora_B"]
    np.testing.assert_allclose(_delta(lin, "fc1"), A @ B, atol=1e-6)
    with pytest.raises(ValueError, match="'linear' needs equal ranks"):
        lora_jax.add_weighted_adapter([a1, a2], [1.0, 1.0], "linear")


@pytest.mark.parametrize("config_text, message", [
    ("{not json", r"adapter_config.json is not valid JSON"),
    ("[1, 2]", r"holds a JSON list, not an object"),
    ('{"peft_type": "LORA", "lora_alpha": 8, "target_modules": ["query"]}', r"lacks the field 'r'"),
    ('{"peft_type": "LORA", "r": "8", "lora_alpha": 8, "target_modules": ["query"]}', r"rank must be a positive integer"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": "x", "target_modules": ["query"]}', r"alpha must be a number"),
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
