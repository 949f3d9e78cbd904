"""The ``evaluate`` step: metrics with patient-level bootstrap CIs, calibration and plots.

Reads the predictions folder, applies the calibrator and thresholds fitted on validation (or none
and 0.5 each), evaluates the chosen split (default ``test``) and writes ``evaluation.json``,
``roc.png``, ``pr.png``, ``confusion.png``, ``reliability.png`` and the HTML report
``evaluation.html`` (:mod:`fracture_ops.evaluation.report`) under ``runs/<run_id>/evaluate``.
When the predictions carry a ``body_region`` column, the metrics are repeated per region.
Definitions of every metric are in :mod:`fracture_ops.evaluation.metrics`, of the intervals in
:mod:`fracture_ops.evaluation.bootstrap`.

CLI: ``fracture-ops evaluate --predictions <folder> --calibration <..> --thresholds <..>``.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import Field

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.evaluation import plots
from fracture_ops.evaluation.bootstrap import bootstrap_ci
from fracture_ops.evaluation.report import build_report_html
from fracture_ops.evaluation.metrics import (
    Mode,
    compute_metrics,
    finite_or_none,
    nest,
    reliability_bins,
    task_ece,
    top_label,
)
from fracture_ops.model.outputs import decisions
from fracture_ops.model.outputs import logits, probabilities, split_rows, targets
from fracture_ops.evaluation.step_output import finish_step
from fracture_ops.model.documents import read_calibrator, read_thresholds
from fracture_ops.model.outputs import read_predictions

log = logging.getLogger(__name__)

STEP = "evaluate"
EVALUATION_FILE = catalog.EVALUATION.file
Rate = Annotated[float, Field(gt=0.0, lt=1.0)]


class EvaluateConfig(StepConfig):
    """Configuration of the ``evaluate`` step."""

    section: ClassVar[str] = STEP

    predictions_uri: str = Field(
        "", description="folder holding predictions.parquet + model_info.json"
    )
    calibration_uri: str = Field("", description="calibration.json or its step folder; empty: none")
    thresholds_uri: str = Field(
        "", description="thresholds.json or its step folder; empty: 0.5 each"
    )
    split: Literal["train", "val", "test"] = "test"
    spec_targets: list[Rate] = Field(
        default_factory=lambda: [0.80], description="report sensitivity at these specificities"
    )
    sens_targets: list[Rate] = Field(
        default_factory=lambda: [0.90], description="report specificity at these sensitivities"
    )
    operating_point: Literal["achievable", "interpolated"] = Field(
        "achievable", description="read ROC operating points at a real threshold or interpolate"
    )
    n_bootstrap: int = Field(1000, ge=0, description="patient-level resamples (0: no intervals)")
    seed: int = 0
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    ece_bins: int = Field(15, ge=2, le=100)
    min_region_images: int = Field(20, ge=1, description="smaller body regions are not evaluated")
    error_budget: float = Field(0.01, ge=0.0, le=1.0, description="max fraction of bad rows")


def evaluate_predictions(
    y: np.ndarray,
    probs: np.ndarray,
    patient_ids: np.ndarray,
    task: str,
    class_names: list[str],
    thresholds: np.ndarray,
    *,
    spec_targets=(0.80,),
    sens_targets=(0.90,),
    n_bins: int = 15,
    mode: Mode = "achievable",
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> dict:
    """Point metrics, patient-level bootstrap intervals, support and reliability data (pure).

    Args:
        y: ``(n, C)`` 0/1 labels.
        probs: ``(n, C)`` calibrated probabilities.
        patient_ids: ``(n,)`` patient of each image (the bootstrap's sampling unit).
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: the ``C`` class names.
        thresholds: ``(C,)`` decision thresholds.
        spec_targets, sens_targets, n_bins, mode: see ``metrics.compute_metrics``.
        n_bootstrap: resamples (0 skips the intervals).
        seed: bootstrap seed.
        ci_level: interval coverage.

    Returns:
        ``{"n_images", "n_patients", "support", "metrics", "bootstrap", "reliability"}``.
    """
    args = {"spec_targets": list(spec_targets), "sens_targets": list(sens_targets)}
    args.update(n_bins=n_bins, mode=mode)
    values = compute_metrics(y, probs, task, class_names, thresholds, **args)
    boot = {"n_resamples": 0, "n_valid": 0, "n_skipped": 0, "level": ci_level, "ci": {}}
    if n_bootstrap > 0:
        boot = bootstrap_ci(
            y, probs, patient_ids, task, class_names, thresholds, **args,
            n_resamples=n_bootstrap, seed=seed, level=ci_level,
        )
    ci = boot.pop("ci")
    return {
        "n_images": len(y),
        "n_patients": len(np.unique(patient_ids)),
        "support": {
            c: {"positives": int(y[:, k].sum()), "negatives": int(len(y) - y[:, k].sum())}
            for k, c in enumerate(class_names)
        },
        "metrics": nest(values, ci),
        "bootstrap": {"unit": "patient", "seed": seed, **boot},
        "reliability": _reliability(y, probs, task, class_names, n_bins),
    }


def _reliability(y, probs, task: str, class_names: list[str], n_bins: int) -> dict:
    """Reliability-diagram data: per class, or of the top label (multiclass)."""
    if task == "multiclass":
        return {"top_label": reliability_bins(*top_label(y, probs), n_bins)}
    return {c: reliability_bins(y[:, k], probs[:, k], n_bins) for k, c in enumerate(class_names)}


def headline(report: dict, task: str, class_names: list[str]) -> dict:
    """Flat numbers for XCom and MLflow: AUROC (+CI), AP, ECE, kappa, sensitivity, specificity."""
    overall = report["metrics"]["overall"]
    first = report["metrics"]["per_class"][class_names[0]]
    picks = {"auroc": overall["auroc_macro"], "ap": overall["ap_mean"], "ece": overall["ece"]}
    if "kappa" in overall:
        picks["kappa"] = overall["kappa"]
    if task == "binary":
        picks["sensitivity"], picks["specificity"] = first["sensitivity"], first["specificity"]
    if "accuracy" in overall:
        picks["accuracy"] = overall["accuracy"]
    out = {name: leaf["value"] for name, leaf in picks.items()}
    out["auroc_ci_low"] = overall["auroc_macro"].get("ci_low")
    out["auroc_ci_high"] = overall["auroc_macro"].get("ci_high")
    return out


def _by_region(rows, y, probs, task, class_names, thresholds, cfg: EvaluateConfig, args) -> dict:
    """The evaluation repeated for each body region with enough images."""
    out = {}
    regions = rows["body_region"].fillna("unknown").astype(str).to_numpy()
    for region in sorted(set(regions)):
        mask = regions == region
        if mask.sum() < cfg.min_region_images:
            out[region] = {"n_images": int(mask.sum()), "skipped": "fewer than min_region_images"}
            continue
        out[region] = evaluate_predictions(
            y[mask],
            probs[mask],
            rows["patient_id"].to_numpy()[mask],
            task,
            class_names,
            thresholds,
            **args,
        )
        out[region].pop("reliability")
    return out


def _options(cfg: EvaluateConfig) -> dict:
    """The keyword arguments of :func:`evaluate_predictions` taken from the config."""
    return {
        "spec_targets": cfg.spec_targets, "sens_targets": cfg.sens_targets,
        "n_bins": cfg.ece_bins, "mode": cfg.operating_point, "n_bootstrap": cfg.n_bootstrap,
        "seed": cfg.seed, "ci_level": cfg.ci_level,
    }


def _write_plots(out_dir: str, y, probs, task, class_names, thresholds, n_bins) -> list[str]:
    pngs = {
        "roc.png": plots.plot_roc(y, probs, class_names),
        "pr.png": plots.plot_pr(y, probs, class_names),
        "confusion.png": plots.plot_confusion(
            y, decisions(probs, task, thresholds), task, class_names
        ),
        "reliability.png": plots.plot_reliability(y, probs, task, class_names, n_bins),
    }
    return [storage.write_bytes(storage.join(out_dir, name), data) for name, data in pngs.items()]


def evaluate_step(cfg: EvaluateConfig) -> dict:
    """Evaluate one split and write evaluation.json and the four plots.

    Args:
        cfg: the step configuration.

    Returns:
        ``{"evaluation_uri", "plots", "split", "n_images", "headline"}``.

    Raises:
        ConfigError: no predictions URI.
        BadInputError: unreadable inputs, an empty split, or a calibration for another task.
        ErrorBudgetExceeded: too many unusable prediction rows.
    """
    # default: this run's train step folder
    preds = read_predictions(cfg.predictions_uri or cfg.output_dir("train"), cfg.error_budget)
    task, class_names = preds.task, preds.class_names
    cal = read_calibrator(cfg.calibration_uri, task)
    thresholds, threshold_source = read_thresholds(cfg.thresholds_uri, class_names, cal.method)
    rows = split_rows(preds.df, cfg.split)
    z, y = logits(rows, class_names), targets(rows, class_names)
    probs = cal.transform(z)
    args = _options(cfg)
    started = time.perf_counter()
    report = evaluate_predictions(
        y, probs, rows["patient_id"].to_numpy(), task, class_names, thresholds, **args
    )
    log.info(
        "metrics with %d patient-level resamples of %d images took %.2f s",
        cfg.n_bootstrap, len(rows), time.perf_counter() - started,
    )
    n_bins = args["n_bins"]
    report.update(
        task=task, class_names=class_names, split=cfg.split,
        inputs={"predictions": cfg.predictions_uri, "calibration": cfg.calibration_uri,
                "thresholds": threshold_source},
        thresholds=dict(zip(class_names, thresholds.tolist())),
        decision="argmax" if task == "multiclass" else "p >= threshold",
        operating_point_mode=cfg.operating_point,
        calibration={
            "method": cal.method,
            "ece_uncalibrated": finite_or_none(task_ece(y, probabilities(z, task), task, n_bins)),
            "ece_calibrated": finite_or_none(task_ece(y, probs, task, n_bins)),
        },
        n_quarantined=len(preds.quarantined),
    )
    if "body_region" in rows.columns:
        report["by_body_region"] = _by_region(
            rows, y, probs, task, class_names, thresholds, cfg, args
        )
    out_dir = cfg.output_dir(STEP)
    storage.reset_dir(out_dir)
    uri = storage.write_json(storage.join(out_dir, EVALUATION_FILE), report)
    pngs = _write_plots(out_dir, y, probs, task, class_names, thresholds, cfg.ece_bins)
    page = build_report_html(report, y, probs, probabilities(z, task), rows, task, class_names,
                             thresholds, cfg.ece_bins, seed=cfg.seed)
    html_uri = storage.write_text(storage.join(out_dir, catalog.EVALUATION_REPORT.file), page)
    log.info("evaluate: report %s", html_uri)
    summary = {
        "evaluation_uri": uri,
        "report_uri": html_uri,
        "plots": pngs,
        "split": cfg.split,
        "n_images": report["n_images"],
        "headline": headline(report, task, class_names),
    }
    return finish_step(cfg, out_dir, summary, preds.quarantined)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fracture-ops evaluate``."""
    from fracture_ops.cli_common import add_common_args

    add_common_args(parser)
    parser.add_argument("--predictions", help="predictions folder URI (predictions.parquet)")
    parser.add_argument("--calibration", help="calibration.json URI or the calibrate step folder")
    parser.add_argument(
        "--thresholds", help="thresholds.json URI or the tune_thresholds step folder"
    )
    parser.add_argument("--split", choices=["train", "val", "test"])
    parser.add_argument("--n-bootstrap", type=int, help="patient-level resamples (0: none)")
    parser.add_argument("--seed", type=int, help="bootstrap seed")


def run_cli(args: argparse.Namespace) -> dict:
    """Run the step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(
        EvaluateConfig,
        args,
        predictions_uri=args.predictions,
        calibration_uri=args.calibration,
        thresholds_uri=args.thresholds,
        split=args.split,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
    )
    return evaluate_step(cfg)
