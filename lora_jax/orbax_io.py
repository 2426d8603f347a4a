"""Orbax calls without their routine console output, and errors shortened for a message."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Orbax logs routine warnings through absl; keep them off the user's terminal."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def short_error(err: BaseException, limit: int = 300) -> str:
    """An error's first line, shortened: storage errors can carry whole TensorStore specs.

    >>> short_error(ValueError("first line\\nsecond"))
    'first line'
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
