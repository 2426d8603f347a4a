"""Read a PyTorch ``pytorch_model.bin`` (zip format) into numpy arrays without importing torch.

The file is untrusted input, so nothing in it is believed before it is checked:

- the pickle may name only tensors, storages and ordered dicts (no other global, so no code runs);
- the archive must have one ``data.pkl`` (at most ``MAX_PICKLE_BYTES``), no duplicate entries, and no
  storage that no tensor uses;
- each storage's declared size must equal what the pickle says it holds (element count × item
  size) before it is read, and all storages together must fit in memory;
- each tensor's offset, sizes and strides must be non-negative integers and its furthest element
  ``offset + Σ (size_i − 1)·stride_i`` must lie inside its storage; a tensor larger than its storage
  (zero strides) is capped at ``MAX_EXPANDED_BYTES``.

Any violation, and any malformed pickle or zip data, raises ``ValueError`` naming the file (and the
tensor or storage). Arrays are copies, never views of the archive's buffers.

    state = load_torch_bin("pytorch_model.bin")   # {name: np.ndarray}
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

MAX_PICKLE_BYTES = 64 << 20
MAX_EXPANDED_BYTES = 64 << 20

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchCheckpointError(ValueError):
    """A pytorch_model.bin is malformed or implausible; the message names the file."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """One storage's bytes as a 1-D array of its dtype (checked against the archive entry)."""

    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path, big_endian: bool):
        super().__init__(file)
        self._archive, self._prefix, self._path, self._big_endian = archive, prefix, path, big_endian
        self.storages: dict[str, _Storage] = {}
        self._storage_bytes = 0

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' from a PyTorch checkpoint")

    def _error(self, what: str) -> TorchCheckpointError:
        return TorchCheckpointError(f"{self._path}: {what}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise self._error(f"unexpected persistent id {pid!r:.100} (expected ('storage', type, key, location, numel))")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise self._error(f"malformed storage reference {pid!r:.100}")
        if key in self.storages:
            storage = self.storages[key]
            if storage.array.dtype != storage_type.dtype or storage.array.size != numel:
                raise self._error(f"storage {key} is referenced with two different types or sizes")
            return storage
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise self._error(f"storage {key} is missing from the archive (no entry {name})") from None
        expected = numel * storage_type.dtype.itemsize
        if info.file_size != expected:
            raise self._error(f"storage {key} ({storage_type.name}) should hold {numel:,} elements = {expected:,} bytes, "
                              f"but its archive entry declares {info.file_size:,} bytes")
        self._storage_bytes += expected
        if self._storage_bytes > _memory_bytes():
            raise self._error(f"its storages declare {self._storage_bytes:,} bytes, more than this machine's memory")
        raw = self._archive.read(name)
        if len(raw) != expected:
            raise self._error(f"storage {key} holds {len(raw):,} bytes, expected {expected:,}")
        dtype = storage_type.dtype.newbyteorder(">") if self._big_endian and storage_type.dtype.itemsize > 1 \
            else storage_type.dtype
        storage = _Storage(key, np.frombuffer(raw, dtype=dtype))
        self.storages[key] = storage
        return storage

    def _rebuild_tensor(self, storage, offset, size, stride, *_unused):
        if not isinstance(storage, _Storage):
            raise self._error(f"a tensor is built from a {type(storage).__name__}, not a storage")
        where = f"a tensor in storage {storage.key}"
        if not _is_int(offset) or offset < 0:
            raise self._error(f"{where} has storage offset {offset!r}; it must be a non-negative integer")
        if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride):
            raise self._error(f"{where} has sizes {size!r:.80} and strides {stride!r:.80} of different lengths")
        if not all(_is_int(s) and s >= 0 for s in size) or not all(_is_int(s) and s >= 0 for s in stride):
            raise self._error(f"{where} has sizes {tuple(size)!r:.80} / strides {tuple(stride)!r:.80}; both must be "
                              f"non-negative integers")
        array = storage.array
        numel = int(np.prod(size, dtype=object)) if size else 1
        if numel == 0:
            if offset > array.size:
                raise self._error(f"{where} has offset {offset} beyond the storage's {array.size} elements")
            return np.zeros(tuple(size), array.dtype.newbyteorder("="))
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= array.size:
            raise self._error(f"{where} (offset {offset}, sizes {tuple(size)}, strides {tuple(stride)}) reaches element "
                              f"{last}, beyond the storage's {array.size} elements")
        if numel > array.size and numel * array.dtype.itemsize > MAX_EXPANDED_BYTES:
            raise self._error(f"{where} expands {array.size} stored elements to {numel:,} (sizes {tuple(size)}); "
                              f"refusing more than {MAX_EXPANDED_BYTES:,} bytes")
        itemsize = array.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(array[offset:], shape=tuple(size),  # in bounds: checked above
                                               strides=tuple(s * itemsize for s in stride), writeable=False)
        return np.array(view, dtype=array.dtype.newbyteorder("="), copy=True)

    def _rebuild_parameter(self, data, *_unused):
        if not isinstance(data, np.ndarray):
            raise self._error(f"a parameter wraps a {type(data).__name__}, not a tensor")
        return data


def load_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a ``torch.save``'d state dict as numpy arrays (keys unchanged).

    Raises ValueError naming ``path`` (and the tensor or storage) for anything malformed or
    implausible; nothing is read outside the archive's own bytes.
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            raise TorchCheckpointError(f"{path} is not a zip-format PyTorch checkpoint (legacy pickles are not "
                                       f"supported; re-save it with a recent torch or convert it to safetensors)")
        with zipfile.ZipFile(path) as archive:
            return _load(archive, path)
    except TorchCheckpointError:
        raise
    except Exception as err:  # whatever malformed bytes make the zip or pickle machinery raise
        raise TorchCheckpointError(f"{path} is not a valid PyTorch checkpoint ({type(err).__name__}: "
                                   f"{str(err)[:200]})") from None


def _load(archive: zipfile.ZipFile, path: Path) -> dict[str, np.ndarray]:
    names = archive.namelist()
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TorchCheckpointError(f"{path}: the archive holds duplicate entries {duplicates[:5]}")
    pickles = [n for n in names if n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchCheckpointError(f"{path}: expected one data.pkl in the archive, found {pickles}")
    info = archive.getinfo(pickles[0])
    if info.file_size > MAX_PICKLE_BYTES:
        raise TorchCheckpointError(f"{path}: data.pkl declares {info.file_size:,} bytes; a state dict's index is far smaller "
                         f"(limit {MAX_PICKLE_BYTES:,})")
    prefix = pickles[0][: -len("/data.pkl")]
    big_endian = f"{prefix}/byteorder" in names and archive.read(f"{prefix}/byteorder").strip() == b"big"
    with archive.open(pickles[0]) as f:
        unpickler = _Unpickler(f, archive, prefix, path, big_endian)
        state = unpickler.load()
    if not isinstance(state, dict):
        raise TorchCheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise TorchCheckpointError(f"{path}: entries {bad[:5]!r:.200} are not named tensors; a state dict maps names to tensors")
    stored = {n[len(prefix) + len("/data/"):] for n in names if n.startswith(f"{prefix}/data/") and not n.endswith("/")}
    unused = sorted(stored - set(unpickler.storages))
    if unused:
        raise TorchCheckpointError(f"{path}: storages {unused[:5]} are not used by any tensor")
    return dict(state)
