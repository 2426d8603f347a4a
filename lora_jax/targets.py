"""Matching of module paths against LoRA patterns (PEFT-style suffixes or ``re:`` regexes)."""

from __future__ import annotations

import functools
import re
from typing import Iterable, Sequence

REGEX_PREFIX = "re:"


def path_str(path: Sequence[str]) -> str:
    """('encoder', 'layer_0', 'query') -> 'encoder/layer_0/query'."""
    return "/".join(str(p) for p in path)


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> tuple[str, object]:
    if pattern.startswith(REGEX_PREFIX):
        try:
            return "regex", re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as err:
            raise ValueError(f"invalid regex in LoRA pattern {pattern!r}: {err}") from None
    parts = tuple(p for p in re.split(r"[./]", pattern) if p)
    if not parts:
        raise ValueError(f"LoRA pattern {pattern!r} names no module")
    return "suffix", parts


def matches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` selects the module at ``path`` ('a/b/c').

    A plain pattern matches a suffix of whole path components ('query', 'self/query',
    'attention.self.query'); ``re:<regex>`` must match the whole path.
    """
    kind, compiled = _compile(pattern)
    if kind == "regex":
        return compiled.fullmatch(path) is not None  # type: ignore[union-attr]
    parts = tuple(path.split("/")) if path else ()
    n = len(compiled)  # type: ignore[arg-type]
    return n <= len(parts) and parts[-n:] == compiled


def any_matches(patterns: Iterable[str], path: str) -> bool:
    return any(matches(p, path) for p in patterns)


def validate_patterns(patterns: Iterable[str]) -> None:
    """Raise ValueError now for a pattern that cannot compile, rather than at trace time."""
    for p in patterns:
        _compile(p)
