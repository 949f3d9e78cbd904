"""The summary (``summary.json``) and human-readable ``report.html`` of the ``validate`` step.

Self-contained (inline CSS, no scripts, fonts or images from elsewhere) so it opens offline and
can be attached to a ticket. Rows are named by ``image_id`` only: file names may carry PHI.
"""

from __future__ import annotations

from collections import Counter
from html import escape

import pandas as pd

from fracture_ops.data.manifest import manifest_hash

MAX_ROWS = 1000  # the full list is in quarantine.parquet

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}
table{border-collapse:collapse;margin:.4rem 0;font-size:.9rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ok{color:#17692b;font-weight:bold}.bad{color:#a4161a;font-weight:bold}
.note{color:#555;font-size:.85rem}
"""


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>" if rows else "<p class='note'>none</p>"


def render_html(summary: dict, quarantine: pd.DataFrame) -> str:
    """Render the validation summary and the quarantined rows as one HTML page.

    Args:
        summary: the dict written to ``summary.json``.
        quarantine: quarantined rows with ``image_id``, ``reason`` and ``detail`` columns (the
            raw zone's report), or ``row`` and ``reason`` only (the dataset store's).

    Returns:
        the HTML document as a string.
    """
    verdict = summary["verdict"]
    cls = "ok" if verdict == "ok" else "bad"
    # the raw zone's report names images; the dataset store's names rows of the raw manifest
    key = "image_id" if any("image_id" in w for w in summary["warnings"]) or \
        "image_id" in quarantine.columns else "row"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>fracture-ops validation report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>Manifest validation report</h1>",
        (f"<p>Verdict: <span class='{cls}'>{escape(verdict)}</span> &mdash; "
         f"{summary['quarantined']} of {summary['rows']} rows quarantined "
         f"({summary['bad_fraction']:.2%}; error budget {summary['max_bad_fraction']:.2%}).</p>"),
        (f"<p class='bad'>Failed table checks: {escape(', '.join(summary['failed_checks']))}</p>"
         if summary["failed_checks"] else ""),
        "<h2>Quarantine reasons</h2>",
        _table(["reason", "rows"], [[k, v] for k, v in summary["reasons"].items()]),
        "<h2>Label prevalence</h2>",
        _table(["label", "fraction"], [[k, f"{v:.3f}"] for k, v in summary["prevalence"].items()]),
        "<h2>Expectations (Great Expectations)</h2>",
        _table(["level", "expectation", "column", "values", "mostly", "success", "unexpected"],
               [[c["level"], c["expectation"], c["column"], c["value_set"] or "",
                 "" if c["mostly"] is None else c["mostly"],
                 "yes" if c["success"] else "NO",
                 "" if c["unexpected_count"] is None else c["unexpected_count"]]
                for c in summary["table_checks"]]),
        "<h2>Warnings (images kept)</h2>",
        _table([key, "warning"],
               [[w[key], w["warning"]] for w in summary["warnings"][:MAX_ROWS]]),
    ]
    if "boxes" in summary:
        b = summary["boxes"]
        parts += ["<h2>Boxes</h2>", f"<p>{b['clean']} kept, {b['quarantined']} quarantined.</p>",
                  _table(["reason", "boxes"], [[k, v] for k, v in sorted(b["reasons"].items())])]
    cols = [c for c in ("row", "image_id", "reason", "detail") if c in quarantine.columns]
    rows = quarantine.head(MAX_ROWS)[cols].values.tolist()
    parts += ["<h2>Quarantined rows</h2>", _table(cols, rows)]
    if len(quarantine) > MAX_ROWS:
        parts.append(f"<p class='note'>first {MAX_ROWS} of {len(quarantine)} rows shown; all are "
                     "in quarantine.parquet.</p>")
    parts.append("<p class='note'>Research and education only; not for clinical use.</p>"
                 "</body></html>")
    return "\n".join(parts) + "\n"


def summarise(cfg, df: pd.DataFrame, clean: pd.DataFrame, quarantine: pd.DataFrame,
              checks: list[dict], warnings: dict[int, list[str]]) -> dict:
    """Build the ``summary.json`` content: counts, reasons, checks, warnings and the verdict.

    Args:
        cfg: the step's ``ValidateConfig``.
        df: the validated manifest; ``clean``/``quarantine``: its two parts.
        checks: one dict per GX expectation; ``warnings``: image warnings by row position.

    Returns:
        a JSON-able dict without timestamps (reruns write identical files).
    """
    reasons = Counter(r for text in quarantine["reason"] for r in text.split(";"))
    bad_fraction = len(quarantine) / len(df)
    failed = [f"{c['expectation']}({c['column']}{', ' + str(c['value_set']) if c['value_set'] else ''})"
              for c in checks if c["level"] == "table" and not c["success"]]
    verdict = ("error_budget_exceeded" if bad_fraction > cfg.max_bad_fraction else
               "table_checks_failed" if failed and cfg.fail_on_table_checks else "ok")
    ids = df["image_id"]
    warn_list = [{"image_id": str(ids.iat[i]), "warning": w}
                 for i in sorted(warnings) for w in warnings[i]]
    return {
        "rows": len(df), "clean": len(clean), "quarantined": len(quarantine),
        "bad_fraction": round(bad_fraction, 6), "max_bad_fraction": cfg.max_bad_fraction,
        "verdict": verdict, "reasons": dict(sorted(reasons.items())), "failed_checks": failed,
        "table_checks": checks,
        "prevalence": {str(k): round(float(v), 6)
                       for k, v in df["label"].value_counts(normalize=True).sort_index().items()},
        "warnings": warn_list,
        "warning_counts": dict(sorted(Counter(w["warning"].split(":")[0]
                                              for w in warn_list).items())),
        "images_checked": bool(cfg.check_images),
        "input_manifest_hash": manifest_hash(df), "clean_manifest_hash": manifest_hash(clean),
    }
