"""Adapter folders: round trips, damage named before reading, atomic saves, checks before writing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig, adapter_folders
from tests.helpers import mlp_lora_params as _mlp_lora
from tests.helpers import randomize_lora

ROOT = Path(__file__).resolve().parents[1]


def test_adapter_round_trip_keeps_values_config_and_metadata(tmp_path):
    model, config, params, x = _mlp_lora()
    path = lora_jax.save_adapter(tmp_path / "a", params, config, base_model="mlp-demo")
    adapter = lora_jax.load_adapter(path)
    assert adapter.config == config
    assert adapter.metadata["base_model"] == "mlp-demo" and adapter.metadata["lora_jax_version"]
    assert adapter.metadata["base_fingerprint"] == lora_jax.base_fingerprint(params, lora_jax.trainable_mask(params, config))
    chex.assert_trees_all_equal(adapter.params, lora_jax.extract_adapter(params, config).params)
    _, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    restored = lora_jax.apply_adapter(frozen, adapter)
    np.testing.assert_array_equal(model.apply({"params": restored}, x), model.apply({"params": params}, x))


def test_loading_onto_a_different_base_names_leaf_and_shapes(tmp_path):
    _, config, params, _ = _mlp_lora(width=16)
    lora_jax.save_adapter(tmp_path / "a", params, config)
    _, _, other, _ = _mlp_lora(width=12)
    _, other_base = lora_jax.partition(other, lora_jax.trainable_mask(other, config))
    with pytest.raises(ValueError, match=r"'fc1/lora_A' has shape \(10, 2\).*lora_B \(2, 16\).*'fc1/kernel' of shape \(10, 12\)"):
        lora_jax.load_adapter(tmp_path / "a", base_params=other_base)
    with pytest.raises(ValueError, match="'fc2/scale' has no counterpart in the base module 'fc2'"):
        lora_jax.apply_adapter(other_base, {"fc2": {"scale": jnp.zeros(8)}})
    with pytest.raises(ValueError, match=r"'fc3/kernel' has shape \(8, 3\), but the base leaf has shape \(8, 4\)"):
        lora_jax.apply_adapter({**other_base, "fc3": {"kernel": jnp.zeros((8, 4))}}, {"fc3": {"kernel": jnp.zeros((8, 3))}})


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
        lora_jax.load_adapter(tmp_path / "nothing-here")


def test_each_damaged_file_is_named_or_the_load_returns_the_original(tmp_path):
    """Damage every file of a saved adapter in turn (zeroed, truncated, one byte flipped, deleted)."""
    _, config, params = _mlp_lora()[:3]
    original = lora_jax.save_adapter(tmp_path / "orig", params, config)
    expected = lora_jax.extract_adapter(params, config).params
    files = sorted(str(f.relative_to(original)) for f in original.rglob("*") if f.is_file())
    assert len(files) > 10
    for rel in files:
        for damage in ("zero", "truncate", "flip", "delete"):
            case = tmp_path / "case"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(original, case)
            target = case / rel
            raw = target.read_bytes()
            if damage == "delete":
                target.unlink()
            else:
                damaged = {"zero": b"\0" * len(raw), "truncate": raw[: len(raw) // 2],
                           "flip": raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF]) + raw[len(raw) // 2 + 1:]}
                target.write_bytes(damaged[damage])
            try:
                adapter = lora_jax.load_adapter(case)
            except ValueError as err:
                assert str(case) in str(err), (rel, damage, err)
                assert rel in str(err) or "lora_jax_adapter.json" in str(err), (rel, damage, err)
                continue
            chex.assert_trees_all_equal(adapter.params, expected)  # a file the load does not need
            assert adapter.config == config


def test_saving_over_a_folder_that_is_not_an_adapter_is_refused_and_touches_nothing(tmp_path):
    _, config, params = _mlp_lora()[:3]
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"work exists and is not a lora_jax adapter.*thesis\.tex"):
        lora_jax.save_adapter(work, params, config)
    assert (work / "thesis.tex").read_text() == "years of work"
    notes = tmp_path / "notes"
    notes.write_text("keep me")
    with pytest.raises(FileExistsError, match="notes exists and is a file"):
        lora_jax.save_adapter(notes, params, config)
    assert notes.read_text() == "keep me"
    adapter = lora_jax.save_adapter(tmp_path / "adapter", params, config)
    (adapter / "my_notes.md").write_text("mine")  # a user file dropped into an adapter folder
    with pytest.raises(FileExistsError, match=r"also holds \['my_notes.md'\]"):
        lora_jax.save_adapter(adapter, params, config)
    assert (adapter / "my_notes.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "notes", "work"]


def test_an_adapter_saved_without_manifest_is_still_recognised(tmp_path):
    """Adapters written by lora_jax 0.1.0 have no lora_jax_adapter.json: they load and may be overwritten."""
    _, config, params = _mlp_lora()[:3]
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    (path / "lora_jax_adapter.json").unlink()
    chex.assert_trees_all_equal(lora_jax.load_adapter(path).params, lora_jax.extract_adapter(params, config).params)
    newer = randomize_lora(params, seed=9)
    lora_jax.save_adapter(path, newer, config)
    chex.assert_trees_all_equal(lora_jax.load_adapter(path).params, lora_jax.extract_adapter(newer, config).params)


KILLED_ADAPTER_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax
    import lora_jax
    from lora_jax import folder_swap
    from tests.helpers import mlp_lora_params as _mlp_lora
    from tests.helpers import randomize_lora
    _, config, params = _mlp_lora()[:3]
    renames = []
    real = folder_swap._rename
    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:  # the old adapter is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    folder_swap._rename = rename
    lora_jax.save_adapter(sys.argv[1], randomize_lora(params, seed=7), config)
""")


def test_adapter_save_killed_between_renames_is_restored_by_load(tmp_path):
    _, config, params = _mlp_lora()[:3]
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_ADAPTER_SAVE)
    proc = subprocess.run([sys.executable, str(script), str(path)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not path.exists() and any(p.name.startswith(".a.old-") for p in tmp_path.iterdir())
    restored = lora_jax.load_adapter(path)
    chex.assert_trees_all_equal(restored.params, lora_jax.extract_adapter(params, config).params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "killed.py"]


def test_adapter_on_a_base_with_other_weights_is_refused_unless_not_strict(tmp_path):
    _, config, params = _mlp_lora()[:3]
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    _, base = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    lora_jax.load_adapter(path, base_params=base)  # its own base
    other = jax.tree.map(lambda x: x * 0.5, base)  # same shapes, other weights
    with pytest.raises(lora_jax.BaseMismatchError, match="trained on a different base"):
        lora_jax.load_adapter(path, base_params=other)
    adapter = lora_jax.load_adapter(path)
    with pytest.raises(lora_jax.BaseMismatchError):
        lora_jax.apply_adapter(other, adapter)
    with pytest.warns(UserWarning, match="different base"):
        lora_jax.apply_adapter(other, adapter, strict=False)


def test_config_whose_targets_miss_saved_lora_leaves_is_an_error(tmp_path):
    _, config, params = _mlp_lora()[:3]
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    config_file = path / "config" / "metadata"
    edited = json.loads(config_file.read_text())
    edited["targets"] = ["fc1"]  # fc2 still holds lora_A / lora_B
    config_file.write_text(json.dumps(edited))
    adapter_folders._write_manifest(path)
    with pytest.raises(ValueError, match=r"lora_A/lora_B for layers its config does not target \(\['fc2'\]"):
        lora_jax.load_adapter(path)


def test_an_implausibly_large_saved_shape_is_refused_before_allocating(tmp_path):
    tensorstore = pytest.importorskip("tensorstore")
    _, config, params = _mlp_lora()[:3]
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{path}/params/"}, "path": "fc1.lora_A"}
    array = tensorstore.open(spec).result()
    array.resize(exclusive_max=[10 ** 6, 10 ** 6], resize_metadata_only=True, expand_only=True).result()
    adapter_folders._write_manifest(path)  # as a hostile file would: consistent, and huge
    with pytest.raises(ValueError, match=r"4,000,000,000,\d+ bytes, more than this machine's memory"):
        lora_jax.load_adapter(path)


def test_failed_overwrite_keeps_the_previous_adapter(tmp_path, monkeypatch):
    _, config, params, _ = _mlp_lora()
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    import orbax.checkpoint as ocp

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        lora_jax.save_adapter(path, randomize_lora(params, seed=5), config)
    chex.assert_trees_all_equal(lora_jax.load_adapter(path).params, lora_jax.extract_adapter(params, config).params)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp folder left behind


@pytest.mark.slow
def test_minilm_adapter_size_on_disk_within_10_percent_of_raw(tmp_path):
    from lora_jax.models import from_pretrained

    model, params, _ = from_pretrained("packaged:minilm", task="base", with_tokenizer=False)
    config = LoraConfig(rank=8, alpha=16, targets=("query", "value"))
    lora_params = randomize_lora(lora_jax.init_lora_params(lora_jax.lora(model, config), params, jax.random.key(0),
                                                           jnp.ones((1, 8), jnp.int32)))
    path = lora_jax.save_adapter(tmp_path / "minilm", lora_params, config, base_model="packaged:minilm")
    raw = sum(x.nbytes for x in jax.tree.leaves(lora_jax.extract_adapter(lora_params, config).params))
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert raw == 73_728 * 4
    assert on_disk <= 1.10 * raw, (on_disk, raw)




def test_saving_and_loading_print_nothing_even_for_a_damaged_adapter(tmp_path, capfd):
    _, config, params = _mlp_lora()[:3]
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    lora_jax.load_adapter(path)
    data = next(f for f in (path / "params" / "d").iterdir())
    data.write_bytes(b"\x00" * 17)
    with pytest.raises(ValueError, match=r"file params/d/\w+ is damaged"):
        lora_jax.load_adapter(path)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured


def test_saving_and_loading_never_delete_a_users_folders_named_like_leftovers(tmp_path):
    _, config, params = _mlp_lora()[:3]
    path = lora_jax.save_adapter(tmp_path / "x", params, config)
    own = [tmp_path / ".x.old-keep", tmp_path / ".x.tmp-notes", tmp_path / ".x.old-0a1b2c3d"]
    for folder in own:
        folder.mkdir()
        (folder / "mine.txt").write_text("user data")
    lora_jax.load_adapter(path)  # a read call
    lora_jax.save_adapter(path, params, config)  # an overwrite
    assert all((folder / "mine.txt").read_text() == "user data" for folder in own)


def test_a_non_finite_adapter_is_neither_saved_nor_loaded_unless_asked(tmp_path):
    _, config, params, _ = _mlp_lora()
    good = lora_jax.save_adapter(tmp_path / "a", params, config)
    before = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    diverged = jax.tree.map(lambda x: x, params)
    diverged["fc2"]["lora_B"] = diverged["fc2"]["lora_B"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"leaves \['fc2/lora_B'\] hold inf or NaN .*nothing was saved"):
        lora_jax.save_adapter(good, diverged, config)
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before  # the good one is untouched
    kept = lora_jax.save_adapter(tmp_path / "b", diverged, config, allow_nonfinite=True)
    with pytest.raises(ValueError, match=r"holds inf or NaN in \['fc2/lora_B'\]"):
        lora_jax.load_adapter(kept)
    assert np.isnan(lora_jax.load_adapter(kept, allow_nonfinite=True).params["fc2"]["lora_B"][0, 0])


def test_a_config_missing_saved_layers_is_refused_before_writing(tmp_path):
    _, config, params, _ = _mlp_lora()
    with pytest.raises(ValueError, match=r"lora_A/lora_B for layers its config does not target \(\['fc2'\]"):
        lora_jax.save_adapter(tmp_path / "a", params, config.replace(targets=("fc1",)))
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())


def test_adapter_paths_expand_home_and_refuse_the_current_directory(tmp_path, monkeypatch):
    _, config, params, _ = _mlp_lora()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = lora_jax.save_adapter("~/adapters/a", params, config)
    assert path == tmp_path / "home" / "adapters" / "a" and not (tmp_path / "~").exists()
    assert lora_jax.load_adapter("~/adapters/a").config == config
    for bad in ("", " ", ".", "sub/.."):
        with pytest.raises(ValueError, match="the path of the adapter"):
            lora_jax.save_adapter(bad, params, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.parametrize("metadata, message", [
    ({"labels": np.array(["a", "b"])}, r"metadata\['labels'\] is a numpy.ndarray, not JSON"),
    ({"threshold": np.float32(0.5)}, r"metadata\['threshold'\] is a numpy.float32"),
    ({"curve": [1.0, float("nan")]}, r"metadata\['curve'\]\[1\] is nan"),
    ({1: "x"}, r"has the key 1 \(int\)"),
    ({"base_fingerprint": 123}, r"metadata\['base_fingerprint'\] must be a string"),
])
def test_metadata_that_is_not_json_is_refused_before_anything_is_written(tmp_path, metadata, message):
    _, config, params, _ = _mlp_lora()
    with pytest.raises(ValueError, match=message):
        lora_jax.save_adapter(tmp_path / "a", params, config, metadata=metadata)
    assert not list(tmp_path.iterdir())  # no orbax temp folder either


@pytest.mark.parametrize("field, value", [("base_fingerprint", 123), ("base_fingerprint", ["sha256:00"]),
                                          ("base_model", {"name": "x"})])
def test_forged_metadata_fields_are_named_on_load(tmp_path, field, value):
    _, config, params, _ = _mlp_lora()
    path = lora_jax.save_adapter(tmp_path / "a", params, config)
    meta_file = path / "metadata" / "metadata"
    edited = json.loads(meta_file.read_text())
    edited[field] = value
    meta_file.write_text(json.dumps(edited))
    adapter_folders._write_manifest(path)  # as a forger would
    with pytest.raises(ValueError, match=rf"\['{field}'\] must be a string"):
        lora_jax.load_adapter(path)


