"""Classification metrics on one set of predictions (point estimates; see ``bootstrap`` for CIs).

Every metric comes from scikit-learn where scikit-learn has it (AUROC, average precision, ROC curve,
Cohen's kappa, confusion counts); the few it lacks are small functions here:

- Sensitivity at a target specificity and specificity at a target sensitivity are read off the
  empirical ROC curve. Mode ``"achievable"`` (the default) takes the best operating point that a
  real threshold reaches while meeting the target (e.g. the highest sensitivity among thresholds
  whose specificity is >= 0.80) - conservative, and what a deployed threshold delivers. Mode
  ``"interpolated"`` interpolates linearly between the two neighbouring ROC points, which a
  randomised choice between their two thresholds would achieve (Fawcett 2006, "An introduction to
  ROC analysis", Pattern Recognition Letters 27:861-874, section 6).
- Expected calibration error (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural
  Networks", ICML): equal-width bins ``[0, 1/M), [1/M, 2/M), ..., [(M-1)/M, 1]``, and
  ``ECE = sum_b |B_b|/n * |mean(y in B_b) - mean(p in B_b)|``. Per class it is the one-vs-rest ECE
  of the class probability; the task-level ``ece`` is that of the positive class (binary), the mean
  over classes (multilabel) or the top-label ECE of the argmax confidence (multiclass, as Guo et
  al.).

Decisions: binary and multilabel predict class ``c`` when ``p_c >= threshold_c``; multiclass
predicts the argmax class (its tuned one-vs-rest thresholds are reported, not used for the
decision), so per-class sensitivity/specificity are one-vs-rest on the argmax and kappa is on the
argmax labels.

Results are flat dicts keyed ``(scope, metric)`` where ``scope`` is a class name or ``None`` for
task-level metrics; :func:`nest` turns them into the JSON layout.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    cohen_kappa_score,
    roc_auc_score,
    roc_curve,
)

from fracture_ops.model.outputs import decisions

Mode = Literal["achievable", "interpolated"]
Key = tuple[str | None, str]
# Tolerance for comparing rates with targets: 1 - 0.8 is 0.19999999999999996 in floating point.
_EPS = 1e-9


def sens_at_spec_name(spec: float) -> str:
    """Metric name for sensitivity at specificity ``spec``, e.g. ``sens_at_spec_0.80``."""
    return f"sens_at_spec_{spec:.2f}"


def spec_at_sens_name(sens: float) -> str:
    """Metric name for specificity at sensitivity ``sens``, e.g. ``spec_at_sens_0.90``."""
    return f"spec_at_sens_{sens:.2f}"


def both_classes(y: np.ndarray) -> bool:
    """True when a 0/1 vector holds both a positive and a negative."""
    return bool(np.any(y == 1) and np.any(y == 0))


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC of one class; NaN when only one class is present (it is undefined then)."""
    return float(roc_auc_score(y, p)) if both_classes(y) else float("nan")


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (step-wise PR area, no interpolation); NaN when one class is missing."""
    return float(average_precision_score(y, p)) if both_classes(y) else float("nan")


def sensitivity_specificity(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """``(TP / (TP + FN), TN / (TN + FP))`` of 0/1 decisions; NaN where a denominator is zero."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    pos, neg = y.sum(), (~y).sum()
    sens = (pred & y).sum() / pos if pos else float("nan")
    spec = (~pred & ~y).sum() / neg if neg else float("nan")
    return float(sens), float(spec)


def cohen_kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Cohen's kappa (Cohen 1960) via scikit-learn; NaN when chance agreement is total."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(cohen_kappa_score(y_true, y_pred))


def sens_at_spec_from_curve(
    fpr: np.ndarray, tpr: np.ndarray, spec: float, mode: Mode
) -> np.ndarray:
    """Sensitivity at specificity ``spec`` read off ROC curves.

    Args:
        fpr: ``(B, K)`` false-positive rates, each row non-decreasing from 0 to 1.
        tpr: ``(B, K)`` true-positive rates, matching ``fpr``.
        spec: the target specificity.
        mode: ``achievable`` or ``interpolated`` (see the module docstring).

    Returns:
        ``(B,)`` sensitivities.
    """
    fpr, tpr = np.atleast_2d(fpr), np.atleast_2d(tpr)
    limit = 1.0 - spec
    # fpr is non-decreasing, so the points meeting the target form a prefix of each row.
    last = np.maximum((fpr <= limit + _EPS).sum(axis=1) - 1, 0)
    rows = np.arange(fpr.shape[0])
    best = tpr[rows, last]
    if mode == "achievable":
        return best
    nxt = np.minimum(last + 1, fpr.shape[1] - 1)
    dx = fpr[rows, nxt] - fpr[rows, last]
    step = np.divide(tpr[rows, nxt] - best, dx, out=np.zeros_like(dx), where=dx > 0)
    return best + np.clip(limit - fpr[rows, last], 0.0, None) * step


def spec_at_sens_from_curve(
    fpr: np.ndarray, tpr: np.ndarray, sens: float, mode: Mode
) -> np.ndarray:
    """Specificity at sensitivity ``sens`` read off ROC curves (arguments as above).

    Returns:
        ``(B,)`` specificities.
    """
    fpr, tpr = np.atleast_2d(fpr), np.atleast_2d(tpr)
    # tpr is non-decreasing: the first point reaching the target has the lowest fpr among them.
    first = np.minimum((tpr < sens - _EPS).sum(axis=1), tpr.shape[1] - 1)
    rows = np.arange(fpr.shape[0])
    x = fpr[rows, first]
    if mode == "interpolated":
        prev = np.maximum(first - 1, 0)
        dy = tpr[rows, first] - tpr[rows, prev]
        slope = np.divide(x - fpr[rows, prev], dy, out=np.zeros_like(dy), where=dy > 0)
        x = np.where(dy > 0, fpr[rows, prev] + (sens - tpr[rows, prev]) * slope, x)
    return 1.0 - x


def sensitivity_at_specificity(
    y: np.ndarray, p: np.ndarray, spec: float, mode: Mode = "achievable"
) -> float:
    """Sensitivity at a target specificity on scikit-learn's full ROC curve; NaN for one class."""
    if not both_classes(y):
        return float("nan")
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    return float(sens_at_spec_from_curve(fpr, tpr, spec, mode)[0])


def specificity_at_sensitivity(
    y: np.ndarray, p: np.ndarray, sens: float, mode: Mode = "achievable"
) -> float:
    """Specificity at a target sensitivity on scikit-learn's full ROC curve; NaN for one class."""
    if not both_classes(y):
        return float("nan")
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    return float(spec_at_sens_from_curve(fpr, tpr, sens, mode)[0])


def bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability; bins are left-closed, the last one holds 1.0."""
    return np.clip((np.asarray(p, dtype=float) * n_bins).astype(np.int64), 0, n_bins - 1)


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> dict[str, list]:
    """Per-bin counts, mean confidence and observed frequency (the reliability diagram's data).

    Returns:
        ``{"edges", "count", "confidence", "frequency"}``; empty bins hold ``None``.
    """
    idx = bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=np.asarray(y, dtype=float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf, freq = sum_p / count, sum_y / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "confidence": [None if c == 0 else float(v) for c, v in zip(count, conf)],
        "frequency": [None if c == 0 else float(v) for c, v in zip(count, freq)],
    }


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width bins: ``sum_b |sum(y in b) - sum(p in b)| / n``."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if len(p) == 0:
        return float("nan")
    idx = bin_index(p, n_bins)
    gap = np.bincount(idx, weights=y - p, minlength=n_bins)
    return float(np.abs(gap).sum() / len(p))


def top_label(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multiclass ``(correct, confidence)``: argmax hit (0/1) and the argmax probability."""
    pred = probs.argmax(axis=1)
    return (pred == y.argmax(axis=1)).astype(float), probs[np.arange(len(pred)), pred]


def task_ece(y: np.ndarray, probs: np.ndarray, task: str, n_bins: int = 15) -> float:
    """Task-level ECE: positive class (binary), class mean (multilabel), top-label (multiclass)."""
    if task == "multiclass":
        return expected_calibration_error(*top_label(y, probs), n_bins)
    return float(
        np.mean(
            [expected_calibration_error(y[:, k], probs[:, k], n_bins) for k in range(y.shape[1])]
        )
    )


def compute_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    task: str,
    class_names: list[str],
    thresholds: np.ndarray,
    spec_targets: list[float] = (0.80,),
    sens_targets: list[float] = (0.90,),
    n_bins: int = 15,
    mode: Mode = "achievable",
) -> dict[Key, float]:
    """Every point metric of one prediction set.

    Args:
        y: ``(n, C)`` 0/1 labels.
        probs: ``(n, C)`` probabilities.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: the ``C`` class names.
        thresholds: ``(C,)`` decision thresholds (ignored for the multiclass argmax decision).
        spec_targets: specificities at which to report sensitivity.
        sens_targets: sensitivities at which to report specificity.
        n_bins: ECE bins.
        mode: how operating points are read off the ROC curve.

    Returns:
        ``{(class_or_None, metric): value}``; undefined values are NaN.
    """
    out: dict[Key, float] = {}
    pred = decisions(probs, task, thresholds)
    for k, c in enumerate(class_names):
        yk, pk = y[:, k], probs[:, k]
        out[(c, "auroc")] = roc_auc(yk, pk)
        out[(c, "ap")] = average_precision(yk, pk)
        out[(c, "sensitivity")], out[(c, "specificity")] = sensitivity_specificity(yk, pred[:, k])
        if task != "multiclass":
            out[(c, "kappa")] = cohen_kappa(yk, pred[:, k])
        for s in spec_targets:
            out[(c, sens_at_spec_name(s))] = sensitivity_at_specificity(yk, pk, s, mode)
        for s in sens_targets:
            out[(c, spec_at_sens_name(s))] = specificity_at_sensitivity(yk, pk, s, mode)
        out[(c, "ece")] = expected_calibration_error(yk, pk, n_bins)
    out.update(_overall(y, probs, task, class_names, out, n_bins))
    return out


def _overall(y, probs, task, class_names, per_class, n_bins) -> dict[Key, float]:
    """Task-level metrics: macro/micro AUROC, mean AP, kappa, accuracy, ECE."""
    out: dict[Key, float] = {
        (None, "auroc_macro"): float(np.mean([per_class[(c, "auroc")] for c in class_names])),
        (None, "auroc_micro"): roc_auc(y.ravel(), probs.ravel()),
        (None, "ap_mean"): float(np.mean([per_class[(c, "ap")] for c in class_names])),
        (None, "ece"): task_ece(y, probs, task, n_bins),
    }
    if task == "binary":
        out[(None, "kappa")] = per_class[(class_names[0], "kappa")]
    elif task == "multiclass":
        predicted = decisions(probs, task, np.zeros(len(class_names))).argmax(axis=1)
        out[(None, "kappa")] = cohen_kappa(y.argmax(axis=1), predicted)
        out[(None, "accuracy")] = float(np.mean(predicted == y.argmax(axis=1)))
    return out


def finite_or_none(v: float) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    return float(v) if v is not None and np.isfinite(v) else None


def nest(values: dict[Key, float], ci: dict[Key, tuple[float, float]] | None = None) -> dict:
    """Turn flat metrics (and optional CIs) into ``{"overall": {...}, "per_class": {c: {...}}}``.

    Each leaf is ``{"value": v}`` plus ``"ci_low"``/``"ci_high"`` when CIs are given.
    """
    out: dict = {"overall": {}, "per_class": {}}
    for (scope, name), v in values.items():
        leaf = {"value": finite_or_none(v)}
        if ci is not None and (scope, name) in ci:
            leaf["ci_low"], leaf["ci_high"] = (finite_or_none(x) for x in ci[(scope, name)])
        target = out["overall"] if scope is None else out["per_class"].setdefault(scope, {})
        target[name] = leaf
    return out
