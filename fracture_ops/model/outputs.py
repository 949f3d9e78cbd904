"""The predictions table that the training step writes, and the arrays the evaluation reads from it.

Contract (one folder): ``predictions.parquet`` with columns ``image_id, patient_id, split``
(``train``/``val``/``test``), and per class ``c`` of ``class_names`` a label column ``y_<c>`` (0/1:
one-hot for multiclass, multi-hot for multilabel, the positive class only for binary) and a raw
model output column ``logit_<c>`` (a sigmoid logit per class for binary/multilabel, softmax
logits for multiclass); beside it ``model_info.json`` = ``{"task": ..., "class_names": [...]}``.
An optional ``body_region`` column enables per-region metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import expit, softmax

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.errors import BadInputError, ConfigError, ErrorBudgetExceeded

log = logging.getLogger(__name__)

PREDICTIONS_FILE = catalog.PREDICTIONS.file
MODEL_INFO_FILE = catalog.MODEL_INFO.file
TASKS = ("binary", "multiclass", "multilabel")
SPLITS = ("train", "val", "test")
ID_COLUMNS = ("image_id", "patient_id", "split")


def label_columns(class_names: list[str]) -> list[str]:
    """``y_<c>`` for every class, in class order."""
    return [f"y_{c}" for c in class_names]


def logit_columns(class_names: list[str]) -> list[str]:
    """``logit_<c>`` for every class, in class order."""
    return [f"logit_{c}" for c in class_names]


def _folder_of(uri: str) -> str:
    """Accept the folder or the ``predictions.parquet`` file itself."""
    uri = str(uri)
    if uri.endswith(PREDICTIONS_FILE):
        return uri[: -len(PREDICTIONS_FILE)].rstrip("/\\") or "."
    return uri


def check_model_info(info: dict) -> tuple[str, list[str]]:
    """Validate ``model_info.json`` and return ``(task, class_names)``.

    Raises:
        BadInputError: unknown task, no classes, duplicate classes, or binary with more than one.
    """
    task = info.get("task")
    names = info.get("class_names")
    if task not in TASKS:
        raise BadInputError(f"model_info.json: task must be one of {TASKS}, got {task!r}")
    if not isinstance(names, list) or not names or len(set(names)) != len(names):
        raise BadInputError("model_info.json: class_names must be a non-empty list of unique names")
    if task == "binary" and len(names) != 1:
        raise BadInputError("binary task: class_names must hold only the positive class")
    if task == "multiclass" and len(names) < 2:
        raise BadInputError("multiclass task needs at least two classes")
    return task, [str(c) for c in names]


def load_predictions(folder_uri: str) -> tuple[pd.DataFrame, str, list[str]]:
    """Read a predictions folder (local or s3://).

    Args:
        folder_uri: folder holding ``predictions.parquet`` and ``model_info.json`` (the parquet
            file's own URI is accepted too).

    Returns:
        ``(df, task, class_names)``; ``df`` keeps every row (see :func:`quarantine_bad_rows`).

    Raises:
        BadInputError: a file is missing or a required column is absent.
    """
    folder = _folder_of(folder_uri)
    info_uri, table_uri = (storage.join(folder, f) for f in (MODEL_INFO_FILE, PREDICTIONS_FILE))
    for uri in (info_uri, table_uri):
        if not storage.exists(uri):  # checked first: S3 reports a missing key differently
            raise BadInputError(f"predictions folder {folder} lacks {uri}")
    info, df = storage.read_json(info_uri), storage.read_parquet(table_uri)
    task, class_names = check_model_info(info)
    needed = [*ID_COLUMNS, *label_columns(class_names), *logit_columns(class_names)]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise BadInputError(f"predictions table lacks columns {missing}")
    return df, task, class_names


def quarantine_bad_rows(
    df: pd.DataFrame, task: str, class_names: list[str], error_budget: float = 0.01
) -> tuple[pd.DataFrame, list[dict]]:
    """Drop rows that cannot be scored, each with a reason, and enforce the error budget.

    A row is bad when its split is unknown, a label is not 0/1, a logit is not finite, or
    (multiclass) its labels are not one-hot.

    Args:
        df: the predictions table.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: the classes, in column order.
        error_budget: the largest tolerated fraction of bad rows.

    Returns:
        ``(clean_df, quarantined)`` where ``quarantined`` lists ``{"image_id", "reason"}``.

    Raises:
        ErrorBudgetExceeded: more than ``error_budget`` of the rows are bad.
    """
    y = df[label_columns(class_names)].to_numpy(dtype=float, na_value=np.nan)
    z = df[logit_columns(class_names)].to_numpy(dtype=float, na_value=np.nan)
    reasons = pd.Series("", index=df.index, dtype=object)
    checks = [
        (~df["split"].isin(SPLITS).to_numpy(), "unknown split"),
        (~np.isin(y, (0.0, 1.0)).all(axis=1), "label not 0/1"),
        (~np.isfinite(z).all(axis=1), "logit not finite"),
    ]
    if task == "multiclass":
        checks.append((np.nansum(y, axis=1) != 1, "labels not one-hot"))
    for bad, reason in checks:
        reasons[bad & (reasons == "").to_numpy()] = reason
    bad_mask = (reasons != "").to_numpy()
    quarantined = [
        {"image_id": str(i), "reason": r}
        for i, r in zip(df.loc[bad_mask, "image_id"], reasons[bad_mask])
    ]
    if len(df) and bad_mask.mean() > error_budget:
        raise ErrorBudgetExceeded(
            f"{bad_mask.sum()} of {len(df)} prediction rows are bad (budget {error_budget:.1%})"
        )
    if quarantined:
        log.warning("quarantined %d prediction rows", len(quarantined))
    return df.loc[~bad_mask].reset_index(drop=True), quarantined


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split (``train``/``val``/``test``).

    Raises:
        BadInputError: the split has no rows.
    """
    rows = df[df["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise BadInputError(f"the predictions table has no rows in split {split!r}")
    return rows


def targets(df: pd.DataFrame, class_names: list[str]) -> np.ndarray:
    """The label matrix, shape ``(n, n_classes)``, ints 0/1."""
    return df[label_columns(class_names)].to_numpy(dtype=np.int64)


def logits(df: pd.DataFrame, class_names: list[str]) -> np.ndarray:
    """The raw model outputs, shape ``(n, n_classes)``, float64."""
    return df[logit_columns(class_names)].to_numpy(dtype=np.float64)


def probabilities(logit_values: np.ndarray, task: str) -> np.ndarray:
    """Turn raw model outputs into probabilities.

    Args:
        logit_values: ``(n, n_classes)`` logits.
        task: ``binary``/``multilabel`` (independent sigmoid per class) or ``multiclass`` (softmax).

    Returns:
        Probabilities of the same shape.
    """
    z = np.asarray(logit_values, dtype=np.float64)
    if task == "multiclass":
        return softmax(z, axis=1)
    return expit(z)


def write_predictions(folder_uri: str, df: pd.DataFrame, task: str, class_names: list[str]) -> str:
    """Write a predictions folder in the contract's layout (the training step's side of it).

    Args:
        folder_uri: destination folder (local or s3://).
        df: the table (``image_id, patient_id, split``, ``y_<c>``, ``logit_<c>``, optional extras).
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: the classes, in column order.

    Returns:
        The URI of ``predictions.parquet``.

    Raises:
        BadInputError: invalid task/classes or missing columns.
    """
    check_model_info({"task": task, "class_names": list(class_names)})
    needed = [*ID_COLUMNS, *label_columns(class_names), *logit_columns(class_names)]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise BadInputError(f"predictions table lacks columns {missing}")
    storage.write_json(
        storage.join(folder_uri, MODEL_INFO_FILE), {"task": task, "class_names": list(class_names)}
    )
    return storage.write_parquet(storage.join(folder_uri, PREDICTIONS_FILE), df)


def decisions(probs: np.ndarray, task: str, thresholds: np.ndarray) -> np.ndarray:
    """The decision rule, the one place it is written: 0/1 decisions ``(n, C)``, ``p >= threshold``
    per class (binary, multilabel), or the one-hot arg-max class (multiclass; thresholds unused).
    Evaluation, threshold tuning, the pyfunc model, batch inference and Grad-CAM all call this."""
    if task == "multiclass":
        out = np.zeros(probs.shape, dtype=np.int64)
        out[np.arange(len(probs)), probs.argmax(axis=1)] = 1
        return out
    return (probs >= np.asarray(thresholds)[None, :]).astype(np.int64)


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
