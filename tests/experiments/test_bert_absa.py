"""The ABSA experiment: BERT-SPC batching, flags, predict rows, class weights, a seconds-scale pipeline run."""

import json

import numpy as np
import pytest


def test_bucketed_batches_have_few_shapes_and_cover_every_example():
    from experiments.bert_absa import BUCKETS, batches

    rng = np.random.RandomState(0)
    encoded = [{"ids": [1] * n, "types": [0] * n, "label": n % 3} for n in rng.randint(5, 120, size=203)]
    seen, shapes = [], set()
    for b in batches(encoded, 16, 128, 0, np.random.RandomState(1)):
        shapes.add(b["ids"].shape)
        real = b["index"] >= 0
        assert b["weight"].tolist() == real.astype(float).tolist()
        seen += b["index"][real].tolist()
        for row, i in zip(b["mask"][real], b["index"][real]):
            assert row.sum() == len(encoded[i]["ids"])
    assert sorted(seen) == list(range(203))
    assert all(s[0] == 16 and s[1] in BUCKETS for s in shapes) and len(shapes) <= 5


def _write_tiny_semeval(folder, n=48):
    words = {0: "terrible", 1: "okay", 2: "wonderful"}
    aspects = ["battery", "screen", "keyboard", "price"]
    for name, count in (("Laptops_Train.xml.seg", n), ("Laptops_Test_Gold.xml.seg", n // 2)):
        lines = []
        for i in range(count):
            label = i % 3
            lines += [f"the $T$ is {words[label]} .", aspects[i % 4], str(label - 1)]
        (folder / name).write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_pipeline_smoke_train_then_predict(tmp_path, tiny_bert_dir):
    from experiments import bert_absa

    _write_tiny_semeval(tmp_path)
    args = ["train", "--data-dir", str(tmp_path), "--model", str(tiny_bert_dir), "--epochs", "2", "--batch-size", "8",
            "--eval-batch-size", "8", "--max-len", "32", "--lr", "3e-3"]
    bert_absa.main(args + ["--out", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    run = saved["runs"][0]
    hidden, layers, rank, labels = 32, 2, 8, 3  # LoRA on query and value of each layer, the classifier in full
    assert run["mode"] == "lora" and run["trainable_params"] == layers * 2 * 2 * hidden * rank + hidden * labels + labels
    assert run["encoder_trainable_params"] / run["encoder_total_params"] < 0.01
    assert set(run["test"]) >= {"accuracy", "macro_f1", "per_class_f1", "confusion"}
    assert np.array(run["test"]["confusion"]).sum() == 24
    for plot in ("training_curves.png", "confusion_matrix.png"):
        assert (tmp_path / "run" / plot).stat().st_size > 1000

    results = bert_absa.main(["predict", "--adapter", run["adapter_dir"], "The battery is wonderful .",
                              "--aspect", "battery", "--aspect", "screen"])
    assert [r["aspect"] for r in results] == ["battery", "screen"]
    for r in results:
        assert set(r["probabilities"]) == {"negative", "neutral", "positive"}
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-3
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"sentence": f"The battery is {w} .", "aspect": "battery"}) + "\n"
                            for w in ("wonderful", "terrible", "okay")))
    bert_absa.main(["predict", "--adapter", run["adapter_dir"], "--input", str(rows), "--output",
                    str(tmp_path / "predictions.csv"), "--batch-size", "2"])
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "sentence,aspect,sentiment,p_negative,p_neutral,p_positive" and len(lines) == 4
    assert lines[1].startswith("The battery is wonderful .,battery,")


@pytest.mark.slow
def test_quantized_base_trains_and_its_adapter_predicts_on_the_same_quantized_base(tmp_path, tiny_bert_dir):
    from experiments import bert_absa

    _write_tiny_semeval(tmp_path)
    bert_absa.main(["train", "--data-dir", str(tmp_path), "--model", str(tiny_bert_dir), "--epochs", "1",
                    "--batch-size", "8", "--eval-batch-size", "8", "--max-len", "32", "--quantize", "nf4",
                    "--out", str(tmp_path / "run")])
    run = json.loads((tmp_path / "run" / "results.json").read_text())["runs"][0]
    # predict quantizes the base again from the adapter's metadata: the base fingerprint matches
    results = bert_absa.main(["predict", "--adapter", run["adapter_dir"], "The battery is wonderful .",
                              "--aspect", "battery"])
    assert len(results) == 1
    with pytest.raises(ValueError, match="--quantize stores the frozen base quantized for LoRA"):
        bert_absa.main(["train", "--data-dir", str(tmp_path), "--full-finetune", "--quantize", "int8"])


def test_seed_summary_gives_mean_and_sample_sd_per_mode():
    from experiments.bert_absa import summarize

    def run(mode, seed, acc, f1):
        return {"mode": mode, "seed": seed, "trainable_params": 10 if mode == "lora" else 100, "train_time_s": 2.0,
                "test": {"accuracy": acc, "macro_f1": f1}}

    runs = [run("lora", 0, 0.70, 0.60), run("full", 0, 0.74, 0.66), run("lora", 1, 0.74, 0.64),
            run("full", 1, 0.74, 0.70)]
    assert summarize(runs) == [["lora", 2, 10, "0.7200 ± 0.0283", "0.6200 ± 0.0283", 2.0],
                               ["full", 2, 100, "0.7400 ± 0.0000", "0.6800 ± 0.0283", 2.0]]
    assert summarize(runs[:2])[0][3:5] == ["0.7000", "0.6000"]  # one seed: no spread


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--lr", "0"), ("--lr", "-1"), ("--batch-size", "0"),
                                         ("--max-len", "0"), ("--dev-fraction", "1.5"), ("--dev-fraction", "0"),
                                         ("--limit", "0"), ("--lora-dropout", "1"), ("--seeds", "0,0"),
                                         ("--warmup", "-0.1"), ("--rank", "0")])
def test_bad_train_flags_are_refused_at_parse_time(flag, value, capsys):
    from experiments import bert_absa

    with pytest.raises(SystemExit) as exit_info:
        bert_absa.parse_args(["train", flag, value])
    assert exit_info.value.code == 2
    assert "argument " + flag in capsys.readouterr().err or "--max-len" in flag


def test_predict_rows_refuse_empty_input_and_warn_about_absent_aspects_by_row(tmp_path):
    from experiments.bert_absa import check_rows, read_rows

    with pytest.raises(ValueError, match="nothing to predict"):
        check_rows([])
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"sentence": "Great battery.", "aspect": "battery"}\n\n{"sentence": " ", "aspect": "x"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:3: the sentence is empty"):
        check_rows(read_rows(rows))
    rows.write_text('{"sentence": "Great battery.", "aspect": "battery"}\n{"sentence": "Great battery.", '
                    '"aspect": "screen"}\n')
    with pytest.warns(UserWarning, match=r"rows.jsonl:2: aspect 'screen' does not occur in the sentence"):
        check_rows(read_rows(rows))
    rows.write_text('{"sentence": "no aspect"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: expected \{"):
        read_rows(rows)


def test_balanced_class_weights_give_every_class_the_same_total_weight():
    from experiments.bert_absa import class_weights

    labels = np.array([0, 0, 0, 0, 1, 2, 2, 2])
    weights = class_weights(labels, "balanced")
    np.testing.assert_allclose(weights, [8 / (3 * 4), 8 / (3 * 1), 8 / (3 * 3)], rtol=1e-6)
    totals = np.bincount(labels, weights=weights[labels])
    np.testing.assert_allclose(totals, [8 / 3] * 3, rtol=1e-6)  # each class sums to n / K
    np.testing.assert_array_equal(class_weights(labels, "none"), [1, 1, 1])
    assert np.isfinite(class_weights(np.array([0, 0, 2]), "balanced")).all()  # an absent class gets a finite weight


def _tiny_adapter(folder, tiny_bert_dir, metadata=None, scale_b=0.0):
    """An adapter for the tiny BERT saved as train saves one (its lora_B set to ``scale_b``)."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from experiments.bert_absa import LABELS
    from lora_jax.models import from_pretrained

    model, base, _ = from_pretrained(str(tiny_bert_dir), num_labels=len(LABELS), with_tokenizer=False)
    config = lora_jax.LoraConfig(rank=2, targets=("query", "value"), modules_to_save=("classifier",))
    params = lora_jax.init_lora_params(lora_jax.lora(model, config), base, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.full_like(v, scale_b) if "lora_B" in str(path[-1]) else v, params)
    meta = {"task": "aspect_sentiment", "labels": list(LABELS), "max_len": 32, "quantize": "none", **(metadata or {})}
    return lora_jax.save_adapter(folder, params, config, base_model=str(tiny_bert_dir), metadata=meta)


@pytest.mark.parametrize("metadata, message", [
    ({"labels": ["negative", "positive"]}, r"metadata 'labels' must list 3 distinct names"),
    ({"labels": "negative,neutral,positive"}, r"metadata 'labels' must list 3"),
    ({"max_len": 0}, r"metadata 'max_len' must be an integer of at least 8"),
    ({"max_len": 100000}, r"metadata 'max_len' 100000 exceeds the 64 tokens"),
    ({"quantize": "fp4"}, r"metadata 'quantize' must be 'none', 'int8' or 'nf4', got 'fp4'"),
])
def test_predict_names_forged_adapter_metadata(tmp_path, tiny_bert_dir, metadata, message):
    from experiments import bert_absa

    adapter = _tiny_adapter(tmp_path / "adapter", tiny_bert_dir, metadata)
    with pytest.raises(ValueError, match=message):
        bert_absa.main(["predict", "--adapter", str(adapter), "The battery is great .", "--aspect", "battery"])


def test_predict_refuses_nan_outputs_and_a_folder_as_output_before_inference(tmp_path, tiny_bert_dir, monkeypatch):
    from experiments import bert_absa

    good = _tiny_adapter(tmp_path / "good", tiny_bert_dir)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(bert_absa.lora_jax, "load_adapter", lambda *a, **k: pytest.fail("read the adapter first"))
    with pytest.raises(ValueError, match=r"--output .*out is a folder; give a file"):
        bert_absa.main(["predict", "--adapter", str(good), "Great .", "--aspect", "Great", "--output",
                        str(tmp_path / "out")])
    monkeypatch.undo()
    assert list((tmp_path / "out").iterdir()) == []
    overflowing = _tiny_adapter(tmp_path / "huge", tiny_bert_dir, scale_b=3e38)  # finite weights, inf outputs
    with pytest.raises(ValueError, match=r"outputs NaN or inf for rows \['--aspect 1'\].*nothing was written"):
        bert_absa.main(["predict", "--adapter", str(overflowing), "The battery is great .", "--aspect", "battery",
                        "--output", str(tmp_path / "p.jsonl")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "huge", "out"]


def test_seg_files_with_a_byte_order_mark_and_splits_left_empty_by_limit(tmp_path):
    from experiments import bert_absa
    from experiments.data.semeval import read_seg

    seg = tmp_path / "rows.seg"
    seg.write_bytes("\ufeffthe $T$ is great .\nbattery\n1\n".encode("utf-8"))
    assert read_seg(seg)[0].sentence == "the battery is great ."
    _write_tiny_semeval(tmp_path)
    with pytest.raises(ValueError, match=r"the dev split would be empty \(8 training examples, 10% held out"):
        bert_absa.main(["train", "--data-dir", str(tmp_path), "--limit", "8", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
