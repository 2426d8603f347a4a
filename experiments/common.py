"""Helpers the experiments share: output folders, JSON results, terminal tables, byte counts."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import numpy as np


def output_dir(out: str | None, experiment: str) -> Path:
    """``out`` if given, else runs/<experiment>/<timestamp>; created."""
    path = Path(out) if out else Path("runs") / experiment / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a results file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (e.g. optimizer state)."""
    return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in jax.tree.leaves(tree)))


def machine_info() -> dict[str, Any]:
    import flax
    import optax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "python": platform.python_version()}


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Print a table with rich (falls back to plain text) and return it as markdown."""
    rows = [[_fmt(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right" if c != columns[0] else "left")
        for row in rows:
            table.add_row(*row)
        Console(width=max(120, Console().width)).print(table)
    except ImportError:
        print(title)
        print("\n".join(" | ".join(r) for r in [list(columns)] + rows))
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return header + "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
