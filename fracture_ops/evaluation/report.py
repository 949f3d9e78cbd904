"""The evaluation report a reader signs off on: ``evaluation.html`` beside ``evaluation.json``.

One self-contained page (inline PNGs and CSS, no script, no request leaves the file):

- the metrics table with the patient-level bootstrap intervals of ``evaluation.json``;
- per class, ROC and precision-recall curves with a 95% band (patient-level bootstrap: the
  curve of each resample read on a fixed grid, the 2.5th and 97.5th percentiles) and the
  operating point the tuned threshold gives;
- the reliability curve before and after calibration, with both ECEs;
- the confusion matrices (counts in a colour chosen for contrast against their cell);
- the threshold table: sensitivity, specificity, PPV and NPV (with the counts) at each tuned
  threshold;
- study level (when the predictions carry ``study_id``: a study is positive when any image is,
  and scores its highest probability) and per body region.
"""

from __future__ import annotations

import base64
import html

import numpy as np

from fracture_ops.evaluation import plots
from fracture_ops.evaluation.bootstrap import patient_weights
from fracture_ops.evaluation.metrics import both_classes, expected_calibration_error, roc_auc
from fracture_ops.model.outputs import decisions

DISCLAIMER = "Research and education use only, not for clinical use."
GRID = np.linspace(0.0, 1.0, 101)


def _resamples(patient_ids: np.ndarray, n: int, seed: int):
    """Image index arrays of ``n`` patient-level resamples (all images of a drawn patient, as
    many times as it was drawn), from the evaluation's own resampler."""
    weights = patient_weights(patient_ids, n, np.random.default_rng(seed)).astype(np.int64)
    images = np.arange(len(patient_ids))
    for b in range(n):
        yield np.repeat(images, weights[:, b])


def curve_bands(y: np.ndarray, p: np.ndarray, patient_ids: np.ndarray, n: int = 200,
                seed: int = 0) -> dict:
    """95% bands of one class's ROC (TPR at each FPR of :data:`GRID`) and precision-recall
    curve (interpolated precision, the highest at that recall or beyond, at each recall of the
    grid) over patient-level resamples; resamples without both labels are skipped."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    tprs, precs = [], []
    for idx in _resamples(patient_ids, n, seed):
        if not both_classes(y[idx]):
            continue
        fpr, tpr, _ = roc_curve(y[idx], p[idx])
        tprs.append(np.interp(GRID, fpr, tpr))
        precision, recall, _ = precision_recall_curve(y[idx], p[idx])
        best = np.maximum.accumulate(precision[::-1])[::-1]  # highest precision at >= recall
        order = np.argsort(recall, kind="stable")
        precs.append(np.interp(GRID, recall[order], best[order]))
    if not tprs:
        return {"n": 0}
    t, q = np.asarray(tprs), np.asarray(precs)
    return {"n": len(tprs), "tpr_low": np.percentile(t, 2.5, axis=0),
            "tpr_high": np.percentile(t, 97.5, axis=0), "prec_low": np.percentile(q, 2.5, axis=0),
            "prec_high": np.percentile(q, 97.5, axis=0)}


def operating_table(y: np.ndarray, pred: np.ndarray, class_names: list[str],
                    thresholds) -> list[dict]:
    """Per class at its threshold: counts, sensitivity, specificity, PPV and NPV (None where a
    denominator is zero)."""
    rows = []
    for k, c in enumerate(class_names):
        t, d = y[:, k].astype(bool), pred[:, k].astype(bool)
        tp, fp = int((t & d).sum()), int((~t & d).sum())
        fn, tn = int((t & ~d).sum()), int((~t & ~d).sum())
        ratio = lambda a, b: a / (a + b) if a + b else None  # noqa: E731
        rows.append({"class": c, "threshold": float(thresholds[k]), "tp": tp, "fp": fp, "tn": tn,
                     "fn": fn, "sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp),
                     "ppv": ratio(tp, fp), "npv": ratio(tn, fn)})
    return rows


def study_level(y: np.ndarray, probs: np.ndarray, study_ids: np.ndarray, class_names: list[str],
                thresholds, task: str = "binary") -> list[dict]:
    """Per class over studies: a study is positive when any of its images is and scores the
    highest probability of its images; AUROC and the operating point at the threshold."""
    studies, inverse = np.unique(study_ids.astype(str), return_inverse=True)
    ys = np.zeros((len(studies), y.shape[1]))
    ps = np.full((len(studies), y.shape[1]), -np.inf)
    np.maximum.at(ys, inverse, y)
    np.maximum.at(ps, inverse, probs)
    out = operating_table(ys, decisions(ps, task, thresholds), class_names, thresholds)
    for k, row in enumerate(out):
        row["studies"] = len(studies)
        row["auroc"] = roc_auc(ys[:, k], ps[:, k]) if both_classes(ys[:, k]) else None
    return out


def _roc_pr_png(y, p, band, point, name: str) -> bytes:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve, auc

    fig, (roc, pr) = plots._figure(2, width=4.6, height=4.2)
    fpr, tpr, _ = roc_curve(y, p)
    roc.plot(fpr, tpr, color="tab:blue", label=f"AUROC {auc(fpr, tpr):.3f}")
    precision, recall, _ = precision_recall_curve(y, p)
    pr.step(recall, precision, where="post", color="tab:blue",
            label=f"AP {average_precision_score(y, p):.3f}")
    if band.get("n"):
        roc.fill_between(GRID, band["tpr_low"], band["tpr_high"], color="tab:blue", alpha=0.2,
                         label=f"95% band ({band['n']} patient resamples)")
        pr.fill_between(GRID, band["prec_low"], band["prec_high"], color="tab:blue", alpha=0.2,
                        label="95% band")
    sens, spec, ppv = point["sensitivity"], point["specificity"], point["ppv"]
    if sens is not None and spec is not None:
        roc.plot([1 - spec], [sens], "o", color="tab:red", label=f"threshold {point['threshold']:.3f}")
    if sens is not None and ppv is not None:
        pr.plot([sens], [ppv], "o", color="tab:red", label=f"threshold {point['threshold']:.3f}")
    roc.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    pr.axhline(y.mean(), ls=":", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
    roc.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {name}", xlim=(0, 1),
            ylim=(0, 1.01))
    pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"PR: {name}",
           xlim=(0, 1), ylim=(0, 1.01))
    roc.legend(loc="lower right", fontsize="x-small")
    pr.legend(loc="lower left", fontsize="x-small")
    return plots.to_png(fig)


def _calibration_png(y, before, after, name: str, n_bins: int) -> bytes:
    from fracture_ops.evaluation.metrics import reliability_bins

    fig, (ax,) = plots._figure(1, width=4.8, height=4.2)
    for p, label, colour in ((before, "before", "tab:grey"), (after, "after", "tab:blue")):
        bins = reliability_bins(y, p, n_bins)
        keep = [i for i, f in enumerate(bins["frequency"]) if f is not None]
        ax.plot([bins["confidence"][i] for i in keep], [bins["frequency"][i] for i in keep], "o-",
                color=colour, label=f"{label} calibration (ECE {expected_calibration_error(y, p, n_bins):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    ax.set(xlabel="predicted probability", ylabel="observed frequency",
           title=f"calibration: {name}", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize="x-small")
    return plots.to_png(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _table(head: list[str], rows: list[list], cls: str) -> str:
    return (f'<table class="{cls}"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr>" + "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>"
                                for r in rows) + "</table>")


def _leaf(node: dict) -> str:
    if not isinstance(node, dict) or node.get("value") is None:
        return "n/a"
    ci = (f" ({node['ci_low']:.3f}-{node['ci_high']:.3f})"
          if node.get("ci_low") is not None and node.get("ci_high") is not None else "")
    return f"{node['value']:.3f}{ci}"


def build_report_html(report: dict, y: np.ndarray, probs: np.ndarray, uncalibrated: np.ndarray,
                      rows, task: str, class_names: list[str], thresholds, n_bins: int,
                      n_band: int = 200, seed: int = 0) -> str:
    """The report page (see the module docstring) from the evaluated rows and their report."""
    pred = decisions(probs, task, thresholds)
    patients = rows["patient_id"].astype(str).to_numpy()
    ops = operating_table(y, pred, class_names, thresholds)
    per_class = report["metrics"]["per_class"]
    metric_rows = [[c, _leaf(per_class[c].get("auroc")), _leaf(per_class[c].get("ap")),
                    _leaf(per_class[c].get("sensitivity")), _leaf(per_class[c].get("specificity")),
                    _leaf(per_class[c].get("ece"))] for c in class_names]
    parts = [f"<h1>Evaluation report: {html.escape(report.get('split', ''))} split</h1>",
             f'<p class="warn">{DISCLAIMER}</p>',
             f"<p>{report['n_images']} images of {report['n_patients']} patients; decision "
             f"{html.escape(report.get('decision', ''))}; calibration "
             f"<code>{html.escape(str(report.get('calibration', {}).get('method')))}</code>. "
             "Intervals: 95%, patient-level bootstrap.</p>",
             "<h2>Metrics</h2>",
             _table(["class", "AUROC", "AP", "sensitivity", "specificity", "ECE"], metric_rows,
                    "metrics"),
             "<h2>Operating points at the tuned thresholds</h2>",
             _table(["class", "threshold", "TP", "FP", "TN", "FN", "sensitivity", "specificity",
                     "PPV", "NPV"], [[r["class"], r["threshold"], r["tp"], r["fp"], r["tn"],
                                      r["fn"], r["sensitivity"], r["specificity"], r["ppv"],
                                      r["npv"]] for r in ops], "thresholds"),
             "<h2>ROC and precision-recall</h2>"]
    for k, c in enumerate(class_names):
        if not both_classes(y[:, k]):
            parts.append(f"<p>{html.escape(c)}: one label only in this split; no curve.</p>")
            continue
        band = curve_bands(y[:, k], probs[:, k], patients, n_band, seed)
        parts.append(_img(_roc_pr_png(y[:, k], probs[:, k], band, ops[k], c), f"ROC and PR: {c}"))
    parts.append("<h2>Calibration before and after</h2>")
    parts += [_img(_calibration_png(y[:, k], uncalibrated[:, k], probs[:, k], c, n_bins),
                   f"calibration: {c}") for k, c in enumerate(class_names)]
    parts += ["<h2>Confusion</h2>", _img(plots.plot_confusion(y, pred, task, class_names),
                                         "confusion matrices")]
    parts.append("<h2>Study level</h2>")
    if "study_id" in rows.columns and rows["study_id"].notna().all():
        st = study_level(y, probs, rows["study_id"].to_numpy(), class_names, thresholds, task)
        parts.append(_table(["class", "studies", "AUROC", "sensitivity", "specificity", "PPV",
                             "NPV"], [[r["class"], r["studies"], r["auroc"], r["sensitivity"],
                                       r["specificity"], r["ppv"], r["npv"]] for r in st], "studies"))
    else:
        parts.append("<p>The predictions carry no study ids: no study-level table.</p>")
    parts.append("<h2>By body region</h2>")
    regions = report.get("by_body_region", {})
    region_rows = [[r, v.get("n_images"), _leaf(v.get("metrics", {}).get("overall", {}).get(
        "auroc_macro")), v.get("skipped", "")] for r, v in regions.items()]
    parts.append(_table(["region", "images", "AUROC", "note"], region_rows, "regions")
                 if region_rows else "<p>The predictions carry no body regions.</p>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;color:#222;"
             "background:#fff}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #999;padding:.25em .6em;text-align:right}"
             "th{background:#eef}td:first-child{text-align:left}img{max-width:100%;margin:.4em 0}"
             ".warn{color:#a00;font-weight:bold}")
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>Evaluation report"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
