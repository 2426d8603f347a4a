"""Read a safetensors file into numpy arrays, with errors that name the file.

The safetensors format is safe to read from strangers: a JSON header of names, dtypes, shapes and
byte ranges, checked against the file's size before any tensor is read, and no code.

    arrays = read_safetensors("model.safetensors")   # {name: np.ndarray}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of ``path`` as numpy arrays; a truncated or garbage file raises ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, ValueError, TypeError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                         f"it may be truncated or damaged: download or export it again") from None
