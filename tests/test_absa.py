"""SemEval-2014 loader, BERT-SPC batching, and a seconds-scale run of the whole ABSA pipeline."""

import json

import numpy as np
import pytest

from experiments.data import semeval
from experiments.data.semeval import load_semeval, read_seg, read_xml
from tests.conftest import SHARED_DATA

SEMEVAL = SHARED_DATA / "semeval14"

XML = """<?xml version="1.0" encoding="UTF-8"?>
<sentences>
  <sentence id="1"><text>The battery life is amazing but the camera is terrible.</text>
    <aspectTerms>
      <aspectTerm term="battery life" polarity="positive" from="4" to="16"/>
      <aspectTerm term="camera" polarity="negative" from="36" to="42"/>
    </aspectTerms></sentence>
  <sentence id="2"><text>Screen is fine, speakers are so-so.</text>
    <aspectTerms><aspectTerm term="Screen" polarity="conflict" from="0" to="6"/>
    <aspectTerm term="speakers" polarity="neutral" from="16" to="24"/></aspectTerms></sentence>
  <sentence id="3"><text>No aspects here.</text></sentence>
</sentences>
"""


@pytest.mark.skipif(not SEMEVAL.exists(), reason="shared SemEval data not present")
def test_shared_laptops_split_loads_with_expected_counts():
    data = load_semeval("laptops", SEMEVAL, log=lambda *_: None)
    assert len(data["train"]) == 2328 and len(data["test"]) == 638
    assert np.bincount([e.label for e in data["train"]]).tolist() == [870, 464, 994]
    first = data["train"][0]
    assert first.aspect == "cord" and "$T$" not in first.sentence and "cord" in first.sentence and first.label == 1


def test_official_xml_drops_conflict_unless_asked(tmp_path):
    path = tmp_path / "Laptop_Train_v2.xml"
    path.write_text(XML)
    examples = read_xml(path)
    assert [(e.aspect, e.label) for e in examples] == [("battery life", 2), ("camera", 0), ("speakers", 1)]
    assert [e.label for e in read_xml(path, keep_conflict=True)] == [2, 0, 3, 1]


def test_malformed_files_name_file_and_line(tmp_path):
    seg = tmp_path / "Laptops_Train.xml.seg"
    seg.write_text("good $T$ here\nscreen\n1\nbad sentence without placeholder\nscreen\n1\n")
    with pytest.raises(ValueError, match=r"Laptops_Train\.xml\.seg:4: sentence has no \$T\$"):
        read_seg(seg)
    seg.write_text("good $T$ here\nscreen\n2\n")
    with pytest.raises(ValueError, match=r"Laptops_Train\.xml\.seg:3: polarity must be -1, 0 or 1, got '2'"):
        read_seg(seg)
    seg.write_text("good $T$ here\nscreen\n")
    with pytest.raises(ValueError, match="not a multiple of 3"):
        read_seg(seg)
    bad = tmp_path / "bad.xml"
    bad.write_text("<sentences>\n<sentence id='1'><text>x</text>\n</sentences>\n")
    with pytest.raises(ValueError, match=r"bad\.xml:3: malformed XML"):
        read_xml(bad)


def test_missing_data_offline_names_files_and_flag(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"does not hold the SemEval-2014 laptops files: expected "
                                                r"Laptops_Train\.xml\.seg \+ Laptops_Test_Gold\.xml\.seg"):
        load_semeval("laptops", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data not found: pass --data-dir DIR with Laptops_Train\.xml\.seg"):
        load_semeval("laptops", cache_dir=tmp_path / "empty", download=False)

    def offline(*args, **kwargs):
        raise OSError("could not download Laptops_Train.xml.seg:\n  mirror: URLError: no network")

    monkeypatch.setattr(semeval, "fetch", offline)
    with pytest.raises(FileNotFoundError, match=r"download failed \(mirror: URLError: no network\)\. Pass --data-dir"):
        load_semeval("laptops", cache_dir=tmp_path / "cache")


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


def test_non_utf8_and_empty_files_are_named(tmp_path):
    seg = tmp_path / "Laptops_Train.xml.seg"
    seg.write_bytes(b"good $T$ here\nscreen\n1\n\xff\xfe bad $T$\nkeys\n0\n")
    with pytest.raises(ValueError, match=r"Laptops_Train\.xml\.seg:4: not UTF-8 text \(byte 0xff"):
        read_seg(seg)
    seg.write_text("\n\n")
    with pytest.raises(ValueError, match=r"Laptops_Train\.xml\.seg is empty"):
        read_seg(seg)
    xml = tmp_path / "Laptop_Train_v2.xml"
    xml.write_text("<sentences><sentence id='1'><text>No aspects.</text></sentence></sentences>")
    with pytest.raises(ValueError, match="holds no aspect terms"):
        read_xml(xml)


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
