"""Loading model files without running code.

``torch.load`` with ``weights_only=True``: tensors, plain containers, numbers and strings only.
A file that needs anything else (a pickled object whose unpickling would call a function) is
refused with :class:`~fracture_ops.errors.UnsafeModelFile`; nothing in it runs. Checkpoints this
package writes hold only such values (the numpy RNG state is stored as a tensor, see
:mod:`fracture_ops.training.loop`).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from fracture_ops.errors import UnsafeModelFile


def load_weights(source: str | Path | bytes, what: str = "model file") -> Any:
    """Load a ``.pt`` file (a path or its bytes) with ``weights_only=True``.

    Raises:
        UnsafeModelFile: the file holds more than weights and plain values.
    """
    import torch

    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeModelFile(f"{what} refused: it holds objects whose loading would run code "
                              "(only tensors and plain values are accepted)") from exc


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists, recursively
    (what :func:`load_weights` accepts besides tensors)."""
    import numpy as np

    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value

