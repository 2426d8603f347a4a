"""Helpers the experiments share: CLI parsing and error reporting, output folders, JSON results,
terminal tables, divergence checks, byte counts."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

# Randomly initialised encoders of a given shape (no download): the bert-base shape, and a tiny one for smoke runs.
CONFIG_MODELS = {
    "bert-base-config": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny-config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=2000, max_position_embeddings=64),
}


def config_model(name: str, num_labels: int, **config: Any) -> tuple[Any, dict]:
    """(model, params) of a randomly initialised ``CONFIG_MODELS[name]`` sequence classifier
    (``config``: further ``BertConfig`` fields, e.g. remat, dtype)."""
    import jax.numpy as jnp

    from lora_jax.models import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(num_labels=num_labels, **config, **CONFIG_MODELS[name]))
    return model, jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]

# ----------------------------------------------------------------------------------- command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every flag's default (a flag whose default is
    None explains its default in its help text)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def make_parser(experiment: str, description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m experiments.{experiment}", description=description,
                                   formatter_class=HelpFormatter)


def _number(kind: Callable[[str], Any], text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(kind: Callable[[str], Any], ok: Callable[[Any], bool], requirement: str, name: str):
    """An argparse ``type`` that parses ``kind`` and requires ``ok(value)``."""

    def parse(text: str) -> Any:
        value = _number(kind, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value

    parse.__name__ = name
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer", "positive_int")
non_negative_int = _checked(int, lambda v: v >= 0, "0 or more", "non_negative_int")
positive_float = _checked(float, lambda v: v > 0, "a positive number", "positive_float")
non_negative_float = _checked(float, lambda v: v >= 0, "0 or more", "non_negative_float")
probability = _checked(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)", "probability")  # dropout, warm-up share
open_fraction = _checked(float, lambda v: 0.0 < v < 1.0, "strictly between 0 and 1", "open_fraction")  # a dev split


def int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (positive, no duplicates)."""
    values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one comma-separated integer")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"lists a value twice: {text}")
    return values


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (non-negative, no duplicates)."""
    values = [non_negative_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"needs distinct comma-separated seeds, got {text!r}")
    return values


def mean_sd(values: Sequence[float], digits: int = 4) -> str:
    """'mean ± sd' (sample sd, ddof=1) of per-seed values; one value: the value alone.

    >>> mean_sd([0.70, 0.74])
    '0.7200 ± 0.0283'
    """
    values = np.asarray(values, float)
    spread = f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{values.mean():.{digits}f}{spread}"


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the updated params became inf or NaN."""


def check_finite(metrics: dict, step: int, where: str, lr: float) -> None:
    """Stop with a clear message at the first non-finite loss, gradient or updated param (``metrics['finite']``)."""
    if bool(metrics["finite"]):
        return
    raise TrainingDiverged(f"{where}: the loss, gradient or updated params became non-finite at step {step} (loss "
                           f"{float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}). Lower the learning "
                           f"rate (now {lr:g}) or check the inputs for NaN/inf; nothing was saved from this run after "
                           f"that step.")


EXPECTED_ERRORS = (OSError, ValueError, ImportError, TrainingDiverged)


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run an experiment's ``main``: a problem with the user's input or environment is printed as one
    message (exit code 2), not a traceback."""
    try:
        main(argv)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------- output


@contextlib.contextmanager
def output_dir(out: str | None, experiment: str) -> Iterator[Path]:
    """``out`` if given, else runs/<experiment>/<timestamp>; created. If the run fails before writing
    anything there, a folder this run created is removed again."""
    path = Path(out).expanduser() if out else Path("runs") / experiment / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file; pass a folder")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created and path.is_dir() and not any(path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        raise


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


def interleaved(fns: dict[str, Callable[[], Any]], steps: int, warmup: int = 2,
                max_seconds: float = float("inf"), min_rounds: int = 3) -> dict[str, dict[str, float]]:
    """Call every function once per round (A B C, A B C, ...): first call (compile), then ``warmup``
    untimed rounds, then ``steps`` timed rounds (fewer, but at least ``min_rounds``, once the timed rounds
    have taken ``max_seconds``). Returns {name: {"first_s", "median_s", "min_s", "rounds"}}."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    began = time.perf_counter()
    for round_ in range(steps):
        if round_ >= min_rounds and time.perf_counter() - began > max_seconds:
            break
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"first_s": first[name], "median_s": statistics.median(t), "min_s": min(t), "rounds": len(t)}
            for name, t in times.items()}
