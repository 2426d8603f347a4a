"""Checksum-verified, cached, atomic downloads from a list of mirrors."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Sequence


def default_cache_dir(name: str) -> Path:
    root = os.environ.get("LORA_JAX_CACHE") or Path.home() / ".cache" / "lora_jax"
    return Path(root) / name


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(filename: str, mirrors: Sequence[str], cache_dir: Path, md5: str | None = None, timeout: float = 20.0) -> Path:
    """Return ``cache_dir/filename``, downloading it from the first mirror that works.

    The file is written to a temporary name and renamed only once complete and verified, so an
    interrupted download never leaves a truncated file behind. Raises OSError listing each failure.
    """
    target = cache_dir / filename
    if target.exists() and (md5 is None or md5sum(target) == md5):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{filename}.")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            if md5 is not None and (got := md5sum(Path(tmp))) != md5:
                raise OSError(f"checksum mismatch (md5 {got}, expected {md5})")
            os.replace(tmp, target)
            return target
        except Exception as err:  # network, HTTP or checksum: try the next mirror
            errors.append(f"{url}: {type(err).__name__}: {err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"could not download {filename}:\n  " + "\n  ".join(errors))
