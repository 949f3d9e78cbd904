"""Patient-level (cluster) bootstrap confidence intervals, vectorised over resamples.

Images of one patient are correlated, so resampling images treats them as independent and gives
intervals that are too narrow. The cluster bootstrap (Davison & Hinkley 1997, "Bootstrap Methods
and their Application", section 3.8; Field & Welsh 2007) draws patients with replacement and keeps
all images of every drawn patient. A resample is therefore a vector of integer weights, one per
image, equal to the number of times its patient was drawn: ``W[i, b] = counts[patient(i), b]``.

Every metric is computed for all resamples at once from ``W`` (shape ``(n_images, B)``: one column
per resample, so that sorting, cumulative sums and reductions run along the image axis over whole
contiguous rows), processed in chunks of resamples to bound memory:

- confusion counts, ECE bins and kappa are matrix products ``indicator.T @ W``;
- ROC/PR curves come from sorting the scores once, summing each resample's positive and negative
  weights per distinct score (``np.add.reduceat``) and taking cumulative sums; AUROC is the
  trapezoid area (ties count one half, as scikit-learn) and AP the step sum
  ``sum_k (recall_k - recall_{k-1}) * precision_k`` (as scikit-learn's ``average_precision_score``).

With integer weights these equal the metrics of the resampled data set exactly (tests check this
against scikit-learn). A resample in which any class lacks positives or negatives leaves AUROC
undefined: it is skipped and counted. Intervals are percentile intervals over the kept resamples.
"""

from __future__ import annotations

import numpy as np

from fracture_ops.evaluation.metrics import (
    Key,
    Mode,
    bin_index,
    sens_at_spec_from_curve,
    sens_at_spec_name,
    spec_at_sens_from_curve,
    spec_at_sens_name,
    top_label,
)
from fracture_ops.model.outputs import decisions

# Largest number of (image x resample) weights held at once: 4e6 float32 = 16 MB per array.
_CHUNK_ELEMENTS = 4_000_000


def patient_weights(patient_ids: np.ndarray, n_resamples: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Image weights of ``n_resamples`` patient-level resamples.

    Args:
        patient_ids: ``(n,)`` patient of each image.
        n_resamples: number of resamples ``B``.
        rng: the random generator (seeded by the caller for reproducibility).

    Returns:
        ``(n, B)`` array, one column per resample: how many times each image's patient was drawn.
        float32 halves the memory traffic and holds integer counts and their sums exactly below
        2**24 images; larger sets get float64.
    """
    _, patient_of_image = np.unique(np.asarray(patient_ids), return_inverse=True)
    n_patients = int(patient_of_image.max()) + 1 if len(patient_of_image) else 0
    # Drawing n_patients patients uniformly with replacement = one multinomial count vector.
    counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_resamples)
    dtype = np.float32 if len(patient_of_image) < 2**24 else np.float64
    return np.ascontiguousarray(counts.T.astype(dtype)[patient_of_image])


def _curves(y: np.ndarray, p: np.ndarray, w: np.ndarray):
    """Weighted cumulative TP/FP ``(K + 1, B)`` per distinct score (descending), origin first."""
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ws = w[order]
    pos = ws * y[order].astype(w.dtype)[:, None]
    total = ws
    if len(starts) < len(ps):  # tied scores: one ROC point per distinct score
        pos, total = np.add.reduceat(pos, starts, axis=0), np.add.reduceat(ws, starts, axis=0)
    neg = total - pos
    # Counts stay exact in float32; rates and areas are then computed in float64.
    tp = np.zeros((len(pos) + 1, w.shape[1]))
    fp = np.zeros_like(tp)
    np.cumsum(pos, axis=0, out=tp[1:])
    np.cumsum(neg, axis=0, out=fp[1:])
    return tp, fp


def weighted_curve_metrics(y, p, w, spec_targets=(), sens_targets=(), mode: Mode = "achievable"):
    """AUROC, AP and ROC operating points of one class for every resample.

    Args:
        y: ``(n,)`` 0/1 labels.
        p: ``(n,)`` scores.
        w: ``(n, B)`` resample weights.
        spec_targets: specificities for sensitivity-at-specificity.
        sens_targets: sensitivities for specificity-at-sensitivity.
        mode: operating-point mode (see ``metrics``).

    Returns:
        ``{metric_name: (B,) array}``; NaN where a resample lacks a class.
    """
    tp, fp = _curves(y, p, w)
    n_pos, n_neg = tp[-1], fp[-1]
    flagged = tp[1:] + fp[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / n_pos, fp / n_neg
        auroc = np.sum(np.diff(fpr, axis=0) * (tpr[1:] + tpr[:-1]), axis=0) / 2.0
        precision = np.divide(tp[1:], flagged, out=np.zeros_like(flagged), where=flagged > 0)
        ap = np.sum(np.diff(tp, axis=0) * precision, axis=0) / n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    out = {"auroc": auroc, "ap": ap}
    for s in spec_targets:  # the curve readers take one curve per row
        out[sens_at_spec_name(s)] = sens_at_spec_from_curve(fpr.T, tpr.T, s, mode)
    for s in sens_targets:
        out[spec_at_sens_name(s)] = spec_at_sens_from_curve(fpr.T, tpr.T, s, mode)
    return {k: np.where(valid, v, np.nan) for k, v in out.items()}


def weighted_binary_counts(y, pred, w):
    """``(tp, fp, fn, tn)``, each ``(B,)``, of 0/1 decisions under resample weights ``(n, B)``."""
    y, pred = np.asarray(y, dtype=bool), np.asarray(pred, dtype=bool)
    masks = np.stack([y & pred, ~y & pred, y & ~pred, ~y & ~pred]).astype(w.dtype)
    # One product in the weights' dtype stays in BLAS; integer counts are exact either way.
    return tuple((masks @ w).astype(np.float64))


def weighted_kappa(true_idx, pred_idx, w, n_classes: int) -> np.ndarray:
    """Cohen's kappa of label indices for every resample: ``(p_o - p_e) / (1 - p_e)``."""
    cell = np.asarray(true_idx) * n_classes + np.asarray(pred_idx)
    onehot = np.zeros((n_classes * n_classes, len(cell)), dtype=w.dtype)
    onehot[cell, np.arange(len(cell))] = 1.0
    conf = (onehot @ w).astype(np.float64).T.reshape(-1, n_classes, n_classes)
    total = conf.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = np.trace(conf, axis1=1, axis2=2) / total
        p_e = np.einsum("bi,bi->b", conf.sum(axis=2), conf.sum(axis=1)) / total**2
        return (p_o - p_e) / (1.0 - p_e)


def weighted_ece(y, p, w64, n_bins: int) -> np.ndarray:
    """ECE of every resample: ``sum_b |[bin b] * (y - p) @ W| / sum(W)`` (float64 weights)."""
    idx = bin_index(p, n_bins)
    gap = np.zeros((n_bins, len(p)))
    gap[idx, np.arange(len(p))] = np.asarray(y, dtype=float) - p
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(gap @ w64).sum(axis=0) / w64.sum(axis=0)


def resample_metrics(y, probs, w, task, class_names, thresholds, spec_targets=(0.80,),
                     sens_targets=(0.90,), n_bins=15, mode: Mode = "achievable") -> dict:
    """Every metric of :func:`metrics.compute_metrics`, for each resample in ``w``.

    Args:
        y, probs, task, class_names, thresholds, spec_targets, sens_targets, n_bins, mode: as
            :func:`fracture_ops.evaluation.metrics.compute_metrics`.
        w: ``(n, B)`` resample weights, one column per resample.

    Returns:
        ``{(class_or_None, metric): (B,) array}`` with the same keys as ``compute_metrics``.
    """
    out: dict[Key, np.ndarray] = {}
    pred = decisions(probs, task, thresholds)
    w64 = w.astype(np.float64, copy=False)  # for products with probabilities (ECE)
    for k, c in enumerate(class_names):
        yk = y[:, k]
        curves = weighted_curve_metrics(yk, probs[:, k], w, spec_targets, sens_targets, mode)
        out.update({(c, name): v for name, v in curves.items()})
        tp, fp, fn, tn = weighted_binary_counts(yk, pred[:, k], w)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[(c, "sensitivity")], out[(c, "specificity")] = tp / (tp + fn), tn / (tn + fp)
        if task != "multiclass":
            out[(c, "kappa")] = weighted_kappa(yk, pred[:, k], w, 2)
        out[(c, "ece")] = weighted_ece(yk, probs[:, k], w64, n_bins)
    out.update(_overall(y, probs, w, w64, task, class_names, out, n_bins))
    return out


def _overall(y, probs, w, w64, task, class_names, per_class, n_bins) -> dict[Key, np.ndarray]:
    """Task-level metrics per resample (as ``metrics._overall``)."""
    n_classes = len(class_names)
    out = {
        (None, "auroc_macro"): np.mean([per_class[(c, "auroc")] for c in class_names], axis=0),
        (None, "ap_mean"): np.mean([per_class[(c, "ap")] for c in class_names], axis=0),
    }
    if n_classes == 1:  # micro equals the single class: skip the second pass over the curve
        out[(None, "auroc_micro")] = per_class[(class_names[0], "auroc")]
    else:
        w_flat = np.repeat(w, n_classes, axis=0)  # y.ravel() is image-major
        micro = weighted_curve_metrics(y.ravel(), probs.ravel(), w_flat)
        out[(None, "auroc_micro")] = micro["auroc"]
    if task == "multiclass":
        correct, conf = top_label(y, probs)
        out[(None, "ece")] = weighted_ece(correct, conf, w64, n_bins)
        out[(None, "kappa")] = weighted_kappa(y.argmax(axis=1), probs.argmax(axis=1), w, n_classes)
        out[(None, "accuracy")] = (correct @ w64) / w64.sum(axis=0)
    else:
        out[(None, "ece")] = np.mean([per_class[(c, "ece")] for c in class_names], axis=0)
        if task == "binary":
            out[(None, "kappa")] = per_class[(class_names[0], "kappa")]
    return out


def bootstrap_ci(y, probs, patient_ids, task, class_names, thresholds, *, spec_targets=(0.80,),
                 sens_targets=(0.90,), n_bins=15, mode: Mode = "achievable", n_resamples=1000,
                 seed=0, level=0.95) -> dict:
    """Patient-level bootstrap percentile intervals of every metric.

    Args:
        y, probs, task, class_names, thresholds, spec_targets, sens_targets, n_bins, mode: as
            :func:`fracture_ops.evaluation.metrics.compute_metrics`.
        patient_ids: ``(n,)`` patient of each image (pass ``np.arange(n)`` for an image-level
            bootstrap).
        n_resamples: number of resamples drawn (skipped ones included).
        seed: seed of ``numpy.random.default_rng``; same seed, same intervals.
        level: coverage of the interval.

    Returns:
        ``{"ci": {key: (low, high)}, "n_resamples", "n_valid", "n_skipped", "level"}``.
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(len(y) * len(class_names), 1))
    collected: dict[Key, list[np.ndarray]] = {}
    n_valid = 0
    # The products here are small and memory-bound: BLAS threads only contend (measured 5-20x
    # slower with threads on a busy 2-core machine), so they run single-threaded.
    with threadpool_limits(limits=1, user_api="blas"):
        for start in range(0, n_resamples, chunk):
            w = patient_weights(patient_ids, min(chunk, n_resamples - start), rng)
            n_pos = y.T.astype(w.dtype) @ w  # (C, B)
            keep = np.all((n_pos > 0) & (n_pos < w.sum(axis=0)), axis=0)
            n_valid += int(keep.sum())
            if keep.any():
                values = resample_metrics(y, probs, w[:, keep], task, class_names, thresholds,
                                          spec_targets, sens_targets, n_bins, mode)
                for key, v in values.items():
                    collected.setdefault(key, []).append(v)
    return {"ci": _percentile_intervals(collected, level), "n_resamples": n_resamples,
            "n_valid": n_valid, "n_skipped": n_resamples - n_valid, "level": level}


def _percentile_intervals(collected: dict[Key, list[np.ndarray]], level: float) -> dict:
    """Percentile interval of each metric over the kept resamples (NaN-aware)."""
    tail = (1.0 - level) / 2.0 * 100.0
    ci: dict[Key, tuple[float, float]] = {}
    for key, parts in collected.items():
        values = np.concatenate(parts)
        if np.isfinite(values).any():
            lo, hi = np.nanpercentile(values, [tail, 100.0 - tail])
            ci[key] = (float(lo), float(hi))
        else:
            ci[key] = (float("nan"), float("nan"))
    return ci
