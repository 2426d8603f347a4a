"""Folder replacement: never touches what it does not recognise, and a kill at any point loses nothing."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_jax import folder_swap
from lora_jax.folder_swap import recover_folder, replace_folder

ROOT = Path(__file__).resolve().parents[1]


def recognise(path: Path):
    """Test kind: a folder whose only file is VERSION."""
    names = sorted(p.name for p in path.iterdir())
    return None if names == ["VERSION"] else f"it holds {names}"


def writer(version: str):
    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "VERSION").write_text(version)

    return write


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_new_empty_and_recognised_targets_are_written(tmp_path):
    replace_folder(tmp_path / "a", writer("1"), recognise, "a test folder")
    assert (tmp_path / "a" / "VERSION").read_text() == "1"
    replace_folder(tmp_path / "a", writer("2"), recognise, "a test folder")
    assert (tmp_path / "a" / "VERSION").read_text() == "2"
    (tmp_path / "empty").mkdir()
    replace_folder(tmp_path / "empty", writer("3"), recognise, "a test folder")
    assert (tmp_path / "empty" / "VERSION").read_text() == "3"
    assert listing(tmp_path) == ["a", "empty"]  # no hidden leftovers


def test_foreign_folder_and_regular_file_are_refused_and_untouched(tmp_path):
    thesis = tmp_path / "work"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"work exists and is not a test folder \(it holds \['thesis.tex'\]\)"):
        replace_folder(thesis, writer("1"), recognise, "a test folder")
    assert (thesis / "thesis.tex").read_text() == "years of work"
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt exists and is a file"):
        replace_folder(notes, writer("1"), recognise, "a test folder")
    assert notes.read_text() == "keep me"
    assert listing(tmp_path) == ["notes.txt", "work"]  # nothing renamed aside, nothing created


def test_failed_write_removes_its_partial_output_and_keeps_the_old_folder(tmp_path):
    replace_folder(tmp_path / "a", writer("1"), recognise, "a test folder")

    def failing(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "VERSION").write_text("half")
        (tmp.parent / (tmp.name + ".writer-scratch")).mkdir()  # the writer's own temp names go too
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_folder(tmp_path / "a", failing, recognise, "a test folder")
    assert (tmp_path / "a" / "VERSION").read_text() == "1"
    assert listing(tmp_path) == ["a"]


KILLED_SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from lora_jax import folder_swap
    from tests.test_folder_swap import recognise, writer
    renames = []
    real = folder_swap._rename
    def rename(src, dst):
        renames.append((src, dst))
        if len(renames) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # die right before this rename
        real(src, dst)
    folder_swap._rename = rename
    folder_swap.replace_folder(Path(sys.argv[1]), writer("2"), recognise, "a test folder")
""")


@pytest.mark.parametrize("kill_before", [1, 2], ids=["before-moving-old-aside", "between-the-two-renames"])
def test_kill_during_the_swap_is_recovered_by_the_next_call(tmp_path, kill_before):
    target = tmp_path / "a"
    replace_folder(target, writer("1"), recognise, "a test folder")
    script = tmp_path / "swap.py"
    script.write_text(KILLED_SWAP)
    proc = subprocess.run([sys.executable, str(script), str(target), str(kill_before)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    hidden = [n for n in listing(tmp_path) if n.startswith(".a.")]
    assert hidden, "the kill left no leftovers: it did not interrupt a swap"
    if kill_before == 2:
        assert not target.exists()  # the window: only the hidden .old copy holds the data
    assert recover_folder(target, recognise) == (kill_before == 2)
    assert (target / "VERSION").read_text() == "1"  # the save that never returned did not happen
    assert listing(tmp_path) == ["a", "swap.py"]  # leftovers of the killed save are gone
    replace_folder(target, writer("3"), recognise, "a test folder")
    assert (target / "VERSION").read_text() == "3"


def test_rename_seam_is_the_one_used(tmp_path, monkeypatch):
    """The fault-injection tests above patch ``_rename``: make sure the swap really goes through it."""
    calls = []
    monkeypatch.setattr(folder_swap, "_rename", lambda src, dst: (calls.append(dst), os.replace(src, dst)))
    replace_folder(tmp_path / "a", writer("1"), recognise, "a test folder")
    replace_folder(tmp_path / "a", writer("2"), recognise, "a test folder")
    assert len(calls) == 3 and calls[0] == tmp_path / "a" and calls[2] == tmp_path / "a"


def test_folders_named_like_leftovers_but_not_ours_are_never_touched(tmp_path):
    # a user's own folders that happen to look like a swap's leftovers: no marker of ours, so kept
    own = [tmp_path / ".a.old-keep", tmp_path / ".a.tmp-mine", tmp_path / ".a.old-1234abcd"]
    for folder in own:
        folder.mkdir()
        (folder / "VERSION").write_text("user")
    (tmp_path / ".a.swap-1234abcd").write_text("not our marker")  # a marker's name with other content
    replace_folder(tmp_path / "a", writer("1"), recognise, "a test folder")
    assert not recover_folder(tmp_path / "b", recognise)
    recover_folder(tmp_path / "a", recognise)  # what every load runs
    (tmp_path / "a").rename(tmp_path / "gone")  # even with the target missing, a folder not ours stays put
    assert not recover_folder(tmp_path / "a", recognise)
    assert all((folder / "VERSION").read_text() == "user" for folder in own)
    assert listing(tmp_path) == [".a.old-1234abcd", ".a.old-keep", ".a.swap-1234abcd", ".a.tmp-mine", "gone"]


def test_a_swap_stopped_between_its_renames_is_recovered_and_cleaned_up(tmp_path, monkeypatch):
    replace_folder(tmp_path / "a", writer("1"), recognise, "a test folder")
    calls = []

    def failing_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("stopped between the renames")
        os.replace(src, dst)

    monkeypatch.setattr(folder_swap, "_rename", failing_second_rename)
    with pytest.raises(OSError, match="between the renames"):
        replace_folder(tmp_path / "a", writer("2"), recognise, "a test folder")
    assert not (tmp_path / "a").exists()  # the old version waits beside its marker
    monkeypatch.setattr(folder_swap, "_rename", os.replace)
    assert recover_folder(tmp_path / "a", recognise)
    assert (tmp_path / "a" / "VERSION").read_text() == "1" and listing(tmp_path) == ["a"]
