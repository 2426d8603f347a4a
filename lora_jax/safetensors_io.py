"""Read a safetensors file into numpy arrays, with errors that name the file.

The safetensors format is safe to read from strangers: a JSON header of names, dtypes, shapes and
byte ranges, checked against the file's size before any tensor is read, and no code.

    arrays = read_safetensors("model.safetensors")   # {name: np.ndarray}
    lazy = open_safetensors("model.safetensors")     # a Mapping: each tensor read when asked for
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of ``path`` as numpy arrays; a truncated or garbage file raises ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, ValueError, TypeError, OSError) as err:
        raise _unreadable(path, err) from None


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
           "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER = 100 << 20


class LazySafetensors(Mapping):
    """The tensors of safetensors files, each read only when looked up, straight from the file into a
    fresh array.

    A loader that converts each tensor before asking for the next (``from_pretrained(...,
    quantize='nf4')``) so never holds the whole checkpoint: neither as arrays nor as mapped pages of
    the file (which a memory map kept open counts in the process's resident memory, and even a
    short-lived one doubles while it is copied). The header (names, dtypes, shapes, byte ranges) is
    checked against the file's size when the file is opened.
    """

    def __init__(self, paths: list[Path]):
        self._entries: dict[str, tuple[Path, int, str, tuple[int, ...]]] = {}
        for path in paths:
            self._entries.update(_read_header(path))

    def __getitem__(self, name: str) -> np.ndarray:
        path, offset, dtype, shape = self._entries[name]
        array = np.empty(shape, _numpy_dtype(dtype))
        try:
            with open(path, "rb") as f:  # read into the array: no mapped pages of the file stay resident
                f.seek(offset)
                got = f.readinto(memoryview(array.reshape(-1)).cast("B")) if array.size else 0
        except OSError as err:
            raise _unreadable(path, err) from None
        if got != array.nbytes:
            raise _unreadable(path, ValueError(f"tensor {name!r} is cut short ({got} of {array.nbytes} bytes)"))
        return array

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _read_header(path: Path) -> dict[str, tuple[Path, int, str, tuple[int, ...]]]:
    """{name: (path, byte offset, dtype, shape)} from a safetensors header, every range checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from None
    if not isinstance(header, dict):
        raise _unreadable(path, ValueError("the header is not a JSON object"))
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size:
                raise ValueError(f"byte range {begin}..{end} or shape {shape} outside the data")
            if end - begin != math.prod(shape) * _numpy_dtype(dtype).itemsize:
                raise ValueError(f"byte range of {end - begin} bytes for shape {shape} of {dtype}")
        except (KeyError, TypeError, ValueError) as err:
            raise _unreadable(path, ValueError(f"tensor {name!r}: {err}")) from None
        entries[name] = (path, data_start + begin, dtype, shape)
    return entries


def release_freed_memory() -> None:
    """Hand memory freed by the process back to the operating system (glibc's ``malloc_trim``; a no-op
    elsewhere). A loader calls it after each large transient (a float kernel it just quantized), so
    that the freed space does not stay resident beside what is kept."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def adopt(array: np.ndarray, dtype) -> "jax.Array":
    """``array`` as a jax array of ``dtype`` without a second host copy where it can be had: the
    buffer is handed to jax (aliased on CPU) when it is already contiguous and of that dtype. The
    caller gives up ``array``: a loader that just read it keeps no other reference.

    >>> import jax.numpy as jnp
    >>> adopt(np.arange(3, dtype=np.float32), jnp.float32).tolist()
    [0.0, 1.0, 2.0]
    """
    import jax

    return jax.device_put(np.ascontiguousarray(array, dtype=np.dtype(dtype)), may_alias=True)


def open_safetensors(*paths: str | Path) -> LazySafetensors:
    """The tensors of one safetensors file (or the shards of one checkpoint) as a lazy Mapping."""
    return LazySafetensors([Path(p) for p in paths])


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                      f"it may be truncated or damaged: download or export it again")


def save_params(path: str | Path, params: dict) -> None:
    """Write a param tree of plain arrays as one safetensors file, each leaf named by its path
    joined with '/' (``read_params`` reads it back, one tensor at a time)."""
    from flax import traverse_util
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(params, sep="/")
    save_file({name: np.ascontiguousarray(np.asarray(value)) for name, value in flat.items()}, str(path))


def read_params(path: str | Path, like: dict, convert=None) -> dict:
    """The param tree ``save_params`` wrote, shaped like ``like`` (arrays or ``jax.eval_shape``'s
    structs), each tensor read from the file and handed to ``convert(key, array)``
    (e.g. ``lora_jax.KernelQuantizer``) before the next is read: a quantized load never holds the
    float tree.

    >>> import tempfile, os, jax.numpy as jnp
    >>> from lora_jax import KernelQuantizer, LoraConfig
    >>> folder = tempfile.mkdtemp(); path = os.path.join(folder, "p.safetensors")
    >>> save_params(path, {"fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}})
    >>> like = {"fc": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
    >>> p = read_params(path, like, KernelQuantizer(LoraConfig(rank=1, targets=("fc",)), "int8"))
    >>> type(p["fc"]["kernel"]).__name__
    'QuantizedKernel'
    """
    from flax import traverse_util

    tensors = open_safetensors(path)
    out = {}
    for key, value in traverse_util.flatten_dict(like).items():
        name = "/".join(key)
        if name not in tensors:
            raise ValueError(f"{path} has no tensor '{name}' (it holds {len(tensors)} others)")
        array = tensors[name]
        if tuple(array.shape) != tuple(value.shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(array.shape)}, the model needs "
                             f"{tuple(value.shape)}")
        leaf = adopt(array, value.dtype)
        del array  # before converting: a quantized kernel's float copy is then the leaf's alone
        if convert is not None:
            converted = convert(key, leaf)
            if converted is not leaf:
                del leaf
                release_freed_memory()
            leaf = converted
        out[key] = leaf
    return traverse_util.unflatten_dict(out)
