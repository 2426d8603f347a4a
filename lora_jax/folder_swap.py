"""Replace a folder with a new version so that nothing is lost, whatever stops the process.

The new version is written to a hidden sibling ``.<name>.tmp-<id>`` and swapped in with two
renames: the old folder becomes ``.<name>.old-<id>``, the new one takes its name, and the old one is
removed. Before anything else a marker file ``.<name>.swap-<id>`` is written, and removed last:
only folders whose ``<id>`` has our marker are ever renamed back or removed, so a user's own
``.<name>.old-keep`` is never touched. A process killed between the two renames leaves
``.<name>.old-<id>`` and its marker; ``recover_folder`` (run by every save and every load) renames
it back. Leftover temporary folders of crashed saves are removed by the next save or load. Saves and
recoveries in one parent folder hold an advisory lock on it (POSIX ``flock``), so concurrent writers
never delete each other's work.

Only a folder the caller recognises as its own (or an empty one) is ever replaced: anything else
at the target path is an error, and nothing is touched.

    replace_folder(Path("adapters/a"), write=lambda tmp: save_files_into(tmp), recognise=is_adapter)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

# recognise(path) -> None when ``path`` is a complete folder of the caller's kind, else the reason it is not.
Recognise = Callable[[Path], "str | None"]

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]


def _rename(src: Path, dst: Path) -> None:
    """One atomic rename (a seam for fault-injection tests)."""
    os.replace(src, dst)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``directory`` (a no-op where flock is unavailable)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_MARKER = "lora_jax folder swap in progress\n"  # the content of a swap's marker file


def _swaps(target: Path) -> list[str]:
    """The ids of this process's kind of swap left at ``target``: ``.<name>.swap-<id>`` files holding
    our marker, newest first. A file of that name with other content is not ours."""
    found = []
    for marker in target.parent.glob(f".{target.name}.swap-*"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if marker.is_file() and not marker.is_symlink() and marker.read_text() == _MARKER:
                found.append((marker.stat().st_mtime, marker.name.rsplit(".swap-", 1)[1]))
    return [token for _, token in sorted(found, reverse=True)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_replaceable(target: Path, recognise: Recognise, what: str) -> None:
    """Raise unless ``target`` is absent, an empty folder, or a folder ``recognise`` accepts."""
    if target.is_symlink():
        raise FileExistsError(f"{target} is a symbolic link; refusing to replace it with {what}. Pass the real "
                              f"folder or another path.")
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file, not {what}; refusing to replace it. Choose another "
                              f"path or remove the file yourself.")
    if not any(target.iterdir()):
        return
    reason = recognise(target)
    if reason is not None:
        raise FileExistsError(f"{target} exists and is not {what} ({reason}); refusing to overwrite it, nothing was "
                              f"changed. Choose another path, or empty the folder yourself.")


def recover_folder(target: Path, recognise: Recognise) -> bool:
    """Finish what a killed replacement left behind; call with the parent's lock held.

    Only swaps with our marker are looked at. If ``target`` is missing and a complete
    ``.<name>.old-<id>`` of one exists, it is renamed back (True is returned); the rest of those
    swaps' folders and their markers are removed. Anything else beside ``target`` is left alone.
    """
    if not target.parent.is_dir():
        return False
    restored = False
    tokens = _swaps(target)
    if not target.exists():
        for token in tokens:
            old = target.parent / f".{target.name}.old-{token}"
            if old.is_dir() and not old.is_symlink() and recognise(old) is None:
                _rename(old, target)
                restored = True
                break
    for token in tokens:
        _finish(target, token)
    return restored


def folder_path(path: "str | os.PathLike[str]", what: str) -> Path:
    """The absolute folder a user's ``path`` names: ``~`` expanded; an empty path (which would name
    the current directory) or one whose last part is ``.`` / ``..`` is refused, since swapping it
    would move the working directory itself.

    >>> folder_path("~/adapters/a", "an adapter") == Path.home() / "adapters" / "a"
    True
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the path of {what} must be a str or a pathlib.Path, got {type(path).__name__}")
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError(f"the path of {what} is empty; give a folder name such as 'adapters/mine'")
    given = Path(text).expanduser()
    if given.name in ("", ".", ".."):
        raise ValueError(f"the path of {what} ({text!r}) names a directory by '.' or '..' or the root; give the "
                         f"folder by its own name (e.g. '{Path.cwd().name}' from its parent)")
    return given.absolute()


def _finish(target: Path, token: str) -> None:
    """Remove swap ``token``'s folders (its old version, its temporary ones), then its marker."""
    for leftover in [target.parent / f".{target.name}.old-{token}",
                     *target.parent.glob(f".{target.name}.tmp-{token}*")]:  # the writer's own temp names too
        _remove(leftover)
    _remove(target.parent / f".{target.name}.swap-{token}")


def replace_folder(target: Path, write: Callable[[Path], None], recognise: Recognise, what: str) -> Path:
    """Write a new version of folder ``target`` with ``write(tmp_folder)`` and swap it in.

    ``write`` fills a fresh (not yet existing) path; whatever it raises propagates, its partial
    output is removed, and an existing ``target`` is left as it was.
    """
    target = Path(target).absolute()
    check_replaceable(target, recognise, what)  # before anything is created
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent):
        recover_folder(target, recognise)
        check_replaceable(target, recognise, what)  # again, under the lock
        token = uuid.uuid4().hex[:8]
        marker = target.parent / f".{target.name}.swap-{token}"
        with open(marker, "x", encoding="utf-8") as f:  # first: it makes this swap's folders ours
            f.write(_MARKER)
            f.flush()
            os.fsync(f.fileno())
        tmp = target.parent / f".{target.name}.tmp-{token}"
        try:
            write(tmp)
            if not target.exists():
                _rename(tmp, target)
            else:
                _rename(target, target.parent / f".{target.name}.old-{token}")
                _rename(tmp, target)
        finally:
            if target.exists() or not (target.parent / f".{target.name}.old-{token}").exists():
                _finish(target, token)
            else:  # stopped between the renames: the old version waits, with its marker, for recover_folder
                for partial in target.parent.glob(f".{target.name}.tmp-{token}*"):
                    _remove(partial)
    return target
