"""Evaluation plots as PNG bytes: ROC, precision-recall, confusion matrix, reliability diagram.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no display, safe in
worker threads). PNGs carry no timestamp, so reruns write identical bytes.
"""

from __future__ import annotations

import io

import numpy as np

from fracture_ops.evaluation.metrics import (
    both_classes,
    expected_calibration_error,
    reliability_bins,
    top_label,
)


def _figure(n_panels: int = 1, width: float = 5.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_panels, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]


def to_png(fig) -> bytes:
    """Render a figure to PNG bytes without metadata (reproducible output)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot_roc(y: np.ndarray, probs: np.ndarray, class_names: list[str], title: str = "ROC") -> bytes:
    """ROC curve of every class (one-vs-rest) with its AUROC in the legend.

    Args:
        y: ``(n, C)`` 0/1 labels.
        probs: ``(n, C)`` probabilities.
        class_names: the ``C`` class names.
        title: the plot title.

    Returns:
        PNG bytes.
    """
    from sklearn.metrics import auc, roc_curve

    fig, (ax,) = _figure()
    for k, c in enumerate(class_names):
        if both_classes(y[:, k]):
            fpr, tpr, _ = roc_curve(y[:, k], probs[:, k])
            ax.plot(fpr, tpr, label=f"{c} (AUROC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(
        xlabel="1 - specificity (FPR)",
        ylabel="sensitivity (TPR)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize="small")
    return to_png(fig)


def plot_pr(
    y: np.ndarray, probs: np.ndarray, class_names: list[str], title: str = "Precision-recall"
) -> bytes:
    """Precision-recall curve of every class with its AP and prevalence (arguments as ROC)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, (ax,) = _figure()
    for k, c in enumerate(class_names):
        if both_classes(y[:, k]):
            precision, recall, _ = precision_recall_curve(y[:, k], probs[:, k])
            ap = average_precision_score(y[:, k], probs[:, k])
            (line,) = ax.step(recall, precision, where="post", label=f"{c} (AP {ap:.3f})")
            ax.axhline(y[:, k].mean(), ls=":", lw=1, color=line.get_color())
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower left", fontsize="small")
    return to_png(fig)


def _luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour (components 0-1)."""
    c = np.asarray(rgb[:3], dtype=float)
    c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2])


def contrast(a, b) -> float:
    """WCAG contrast ratio of two colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour(cell_rgb) -> tuple[float, float, float]:
    """Black or white, whichever contrasts more with the cell it is written on."""
    black, white = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return black if contrast(black, cell_rgb) >= contrast(white, cell_rgb) else white


def _draw_matrix(ax, matrix: np.ndarray, labels: list[str], title: str) -> None:
    image = ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):  # the count in the colour its own cell calls for
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize="large",
                color=text_colour(image.cmap(image.norm(v))))
    ticks = list(range(len(labels)))
    ax.set_xticks(ticks, labels, rotation=45 if len(labels) > 2 else 0)
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)


def plot_confusion(y: np.ndarray, pred: np.ndarray, task: str, class_names: list[str]) -> bytes:
    """Confusion matrix: C x C on the argmax (multiclass), one 2 x 2 per class otherwise.

    Args:
        y: ``(n, C)`` 0/1 labels.
        pred: ``(n, C)`` 0/1 decisions (see ``fracture_ops.model.outputs.decisions``).
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: the ``C`` class names.

    Returns:
        PNG bytes.
    """
    from sklearn.metrics import confusion_matrix

    if task == "multiclass":
        fig, (ax,) = _figure(height=5.0)
        labels = list(range(len(class_names)))
        m = confusion_matrix(y.argmax(axis=1), pred.argmax(axis=1), labels=labels)
        _draw_matrix(ax, m, class_names, "confusion (argmax)")
        return to_png(fig)
    fig, axes = _figure(len(class_names), width=4.0, height=4.0)
    for k, (ax, c) in enumerate(zip(axes, class_names)):
        m = confusion_matrix(y[:, k], pred[:, k], labels=[0, 1])
        _draw_matrix(ax, m, [f"not {c}", c], f"{c} at threshold")
    return to_png(fig)


def _reliability_panel(ax, y: np.ndarray, p: np.ndarray, n_bins: int, title: str) -> None:
    bins = reliability_bins(y, p, n_bins)
    edges = np.asarray(bins["edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    freq = np.array([np.nan if f is None else f for f in bins["frequency"]])
    ax.bar(
        centers,
        np.nan_to_num(freq),
        width=width,
        edgecolor="black",
        alpha=0.7,
        label="observed frequency",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    share = np.asarray(bins["count"]) / max(len(p), 1)
    ax.bar(
        centers, share, width=width * 0.4, color="tab:orange", alpha=0.6, label="share of images"
    )
    ece = expected_calibration_error(y, p, n_bins)
    ax.set(
        xlabel="predicted probability",
        ylabel="frequency",
        title=f"{title} (ECE {ece:.3f})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize="x-small")


def plot_reliability(
    y: np.ndarray, probs: np.ndarray, task: str, class_names: list[str], n_bins: int = 15
) -> bytes:
    """Reliability diagram: per class (binary/multilabel) or top-label confidence (multiclass).

    Args:
        y: ``(n, C)`` 0/1 labels.
        probs: ``(n, C)`` probabilities.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: the ``C`` class names.
        n_bins: equal-width bins, as for the ECE.

    Returns:
        PNG bytes.
    """
    if task == "multiclass":
        fig, (ax,) = _figure()
        correct, conf = top_label(y, probs)
        _reliability_panel(ax, correct, conf, n_bins, "reliability (top-label)")
        return to_png(fig)
    fig, axes = _figure(len(class_names), width=4.5)
    for k, (ax, c) in enumerate(zip(axes, class_names)):
        _reliability_panel(ax, y[:, k], probs[:, k], n_bins, f"reliability: {c}")
    return to_png(fig)
