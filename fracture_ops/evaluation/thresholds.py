"""Decision thresholds per class, tuned on the validation split only; the ``tune_thresholds`` step.

Methods (a class is predicted positive when ``p >= threshold``):

- ``f1``: the threshold maximising F1 on scikit-learn's precision-recall curve;
- ``youden``: the threshold maximising Youden's J = sensitivity + specificity - 1 (Youden 1950)
  on scikit-learn's ROC curve;
- ``min_sensitivity``: the highest threshold whose sensitivity is at least ``min_sensitivity``
  (the most specific operating point that still meets the sensitivity floor).

Ties in F1 or J are broken towards the lower threshold (the more sensitive choice: a missed
fracture costs more than a second look). A class whose validation rows hold only positives or only
negatives cannot be tuned; it keeps 0.5 and is listed in ``fallback_classes``.

Multiclass: thresholds are tuned on the one-vs-rest probabilities and stored for reference (e.g.
for per-class alerting), but the evaluation's decision is the argmax class.

Probabilities come from the calibrator when a calibration.json is given, so thresholds match the
probabilities that the model will serve.

CLI: ``fracture-ops tune-thresholds --predictions <folder> [--calibration <calibration.json>]``.
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field
from sklearn.metrics import precision_recall_curve, roc_curve

from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.errors import BadInputError
from fracture_ops.evaluation.metrics import (
    both_classes,
    finite_or_none,
    sensitivity_specificity,
)
from fracture_ops.model.outputs import decisions
from fracture_ops.model.outputs import logits, split_rows, targets
from fracture_ops.evaluation.step_output import finish_step
from fracture_ops.model.documents import DEFAULT_THRESHOLD, THRESHOLDS_FILE, read_calibrator
from fracture_ops.model.outputs import read_predictions

log = logging.getLogger(__name__)

STEP = "tune_thresholds"
FIT_SPLIT = "val"
ThresholdMethod = Literal["f1", "youden", "min_sensitivity"]
METHODS = ("f1", "youden", "min_sensitivity")
# 0.8 - 0.2 and 1.0 - 0.4 differ in floating point; J or F1 values this close are ties.
_TIE = 1e-12


def _best_index(values: np.ndarray, last: bool) -> int:
    """Index of the first or last maximum (NaN ignored); rounding-level differences are ties."""
    values = np.nan_to_num(values, nan=-np.inf)
    ties = np.flatnonzero(values >= values.max() - _TIE)
    return int(ties[-1] if last else ties[0])


def tune_class_threshold(
    y: np.ndarray, p: np.ndarray, method: ThresholdMethod, min_sensitivity: float = 0.9
) -> float:
    """The threshold of one class.

    Args:
        y: ``(n,)`` 0/1 labels with both classes present.
        p: ``(n,)`` probabilities.
        method: ``f1``, ``youden`` or ``min_sensitivity``.
        min_sensitivity: the floor for ``min_sensitivity``.

    Returns:
        The threshold (a probability in ``[0, 1]``).

    Raises:
        BadInputError: unknown method or only one class present.
    """
    if not both_classes(y):
        raise BadInputError("threshold tuning needs positives and negatives")
    if method == "f1":
        precision, recall, thr = precision_recall_curve(y, p)  # thresholds ascending
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1])
        return float(thr[_best_index(f1, last=False)])
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # thresholds descending
    if method == "youden":
        return float(min(thr[_best_index(tpr - fpr, last=True)], 1.0))
    if method == "min_sensitivity":
        first = int(np.argmax(tpr >= min_sensitivity - 1e-12))
        return float(min(thr[first], 1.0))
    raise BadInputError(f"threshold method must be one of {METHODS}, got {method!r}")


def tune_thresholds(
    y: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    method: ThresholdMethod = "youden",
    min_sensitivity: float = 0.9,
) -> dict[str, float]:
    """Tune one threshold per class. Call it with VALIDATION rows only.

    Args:
        y: ``(n, C)`` 0/1 labels.
        probs: ``(n, C)`` (calibrated) probabilities.
        class_names: the ``C`` class names.
        method: ``f1``, ``youden`` or ``min_sensitivity``.
        min_sensitivity: the floor for ``min_sensitivity``.

    Returns:
        ``{class: threshold}``; a class lacking positives or negatives gets 0.5.
    """
    out: dict[str, float] = {}
    for k, c in enumerate(class_names):
        if both_classes(y[:, k]):
            out[c] = tune_class_threshold(y[:, k], probs[:, k], method, min_sensitivity)
        else:
            log.warning("class %s has a single label value in validation: threshold 0.5", c)
            out[c] = DEFAULT_THRESHOLD
    return out


class TuneThresholdsConfig(StepConfig):
    """Configuration of the ``tune_thresholds`` step."""

    section: ClassVar[str] = STEP

    predictions_uri: str = Field(
        "", description="folder holding predictions.parquet + model_info.json"
    )
    calibration_uri: str = Field(
        "", description="calibration.json (or its step folder); empty: none"
    )
    method: ThresholdMethod = "youden"
    min_sensitivity: float = Field(0.9, gt=0.0, le=1.0, description="floor for min_sensitivity")
    error_budget: float = Field(0.01, ge=0.0, le=1.0, description="max fraction of bad rows")


def tune_thresholds_step(cfg: TuneThresholdsConfig) -> dict:
    """Tune thresholds on the validation rows and write ``thresholds.json``.

    Args:
        cfg: the step configuration.

    Returns:
        ``{"thresholds_uri", "method", "thresholds", "n_val", "n_quarantined"}``.

    Raises:
        ConfigError: no predictions URI.
        BadInputError: unreadable inputs, no validation rows, or a calibration for another task.
        ErrorBudgetExceeded: too many unusable prediction rows.
    """
    # default: this run's train step folder
    preds = read_predictions(cfg.predictions_uri or cfg.output_dir("train"), cfg.error_budget)
    cal = read_calibrator(cfg.calibration_uri, preds.task)
    val = split_rows(preds.df, FIT_SPLIT)
    y, probs = targets(val, preds.class_names), cal.transform(logits(val, preds.class_names))
    thresholds = tune_thresholds(y, probs, preds.class_names, cfg.method, cfg.min_sensitivity)
    vector = np.array([thresholds[c] for c in preds.class_names])
    pred = decisions(probs, "binary", vector)  # per-class threshold decisions, for every task
    val_rates = {}
    for k, c in enumerate(preds.class_names):
        sens, spec = sensitivity_specificity(y[:, k], pred[:, k])
        val_rates[c] = {"sensitivity": finite_or_none(sens), "specificity": finite_or_none(spec)}
    doc = {
        "method": cfg.method,
        "min_sensitivity": cfg.min_sensitivity,
        "task": preds.task,
        "class_names": preds.class_names,
        "thresholds": thresholds,
        "decision": "argmax" if preds.task == "multiclass" else "p >= threshold",
        "calibration": cal.method,
        "fitted_on": FIT_SPLIT,
        "n_images": len(val),
        "fallback_classes": [
            c for k, c in enumerate(preds.class_names) if not both_classes(y[:, k])
        ],
        "val": val_rates,
    }
    out_dir = cfg.output_dir(STEP)
    storage.reset_dir(out_dir)
    uri = storage.write_json(storage.join(out_dir, THRESHOLDS_FILE), doc)
    summary = {
        "thresholds_uri": uri,
        "method": cfg.method,
        "thresholds": thresholds,
        "n_val": len(val),
        "n_quarantined": len(preds.quarantined),
    }
    return finish_step(cfg, out_dir, summary, preds.quarantined)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fracture-ops tune-thresholds``."""
    from fracture_ops.cli_common import add_common_args

    add_common_args(parser)
    parser.add_argument("--predictions", help="predictions folder URI (predictions.parquet)")
    parser.add_argument("--calibration", help="calibration.json URI or the calibrate step folder")
    parser.add_argument("--method", choices=list(METHODS))
    parser.add_argument("--min-sensitivity", type=float, help="floor for --method min_sensitivity")


def run_cli(args: argparse.Namespace) -> dict:
    """Run the step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(
        TuneThresholdsConfig,
        args,
        predictions_uri=args.predictions,
        calibration_uri=args.calibration,
        method=args.method,
        min_sensitivity=args.min_sensitivity,
    )
    return tune_thresholds_step(cfg)
