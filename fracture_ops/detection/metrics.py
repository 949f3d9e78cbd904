"""Detection metrics, and image-level metrics that put the detector beside the classifier.

- Box metrics come from ultralytics' validator (``DetMetrics``): mAP@0.5, mAP@0.5:0.95 (COCO's
  101-point interpolated AP averaged over IoU 0.50:0.05:0.95; Lin et al. 2014, "Microsoft COCO"),
  mean precision/recall at the max-F1 confidence, and the same per class.
- The image-level fracture score of an image is the highest confidence of its predicted boxes
  (0 without a box); AUROC comes from scikit-learn, and sensitivity at a target specificity is read
  off scikit-learn's full ROC curve as the best sensitivity a real threshold reaches with
  specificity >= target (the "achievable" operating point, as in
  :mod:`fracture_ops.evaluation.metrics`), so both tracks fill the same table columns.
- Per-image matching (for the report's worst-first order) uses IoU from ``torchvision.ops.box_iou``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

_EPS = 1e-9  # 1 - 0.8 is 0.19999999999999996 in floating point


def _num(x) -> float:
    """A plain float (NaN stays NaN) from numpy/torch scalars."""
    v = float(x)
    return v if math.isfinite(v) else float("nan")


def det_metrics_summary(det_metrics, class_names: list[str]) -> dict:
    """Flatten ultralytics ``DetMetrics`` into a JSON-ready dict.

    Args:
        det_metrics: what ``YOLO.val()`` returns (``.box`` holds the box ``Metric``).
        class_names: class names in index order.

    Returns:
        ``{"map50", "map50_95", "precision", "recall", "per_class": {name: {...}}}``; classes
        without ground-truth boxes in the split are absent from ``per_class``.
    """
    box = det_metrics.box
    per_class = {}
    for i, cls in enumerate(box.ap_class_index):
        p, r, ap50, ap = box.class_result(i)
        per_class[class_names[int(cls)]] = {"ap50": _num(ap50), "ap50_95": _num(ap),
                                            "precision": _num(p), "recall": _num(r)}
    return {"map50": _num(box.map50), "map50_95": _num(box.map), "precision": _num(box.mp),
            "recall": _num(box.mr), "per_class": per_class}


def sens_at_spec_name(spec: float) -> str:
    """Metric name for sensitivity at specificity ``spec``, e.g. ``sens_at_spec_0.80``."""
    return f"sens_at_spec_{spec:.2f}"


def sensitivity_at_specificity(y: np.ndarray, scores: np.ndarray, spec: float
                               ) -> tuple[float, float]:
    """Best sensitivity among ROC thresholds whose specificity is at least ``spec``.

    Returns:
        ``(sensitivity, threshold)``; NaNs when ``y`` holds a single class.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(int)
    if y.min(initial=0) == y.max(initial=0):
        return float("nan"), float("nan")
    fpr, tpr, thr = roc_curve(y, scores, drop_intermediate=False)
    ok = np.flatnonzero(fpr <= 1.0 - spec + _EPS)  # a prefix: fpr is non-decreasing
    i = ok[-1]
    return float(tpr[i]), float(min(thr[i], 1.0))  # sklearn's first threshold is +inf


def image_level_metrics(y: Iterable[int], scores: Iterable[float], spec: float = 0.80) -> dict:
    """Classification metrics of the image-level fracture score.

    Args:
        y: 1 for a fracture image (has ground-truth boxes / label ``fracture``), else 0.
        scores: image scores (max box confidence, 0 without a box).
        spec: target specificity for the sensitivity read-out.

    Returns:
        ``{"auroc", "sens_at_spec_0.80", "threshold_at_spec_0.80", "n_pos", "n_neg"}`` (NaN
        where undefined: a single class present).
    """
    from sklearn.metrics import roc_auc_score

    y, scores = np.asarray(list(y), dtype=int), np.asarray(list(scores), dtype=float)
    both = bool(len(y)) and y.min() != y.max()
    auroc = float(roc_auc_score(y, scores)) if both else float("nan")
    sens, thr = sensitivity_at_specificity(y, scores, spec) if both else (float("nan"),) * 2
    name = sens_at_spec_name(spec)
    return {"auroc": auroc, name: sens, name.replace("sens_at", "threshold_at"): thr,
            "n_pos": int(y.sum()), "n_neg": int(len(y) - y.sum())}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes -> ``(N, M)`` (torchvision)."""
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    a, b = np.asarray(a, dtype=np.float32).reshape(-1, 4), np.asarray(b, dtype=np.float32).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), dtype=np.float32)
    return tv_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def match_image(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Compare one image's ground truth with its predictions (class-agnostic).

    Args:
        gt: ``(N, 4)`` ground-truth xyxy boxes.
        pred: ``(M, 4)`` predicted xyxy boxes.
        iou_threshold: IoU at which a ground-truth box counts as found.

    Returns:
        ``{"gt", "missed", "false_pos", "min_best_iou"}``: ``min_best_iou`` is the lowest, over
        ground-truth boxes, of each box's best IoU with any prediction (1.0 without ground truth).
    """
    iou = box_iou(gt, pred)
    best_per_gt = iou.max(axis=1) if iou.shape[1] else np.zeros(len(gt))
    best_per_pred = iou.max(axis=0) if iou.shape[0] else np.zeros(len(pred))
    return {"gt": int(len(gt)), "missed": int((best_per_gt < iou_threshold).sum()),
            "false_pos": int((best_per_pred < iou_threshold).sum()),
            "min_best_iou": float(best_per_gt.min()) if len(gt) else 1.0}


def severity_key(match: dict, score: float) -> tuple:
    """Sort key putting the worst images first: most missed fractures, then the poorest overlap,
    then false positives on negatives by confidence."""
    return (-match["missed"], match["min_best_iou"], -match["false_pos"], -score)
