"""The calibration and thresholds documents that calibrate and tune_thresholds write, and that
evaluation, Grad-CAM, packaging and the pyfunc model read: ``calibration.json`` (a fitted
:class:`~fracture_ops.model.calibrators.Calibrator`) and ``thresholds.json`` (one threshold per
class, with the calibration method it was tuned under).
"""

from __future__ import annotations

import logging

import numpy as np

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.errors import BadInputError
from fracture_ops.model.calibrators import Calibrator

log = logging.getLogger(__name__)

CALIBRATION_FILE = catalog.CALIBRATION.file
THRESHOLDS_FILE = catalog.THRESHOLDS.file
DEFAULT_THRESHOLD = 0.5


def resolve_document(uri: str, filename: str) -> str:
    """Accept a step folder or the JSON file itself; return the file's URI ("" stays "")."""
    if not uri or uri.endswith(".json"):
        return uri
    return storage.join(uri, filename)


def read_calibrator(uri: str, task: str) -> Calibrator:
    """The calibrator stored at ``uri`` (folder or calibration.json), or method ``none`` when empty.

    Raises:
        BadInputError: the file is missing or was fitted for another task.
    """
    path = resolve_document(uri, CALIBRATION_FILE)
    if not path:
        return Calibrator("none", task)
    if not storage.exists(path):
        raise BadInputError(f"calibration file not found: {path}")
    data = storage.read_json(path)
    cal = Calibrator.from_dict(data.get("calibrator", data))
    if cal.task != task:
        raise BadInputError(
            f"calibration was fitted for task {cal.task!r}, predictions are {task!r}"
        )
    return cal


def read_thresholds(
    uri: str, class_names: list[str], calibration: str | None = None
) -> tuple[np.ndarray, str]:
    """Thresholds per class from thresholds.json, or 0.5 each when ``uri`` is empty.

    Args:
        uri: thresholds.json or its step folder; empty for the default.
        class_names: the classes, in column order.
        calibration: the calibration method in use; a different one at tuning time is logged as a
            warning (the thresholds were tuned on differently scaled probabilities).

    Returns:
        ``((C,) thresholds, source)`` where source is the file URI or ``"default 0.5"``.

    Raises:
        BadInputError: the file is missing or lacks a class.
    """
    path = resolve_document(uri, THRESHOLDS_FILE)
    if not path:
        return np.full(len(class_names), DEFAULT_THRESHOLD), f"default {DEFAULT_THRESHOLD}"
    doc = storage.read_json(path) if storage.exists(path) else {}
    if not isinstance(doc.get("thresholds"), dict):
        raise BadInputError(f"no thresholds found at {path}")
    stored = doc["thresholds"]
    if calibration is not None and doc.get("calibration", calibration) != calibration:
        log.warning(
            "thresholds were tuned with calibration %r but %r is applied now",
            doc.get("calibration"), calibration,
        )
    missing = [c for c in class_names if c not in stored]
    if missing:
        raise BadInputError(f"thresholds file {path} lacks classes {missing}")
    return np.array([float(stored[c]) for c in class_names]), path
