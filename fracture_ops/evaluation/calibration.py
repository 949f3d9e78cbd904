"""The ``calibrate`` step: fit a probability calibrator on the validation split only.

Reads the predictions folder, fits :class:`~fracture_ops.model.calibrators.Calibrator` on the
rows with ``split == "val"`` (never train or test rows), and writes ``calibration.json`` with the
fitted parameters and the ECE/NLL before and after on the validation rows (in-sample figures; the
``evaluate`` step reports calibration on the held-out split).

A calibrator is applied only when it helps on rows it was not fitted on: the validation rows are
split into patient-grouped folds, the calibrator is fitted on all folds but one and scored on
that one, and unless its cross-validated NLL is lower than the uncalibrated NLL on the same
rows, the identity is kept (``calibration.json`` says so, with both figures). Calibration fitted
and checked on one small validation split can make the test set worse (an isotonic map of a few
dozen rows is a staircase); ``--no-require-cv-gain`` applies it regardless.

CLI: ``fracture-ops calibrate --predictions <folder> --method temperature``.
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.model.calibrators import Calibrator, nll
from fracture_ops.evaluation.metrics import expected_calibration_error, task_ece
from fracture_ops.model.outputs import logits, probabilities, split_rows, targets
from fracture_ops.evaluation.step_output import finish_step
from fracture_ops.model.documents import CALIBRATION_FILE
from fracture_ops.model.outputs import read_predictions

# Re-exported so ``fracture_ops.evaluation.calibration`` is the one import for calibration users.
__all__ = ["CalibrateConfig", "Calibrator", "calibrate_step", "calibration_report"]

log = logging.getLogger("fracture_ops.calibrate")
STEP = "calibrate"
FIT_SPLIT = "val"


class CalibrateConfig(StepConfig):
    """Configuration of the ``calibrate`` step."""

    section: ClassVar[str] = STEP

    predictions_uri: str = Field(
        "", description="folder holding predictions.parquet + model_info.json"
    )
    method: Literal["none", "temperature", "isotonic"] = "temperature"
    shared_temperature: bool = Field(False, description="binary/multilabel: one T for all classes")
    ece_bins: int = Field(15, ge=2, le=100, description="equal-width bins of the ECE")
    require_cv_gain: bool = Field(True, description="keep the identity unless the calibrator "
                                  "lowers the NLL under cross-validation on the validation rows")
    cv_folds: int = Field(5, ge=2, le=20, description="patient-grouped folds of that check")
    error_budget: float = Field(0.01, ge=0.0, le=1.0, description="max fraction of bad rows")


def calibration_report(
    cal: Calibrator, z: np.ndarray, y: np.ndarray, class_names: list[str], n_bins: int
) -> dict:
    """ECE (task-level and per class) and NLL before and after calibration on ``(z, y)``."""
    before, after = probabilities(z, cal.task), cal.transform(z)
    report = {
        "ece_before": task_ece(y, before, cal.task, n_bins),
        "ece_after": task_ece(y, after, cal.task, n_bins),
        "nll_before": nll(y, z, cal.task),
        "nll_after": _prob_nll(y, after, cal.task),
        "per_class": {},
    }
    for k, c in enumerate(class_names):
        report["per_class"][c] = {
            "ece_before": expected_calibration_error(y[:, k], before[:, k], n_bins),
            "ece_after": expected_calibration_error(y[:, k], after[:, k], n_bins),
        }
    return report


def _prob_nll(y: np.ndarray, p: np.ndarray, task: str) -> float:
    """NLL of probabilities (isotonic output has no logits); clipped to avoid log(0)."""
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    if task == "multiclass":
        return float(-np.mean(np.sum(y * np.log(p), axis=1)))
    return float(-np.mean(np.sum(y * np.log(p) + (1 - y) * np.log1p(-p), axis=1)))


def cross_validated_nll(cal_args: tuple, z: np.ndarray, y: np.ndarray, groups: np.ndarray,
                        folds: int) -> dict | None:
    """Uncalibrated and calibrated NLL of the validation rows, each row scored by a calibrator
    fitted on the other folds (patient-grouped: one patient's images never on both sides).

    Returns:
        ``{"nll_before", "nll_after", "folds"}``; None when the rows hold fewer than two
        patients (nothing to cross-validate on).
    """
    from sklearn.model_selection import GroupKFold

    k = min(folds, len(np.unique(groups)))
    if k < 2:
        return None
    after = np.zeros_like(z)
    for fit_idx, held_idx in GroupKFold(n_splits=k).split(z, y, groups):
        cal = Calibrator(*cal_args).fit(z[fit_idx], y[fit_idx])
        after[held_idx] = cal.transform(z[held_idx])
    task = cal_args[1]
    return {"nll_before": nll(y, z, task), "nll_after": _prob_nll(y, after, task), "folds": k}


def calibrate_step(cfg: CalibrateConfig) -> dict:
    """Fit the calibrator on validation rows and write ``calibration.json``.

    Args:
        cfg: the step configuration.

    Returns:
        ``{"calibration_uri", "method", "ece_before", "ece_after", "n_val", "n_quarantined"}``.

    Raises:
        ConfigError: no predictions URI.
        BadInputError: unreadable predictions or no validation rows.
        ErrorBudgetExceeded: too many unusable prediction rows.
    """
    # default: this run's train step folder
    preds = read_predictions(cfg.predictions_uri or cfg.output_dir("train"), cfg.error_budget)
    val = split_rows(preds.df, FIT_SPLIT)
    z, y = logits(val, preds.class_names), targets(val, preds.class_names)
    cal_args = (cfg.method, preds.task, cfg.shared_temperature)
    check, applied, why = None, True, "fitted on validation"
    if cfg.method != "none" and cfg.require_cv_gain:
        check = cross_validated_nll(cal_args, z, y, val["patient_id"].astype(str).to_numpy(),
                                    cfg.cv_folds)
        if check is None:
            applied, why = False, "fewer than two validation patients: the gain cannot be checked"
        elif not check["nll_after"] < check["nll_before"]:
            applied = False
            why = (f"{cfg.method} did not lower the cross-validated NLL on the validation rows "
                   f"({check['nll_after']:.4f} against {check['nll_before']:.4f} uncalibrated, "
                   f"{check['folds']} patient-grouped folds)")
        else:
            why = (f"{cfg.method} lowered the cross-validated NLL on the validation rows "
                   f"({check['nll_after']:.4f} against {check['nll_before']:.4f}, "
                   f"{check['folds']} folds)")
    if not applied:
        log.warning("calibrate: identity kept: %s", why)
    cal = Calibrator(*(cal_args if applied else ("none", preds.task))).fit(z, y)
    report = calibration_report(cal, z, y, preds.class_names, cfg.ece_bins)
    out_dir = cfg.output_dir(STEP)
    storage.reset_dir(out_dir)
    doc = {
        "calibrator": cal.to_dict(),
        "class_names": preds.class_names,
        "fallback_classes": [preds.class_names[k] for k in cal.fallback_classes],
        "fitted_on": FIT_SPLIT,
        "n_images": len(val),
        "n_patients": int(val["patient_id"].nunique()),
        "ece_bins": cfg.ece_bins,
        "val": report,
        "requested_method": cfg.method,
        "applied": applied,
        "why": why,
        "cv_check": check,
    }
    uri = storage.write_json(storage.join(out_dir, CALIBRATION_FILE), doc)
    summary = {
        "calibration_uri": uri,
        "method": cal.method,
        "applied": applied,
        "ece_before": report["ece_before"],
        "ece_after": report["ece_after"],
        "n_val": len(val),
        "n_quarantined": len(preds.quarantined),
    }
    return finish_step(cfg, out_dir, summary, preds.quarantined)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fracture-ops calibrate``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    add_common_args(parser)
    parser.add_argument("--predictions", help="predictions folder URI (predictions.parquet)")
    add_field_flags(parser, CalibrateConfig, "method", "require_cv_gain", "cv_folds")


def run_cli(args: argparse.Namespace) -> dict:
    """Run the step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(CalibrateConfig, args, predictions_uri=args.predictions)
    return calibrate_step(cfg)
