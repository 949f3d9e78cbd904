"""Plumbing shared by the evaluation steps (calibrate, tune_thresholds, evaluate).

Reading the predictions folder and the optional calibration/thresholds documents, and finishing a
step folder (resolved config, then ``_SUCCESS`` last) live here so the step modules stay short.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel

from fracture_ops import storage
from fracture_ops.config import write_resolved
from fracture_ops.errors import BadInputError, ConfigError
from fracture_ops.evaluation.calibrators import Calibrator
from fracture_ops.evaluation.predictions import load_predictions, quarantine_bad_rows

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
THRESHOLDS_FILE = "thresholds.json"
QUARANTINE_FILE = "quarantine.json"
DEFAULT_THRESHOLD = 0.5


@dataclass
class Predictions:
    """A clean predictions table with its task, classes and quarantined rows."""

    df: pd.DataFrame
    task: str
    class_names: list[str]
    quarantined: list[dict]


def read_predictions(uri: str, error_budget: float) -> Predictions:
    """Load and clean a predictions folder.

    Raises:
        ConfigError: ``uri`` is empty.
        BadInputError: the folder or its columns are missing.
        ErrorBudgetExceeded: too many unusable rows.
    """
    if not uri:
        raise ConfigError("predictions_uri is required (the folder holding predictions.parquet)")
    df, task, class_names = load_predictions(uri)
    clean, quarantined = quarantine_bad_rows(df, task, class_names, error_budget)
    return Predictions(clean, task, class_names, quarantined)


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


def finish_step(cfg: BaseModel, out_dir: str, summary: dict, quarantined: list[dict]) -> dict:
    """Write quarantine.json and config.resolved.yaml, then ``_SUCCESS`` (last); return the summary.

    The quarantined rows go to their own file so that the fitted documents (calibration.json,
    thresholds.json) depend on the validation rows alone.
    """
    storage.write_json(storage.join(out_dir, QUARANTINE_FILE), {"rows": quarantined})
    write_resolved(cfg, out_dir)
    storage.mark_success(out_dir, summary)
    log.info("wrote %s", out_dir)
    return summary
