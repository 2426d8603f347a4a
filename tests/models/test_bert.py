"""Flax BERT / RoBERTa against transformers' PyTorch models on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.models import from_pretrained, load_weights, packaged_minilm_path, read_config, read_state_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = ["The battery life is amazing but the camera is terrible.", "Great screen.",
             "The keyboard feels cheap, and the trackpad is even worse than I expected."]


def _max_diff(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs.detach().numpy()).max())


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained("packaged:minilm", task="base")


@pytest.mark.slow
def test_packaged_minilm_matches_transformers_bert_with_padding(minilm):
    model, params, tokenizer = minilm
    enc = tokenizer(SENTENCES, padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0  # the batch really has padding
    hidden, pooled = model.apply({"params": params}, jnp.asarray(enc["input_ids"]),
                                 jnp.asarray(enc["attention_mask"]), jnp.asarray(enc["token_type_ids"]))
    reference = transformers.BertModel.from_pretrained(str(packaged_minilm_path())).eval()
    with torch.no_grad():
        out = reference(**{k: torch.tensor(v) for k, v in enc.items()})
    assert _max_diff(hidden, out.last_hidden_state) <= 1e-4
    assert _max_diff(pooled, out.pooler_output) <= 1e-4


@pytest.mark.slow
def test_sequence_classification_logits_match_bert(tmp_path):
    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification.from_pretrained(
        str(packaged_minilm_path()), num_labels=3).eval()
    reference.save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    tokenizer.save_pretrained(tmp_path)
    model, params, tok = from_pretrained(tmp_path, num_labels=3)
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    logits = model.apply({"params": params}, *(jnp.asarray(enc[k]) for k in
                                                ("input_ids", "attention_mask", "token_type_ids")))
    with torch.no_grad():
        expected = reference(**{k: torch.tensor(v) for k, v in enc.items()}).logits
    assert _max_diff(logits, expected) <= 1e-4


def _small_roberta(tmp_path, safe: bool, cls: str = "RobertaModel"):
    config = transformers.RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=40, num_labels=3)
    torch.manual_seed(1)
    reference = getattr(transformers, cls)(config).eval()
    reference.save_pretrained(tmp_path)
    if not safe:  # transformers 5 writes only safetensors: write the legacy file ourselves
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    ids = np.array([[0, 5, 17, 33, 9, 2, 1, 1], [0, 44, 2, 1, 1, 1, 1, 1]], dtype=np.int64)
    mask = (ids != 1).astype(np.int64)
    return reference, ids, mask


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_small_random_roberta_matches_transformers(tmp_path, safe):
    reference, ids, mask = _small_roberta(tmp_path, safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    model, params, _ = from_pretrained(tmp_path, task="base", with_tokenizer=False)
    hidden, pooled = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        out = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert _max_diff(hidden, out.last_hidden_state) <= 1e-4
    assert _max_diff(pooled, out.pooler_output) <= 1e-4


def test_roberta_classification_head_matches(tmp_path):
    reference, ids, mask = _small_roberta(tmp_path, True, "RobertaForSequenceClassification")
    model, params, _ = from_pretrained(tmp_path, with_tokenizer=False)
    assert set(params["classifier"]) == {"dense", "out_proj"} and "pooler" not in params["roberta"]
    logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert _max_diff(logits, expected) <= 1e-4


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    _small_roberta(tmp_path, True)
    config = read_config(tmp_path)
    state = dict(read_state_dict(tmp_path))
    from lora_jax.models.bert import BertModel, BertForSequenceClassification

    fresh = BertModel(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    del state["encoder.layer.1.attention.self.value.weight"]
    state["lm_head.dense.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.value\.weight.*strict=False"):
        load_weights(fresh, state, config, "base")
    _, report = load_weights(fresh, state, config, "base", strict=False)
    assert report["missing"] == ["encoder.layer.1.attention.self.value.weight"]
    assert report["unexpected"] == ["lm_head.dense.weight"]
    head = BertForSequenceClassification(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    _, report = load_weights(head, read_state_dict(tmp_path), config, "sequence_classification")
    assert report["new_head"] == ["classifier.dense.bias", "classifier.dense.weight",
                                  "classifier.out_proj.bias", "classifier.out_proj.weight"]
    # RobertaForSequenceClassification has no pooler, so the base checkpoint's pooler is unused
    assert report["missing"] == [] and report["unexpected"] == ["pooler.dense.bias", "pooler.dense.weight"]


def test_shape_mismatch_names_the_weight(tmp_path):
    _small_roberta(tmp_path, True)
    config = read_config(tmp_path)
    state = dict(read_state_dict(tmp_path))
    state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((64, 31), np.float32)
    from lora_jax.models.bert import BertModel

    fresh = BertModel(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(64, 31\)"):
        load_weights(fresh, state, config, "base")


def test_uncached_hub_id_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="(?s)could not get 'no-such-org/no-such-bert'.*packaged:minilm"):
        from_pretrained("no-such-org/no-such-bert")


@pytest.mark.slow
def test_lora_by_peft_names_hits_two_layers_per_block_and_counts_like_peft(minilm):
    peft = pytest.importorskip("peft")
    model, params, _ = minilm
    config = lora_jax.LoraConfig(rank=8, alpha=16, targets=("query", "value"))
    lora_model = lora_jax.lora(model, config)
    ids = jnp.ones((1, 8), jnp.int32)
    lora_params = lora_jax.init_lora_params(lora_model, params, jax.random.key(0), ids)
    adapted = {"/".join(p.key for p in path[:-1])
               for path, _ in jax.tree_util.tree_flatten_with_path(lora_params)[0] if path[-1].key == "lora_A"}
    assert len(adapted) == 2 * 6 and "encoder/layer/5/attention/self/value" in adapted
    ours = lora_jax.count_parameters(lora_params, lora_jax.trainable_mask(lora_params, config))

    reference = transformers.BertModel.from_pretrained(str(packaged_minilm_path()))
    peft_model = peft.get_peft_model(reference, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    theirs = peft_model.get_nb_trainable_parameters()
    assert ours == theirs == (73_728, 22_713_216 + 73_728)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_rematerialised_layers_give_the_same_lora_loss_and_gradients(remat):
    from lora_jax.models import BertConfig, BertForSequenceClassification

    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 num_labels=3)
    plain, rematted = (BertForSequenceClassification(BertConfig(remat=r, **small)) for r in ("none", remat))
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 100, (4, 12)), jnp.int32)
    params = jax.jit(plain.init)(jax.random.key(0), ids)["params"]
    assert jax.tree.structure(jax.eval_shape(rematted.init, jax.random.key(0), ids)["params"]) == \
        jax.tree.structure(params)
    config = lora_jax.LoraConfig(rank=4, alpha=8, targets=("query", "value"), dropout=0.1,
                                 modules_to_save=("classifier",))
    lora_params = lora_jax.init_lora_params(lora_jax.lora(plain, config), params, jax.random.key(1), ids)
    lora_params = jax.tree_util.tree_map_with_path(  # non-zero B, so gradients reach A and the layers below
        lambda p, x: x + 0.05 if p[-1].key == "lora_B" else x, lora_params)
    trainable, frozen = lora_jax.partition(lora_params, lora_jax.trainable_mask(lora_params, config))
    labels = jnp.array([0, 1, 2, 1])

    def loss_and_grads(model):
        net = lora_jax.lora(model, config)

        def loss(t):
            logits = net.apply({"params": lora_jax.combine(t, frozen)}, ids, deterministic=False,
                               rngs=lora_jax.dropout_rngs(jax.random.key(2), "dropout", "lora_dropout"))
            return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels])

        return jax.jit(jax.value_and_grad(loss))(trainable)

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(plain), loss_and_grads(rematted)
    assert abs(float(loss_a) - float(loss_b)) < 1e-6  # the same dropout masks are replayed on recomputation
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(jax.tree.leaves(grads_a)[0]).max()) > 0


def test_unknown_remat_policy_is_refused():
    from lora_jax.models import BertConfig

    with pytest.raises(ValueError, match=r"unknown remat 'everything'; choose from \['dots', 'full', 'none'\]"):
        BertConfig(remat="everything")


def test_broken_model_folders_name_the_file(tmp_path):
    from lora_jax.models import BertConfig

    (tmp_path / "config.json").write_text('{"hidden_size": 32, ')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        from_pretrained(tmp_path, with_tokenizer=False)
    huge = dict(BertConfig().to_dict(), vocab_size=10 ** 12)
    (tmp_path / "config.json").write_text(__import__("json").dumps(huge))
    with pytest.raises(ValueError, match=r"config.json describes a model of [\d,]+ parameters .*vocab_size "
                                         r"1000000000000"):
        from_pretrained(tmp_path, with_tokenizer=False)
    small = dict(BertConfig().to_dict(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=16)
    (tmp_path / "config.json").write_text(__import__("json").dumps(dict(small, num_hidden_layers=-1)))
    with pytest.raises(ValueError, match=r"config.json: num_hidden_layers must be a positive integer, got -1"):
        from_pretrained(tmp_path, with_tokenizer=False)
    (tmp_path / "config.json").write_text(__import__("json").dumps(small))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        from_pretrained(tmp_path, with_tokenizer=False)


@pytest.mark.parametrize("model_type, usable", [("bert", 16), ("roberta", 14)])
def test_inputs_longer_than_the_position_embeddings_are_refused(model_type, usable):
    from lora_jax.models import BertConfig, BertModel

    # BERT positions 0..P-1; RoBERTa's start at pad_token_id + 1 (transformers' 514 positions hold 512 tokens)
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                        max_position_embeddings=16, pad_token_id=1, model_type=model_type)
    model = BertModel(config)
    params = model.init(jax.random.key(0), jnp.full((1, usable), 5))["params"]
    assert model.apply({"params": params}, jnp.full((1, usable), 5))[0].shape == (1, usable, 8)
    with pytest.raises(ValueError, match=rf"input of {usable + 1} tokens: this model's position embeddings cover "
                                         rf"{usable}"):
        jax.jit(lambda ids: model.apply({"params": params}, ids))(jnp.full((1, usable + 1), 5))
