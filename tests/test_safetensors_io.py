"""read_safetensors: every tensor back as written, and damaged files named with a fix."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_jax.safetensors_io import read_safetensors


def test_round_trip_of_several_dtypes(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], dtype=np.int64),
               "c": np.ones((0, 4), dtype=np.float16)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    read = read_safetensors(tmp_path / "m.safetensors")
    assert read.keys() == tensors.keys()
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype
        np.testing.assert_array_equal(read[name], value)


def test_truncated_garbage_and_missing_files_are_named(tmp_path):
    save_file({"a": np.ones((64, 64), np.float32)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 40)
    for name in ("cut", "junk"):
        with pytest.raises(ValueError, match=f"{name}.safetensors is not a readable safetensors file.*again"):
            read_safetensors(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError, match="absent.safetensors does not exist"):
        read_safetensors(tmp_path / "absent.safetensors")


def test_lazy_reading_and_param_trees_round_trip(tmp_path):
    import jax
    import jax.numpy as jnp

    from lora_jax.safetensors_io import open_safetensors, read_params, save_params

    params = {"block": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "bias": np.ones(4, np.float32)}}
    save_params(tmp_path / "p.safetensors", params)
    lazy = open_safetensors(tmp_path / "p.safetensors")
    assert sorted(lazy) == ["block/bias", "block/kernel"] and len(lazy) == 2
    np.testing.assert_array_equal(lazy["block/kernel"], params["block"]["kernel"])
    like = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, params))
    seen = []
    back = read_params(tmp_path / "p.safetensors", like, lambda key, v: seen.append(key) or v * 2)
    np.testing.assert_array_equal(back["block"]["kernel"], 2 * params["block"]["kernel"])
    assert seen == [("block", "bias"), ("block", "kernel")]
    with pytest.raises(ValueError, match="has no tensor 'block/scale'"):
        read_params(tmp_path / "p.safetensors", {"block": {"scale": like["block"]["bias"]}})
    with pytest.raises(ValueError, match="'block/bias' has shape \\(4,\\), the model needs \\(5,\\)"):
        read_params(tmp_path / "p.safetensors", {"block": {"bias": jax.ShapeDtypeStruct((5,), jnp.float32)}})


def test_lazy_reader_checks_the_header_against_the_file(tmp_path):
    from lora_jax.safetensors_io import open_safetensors

    save_file({"a": np.ones((64, 64), np.float32)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])  # the header names bytes that are gone
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 40)
    for name in ("cut", "junk"):
        with pytest.raises(ValueError, match=f"{name}.safetensors is not a readable safetensors file.*again"):
            open_safetensors(tmp_path / f"{name}.safetensors")
    np.testing.assert_array_equal(open_safetensors(tmp_path / "m.safetensors")["a"], np.ones((64, 64)))
