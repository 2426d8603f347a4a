"""The torch-free pytorch_model.bin reader: real checkpoints load exactly; crafted ones never crash or leak."""

import collections
import json
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lora_jax.models import load_torch_bin

torch = pytest.importorskip("torch")

MODULE = Path(__file__).resolve().parents[2] / "lora_jax" / "models" / "torch_pickle.py"


def real_state_dict():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    return collections.OrderedDict(
        weight=torch.randn(3, 5), view=base[1:, 2:5], transposed=torch.randn(2, 3).t(), shared=base[2],
        ids=torch.arange(12, dtype=torch.int64).view(3, 4), half=torch.randn(7).half(),
        bf16=torch.randn(2, 2).bfloat16(), mask=torch.tensor([True, False, True]), scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3), expanded=torch.arange(4.0).view(1, 4).expand(3, 4),
        param=torch.nn.Parameter(torch.randn(2, 2)))


def as_numpy(tensor):
    return tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()


def test_real_checkpoint_loads_every_tensor_exactly(tmp_path):
    state = real_state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = load_torch_bin(tmp_path / "pytorch_model.bin")
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        ours = loaded[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else loaded[name]
        assert ours.shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(ours, as_numpy(tensor), err_msg=name)
        assert loaded[name].flags.writeable  # a copy, not a view of the archive's (read-only) bytes


# ------------------------------------------------------------------------------------------ crafted archives


def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(value: int) -> bytes:
    return b"L" + str(value).encode() + b"L\n"  # pickle LONG opcode: any size, any sign


def crafted_pickle(size, stride, offset=0, numel=1, key="0", storage="FloatStorage") -> bytes:
    """A state dict {'w': _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())}, opcode by opcode."""
    pid = (b"(" + b"X" + len(b"storage").to_bytes(4, "little") + b"storage" + _glob("torch", storage)
           + b"X" + len(key).to_bytes(4, "little") + key.encode() + b"X\x03\x00\x00\x00cpu" + _int(numel) + b"tQ")
    args = (pid + _int(offset) + b"(" + b"".join(map(_int, size)) + b"t" + b"(" + b"".join(map(_int, stride)) + b"t"
            + b"\x89" + _glob("collections", "OrderedDict") + b")R")
    return (b"\x80\x02" + _glob("collections", "OrderedDict") + b")R" + b"X\x01\x00\x00\x00w"
            + _glob("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR" + b"s.")


def crafted_archive(path: Path, pickle_bytes: bytes, storages: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
    return path


ONE_FLOAT = np.float32(1.0).tobytes()


@pytest.mark.parametrize("size, stride, offset, message", [
    ((1_000_000,), (1,), 0, r"reaches element 999999, beyond the storage's 1 elements"),
    ((2,), (100_000_000,), 0, r"reaches element 100000000, beyond"),
    ((4,), (-1,), 0, r"strides \(-1,\); both must be non-negative"),
    ((1,), (1,), 5, r"reaches element 5, beyond"),
    ((1,), (1,), -3, r"storage offset -3"),
    ((-2,), (1,), 0, r"sizes \(-2,\)"),
    ((10 ** 12,), (0,), 0, r"expands 1 stored elements to 1,000,000,000,000"),
])
def test_tensor_metadata_outside_its_storage_is_refused(tmp_path, size, stride, offset, message):
    path = crafted_archive(tmp_path / "pytorch_model.bin", crafted_pickle(size, stride, offset), {"0": ONE_FLOAT})
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        load_torch_bin(path)


def test_a_crafted_in_bounds_tensor_loads(tmp_path):
    path = crafted_archive(tmp_path / "ok.bin", crafted_pickle((2, 2), (0, 1), numel=2),
                           {"0": np.array([1.5, -2.0], np.float32).tobytes()})
    np.testing.assert_array_equal(load_torch_bin(path)["w"], [[1.5, -2.0], [1.5, -2.0]])


def test_archive_level_problems_are_named(tmp_path):
    two = np.zeros(2, np.float32).tobytes()
    cases = {
        "size-mismatch": (crafted_pickle((1,), (1,), numel=1), {"0": two}, "should hold 1 elements = 4 bytes"),
        "missing": (crafted_pickle((1,), (1,)), {}, r"storage 0 is missing from the archive"),
        "unused": (crafted_pickle((1,), (1,)), {"0": ONE_FLOAT, "1": ONE_FLOAT}, r"storages \['1'\] are not used"),
        "foreign-global": (pickle.dumps({"w": print}), {}, "refusing to load 'builtins.print'"),
        "not-a-dict": (pickle.dumps([1, 2]), {}, "holds a list, not a state dict"),
        "bomb-claim": (crafted_pickle((1,), (1,), numel=10 ** 13), {"0": ONE_FLOAT}, "should hold 10,000,000,000,000"),
    }
    for name, (pkl, storages, message) in cases.items():
        path = crafted_archive(tmp_path / f"{name}.bin", pkl, storages)
        with pytest.raises(ValueError, match=f"{path}.*{message}"):
            load_torch_bin(path)
    path = tmp_path / "duplicate.bin"
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zf.writestr("archive/data.pkl", crafted_pickle((1,), (1,)))
        zf.writestr("archive/data/0", ONE_FLOAT)
        zf.writestr("archive/data/0", np.float32(9).tobytes())
    with pytest.raises(ValueError, match=r"duplicate entries \['archive/data/0'\]"):
        load_torch_bin(path)


# ------------------------------------------------------------------------------------------ the fuzz corpus

WORKER = r"""
import importlib.util, json, os, signal, sys
import numpy as np
spec = importlib.util.spec_from_file_location("torch_pickle", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
reference = {k: np.asarray(v) for k, v in np.load(sys.argv[2]).items()}
allowed = np.unique(np.concatenate([v.astype(np.float64).ravel() for v in reference.values()]
                                   + [np.arange(1, 65, dtype=np.float64)]))  # the hostile cases' storage
for case in json.loads(open(sys.argv[3]).read()):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        signal.alarm(20)
        try:
            state = module.load_torch_bin(case)
            same = list(state) == list(reference) and all(
                state[k].shape == reference[k].shape and np.array_equal(state[k].astype(np.float64),
                                                                        reference[k].astype(np.float64))
                for k in reference)
            values = [np.asarray(v, np.float64).ravel() for v in state.values()]
            leak = any(not np.isin(v[np.isfinite(v)], allowed).all() for v in values)
            result = {"outcome": "same" if same else "different", "leak": bool(leak)}
        except ValueError as err:
            result = {"outcome": "error", "message": str(err)}
        except BaseException as err:
            result = {"outcome": "other-exception", "message": f"{type(err).__name__}: {err}"}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    result.update(case=case, exit=os.waitstatus_to_exitcode(status))
    print(json.dumps(result), flush=True)
"""


def _flip(data: bytes, rng, count: int) -> bytes:
    out = bytearray(data)
    for pos in rng.integers(0, len(out), count):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


def _entries(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _rezip(path: Path, entries: list) -> None:
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are one of the damages
        for name, data in entries:
            zf.writestr(name, data)


def fuzz_corpus(folder: Path, original: Path, rng) -> tuple[list[str], list[str]]:
    """(raw cases, semantic cases): raw ones damage the archive's bytes (zip checksums intact); semantic ones
    rebuild a valid zip around damaged or hostile contents."""
    raw_bytes, entries = original.read_bytes(), _entries(original)
    pkl_name = next(n for n in entries if n.endswith("data.pkl"))
    storage_names = [n for n in entries if "/data/" in n]
    raw, semantic = [], []

    def add(kind, data=None, items=None):
        path = folder / f"case{len(raw) + len(semantic):04d}.bin"
        if data is not None:
            path.write_bytes(data)
        else:
            _rezip(path, items)
        (raw if kind == "raw" else semantic).append(str(path))

    for _ in range(120):
        add("raw", _flip(raw_bytes, rng, int(rng.integers(1, 4))))
    for _ in range(30):
        add("raw", raw_bytes[: int(rng.integers(0, len(raw_bytes)))])
    for _ in range(60):  # pickle bytes flipped, valid zip around them
        add("semantic", items=[(n, _flip(d, rng, int(rng.integers(1, 3))) if n == pkl_name else d)
                               for n, d in entries.items()])
    for _ in range(20):  # pickle or a storage truncated
        victim = rng.choice([pkl_name] + storage_names)
        add("semantic", items=[(n, d[: int(rng.integers(0, max(1, len(d))))] if n == victim else d)
                               for n, d in entries.items()])
    for name in storage_names:  # a storage missing, or duplicated
        add("semantic", items=[(n, d) for n, d in entries.items() if n != name])
        add("semantic", items=list(entries.items()) + [(name, entries[name])])
    add("semantic", items=list(entries.items()) + [("archive/data/999", ONE_FLOAT)])
    values = [0, 1, 2, 3, 7, -1, -2, 5, 63, 64, 2 ** 31, 2 ** 40, -(2 ** 40), 10 ** 18]
    storage = np.arange(1, 65, dtype=np.float32).tobytes()  # values 1..64: anything else read would be a leak
    for _ in range(90):  # hostile offsets, sizes and strides
        ndim = int(rng.integers(0, 4))
        size = [int(rng.choice(values)) for _ in range(ndim)]
        stride = [int(rng.choice(values)) for _ in range(ndim)]
        add("semantic", items=[("archive/data.pkl", crafted_pickle(size, stride, int(rng.choice(values)), numel=64)),
                               ("archive/data/0", storage)])
    return raw, semantic


@pytest.mark.slow
def test_fuzzed_checkpoints_never_crash_hang_or_leak(tmp_path):
    """Hundreds of damaged or hostile archives, each loaded in its own forked child process."""
    original = tmp_path / "pytorch_model.bin"
    torch.save(collections.OrderedDict(a=torch.randn(3, 4), b=torch.arange(6).view(2, 3)[:, 1:],
                                       c=torch.randn(5).half(), d=torch.randn(4, 3)), original)
    reference = {k: v for k, v in load_torch_bin(original).items()}
    np.savez(tmp_path / "reference.npz", **reference)
    raw, semantic = fuzz_corpus(tmp_path, original, np.random.default_rng(0))
    (tmp_path / "cases.json").write_text(json.dumps(raw + semantic))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(worker), str(MODULE), str(tmp_path / "reference.npz"),
                           str(tmp_path / "cases.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(raw) + len(semantic) >= 300
    for r in results:
        assert r["exit"] == 0, r  # no crash (a signal gives a negative code), no hang (the alarm kills at 20 s)
        assert r["outcome"] in ("same", "different", "error"), r
        if r["outcome"] == "error":
            assert r["case"] in r["message"], r
        else:
            assert not r["leak"], r  # every value returned was in the archive
    for r in results:
        if r["case"] in raw:
            assert r["outcome"] in ("same", "error"), r  # zip checksums catch every damaged byte
    outcomes = collections.Counter(r["outcome"] for r in results)
    print(f"fuzz outcomes: {dict(outcomes)}")
    assert outcomes["error"] > 200
