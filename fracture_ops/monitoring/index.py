"""HTML of the drift reports: the verdict banner, the self-contained check, and the index page.

The report of one date is Evidently's page with a banner put in front of it ("Drift detected" or
"No drift detected", the reasons, the drifted columns, the quality table). The index page
``<artifact_root>/monitoring/drift/index.html`` lists every date's report, newest first, and is
rebuilt from the dates' ``summary.json`` files each time, so rerunning a date never adds a second
entry. Every page is self-contained: reports are opened from object storage or in locked-down
browsers, so nothing may be fetched from the network.
"""

from __future__ import annotations

import html
import re
from typing import Any

from fracture_ops import storage

SUMMARY = "summary.json"
REPORT = "report.html"
INDEX = "index.html"
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# an attribute or a JS property that would make the browser fetch or link to a remote address:
# src="https://..", href='//..', v.href="https://.." (Plotly's logo link inside its bundle)
_REMOTE_REF = re.compile(r"""\b(src|href)(\s*=\s*)(["'])(?:https?:)?//[^"']*\3""", re.IGNORECASE)
_REMOTE_CSS = re.compile(r"""url\(\s*(["']?)(?:https?:)?//[^)]*\)""", re.IGNORECASE)
# Plotly's default topojson host: fetched only for geo maps, which these reports never draw
_PLOTLY_TOPOJSON = '"https://cdn.plot.ly/"'

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2530}
.fo-wrap{max-width:1100px;margin:0 auto;padding:16px 24px}
.fo-banner{padding:14px 24px;color:#fff}
.fo-banner h1{margin:0;font-size:26px}
.fo-banner.drift{background:#b3261e}.fo-banner.ok{background:#1e7a3c}.fo-banner.skip{background:#6b7280}
.fo-wrap table{border-collapse:collapse;margin:8px 0 16px}
.fo-wrap td,.fo-wrap th{border:1px solid #d0d5dd;padding:4px 10px;text-align:left;font-size:14px}
.fo-wrap th{background:#f2f4f7}.fo-yes{color:#b3261e;font-weight:600}.fo-no{color:#1e7a3c}
.fo-note{color:#475467;font-size:13px}
"""


def make_self_contained(page: str) -> tuple[str, int]:
    """Neutralise every remote ``src``/``href``/``url()`` so opening the page fetches nothing.

    Evidently 0.7 already inlines its scripts, styles and fonts; what remains are links inside
    bundled libraries (Plotly's logo anchor, its topojson host). They become ``#``.

    Returns:
        ``(page, replacements)``.
    """
    page, n1 = _REMOTE_REF.subn(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}#{m.group(3)}", page)
    page, n2 = _REMOTE_CSS.subn("url()", page)
    n3 = page.count(_PLOTLY_TOPOJSON)
    page = page.replace(_PLOTLY_TOPOJSON, '"./"')
    return page, n1 + n2 + n3


def remote_references(page: str) -> list[str]:
    """The remote ``src``/``href``/``url()`` references left in a page (empty when self-contained)."""
    return [m.group(0) for m in _REMOTE_REF.finditer(page)] + \
        [m.group(0) for m in _REMOTE_CSS.finditer(page)]


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


def verdict(summary: dict) -> tuple[str, str]:
    """``(css class, heading)`` of a summary: drift, no drift, or not enough data."""
    if summary.get("status") != "ok":
        return "skip", "Not enough data for a drift report"
    return ("drift", "Drift detected") if summary.get("drift_detected") else ("ok", "No drift detected")


def _column_table(title: str, results: dict[str, dict]) -> str:
    rows = "".join(
        f"<tr><td>{_e(c)}</td><td>{_e(r['method'])}</td><td>{_num(r['score'])}</td>"
        f"<td>{_num(r['threshold'])}</td><td class=\"{'fo-yes' if r['drifted'] else 'fo-no'}\">"
        f"{'drift' if r['drifted'] else 'no drift'}</td></tr>"
        for c, r in sorted(results.items(), key=lambda kv: (not kv[1]["drifted"], kv[0])))
    return (f"<h2>{_e(title)}</h2><table><tr><th>column</th><th>test</th><th>score</th>"
            f"<th>threshold</th><th>verdict</th></tr>{rows}</table>")


def _quality_html(perf: dict) -> str:
    if perf.get("status") != "ok":
        return (f"<h2>Model quality on labelled rows</h2><p class=\"fo-note\">Skipped: "
                f"{_e(perf.get('note', 'no labels'))}</p>")
    keys = ["n", "positives", "accuracy", "precision", "recall", "specificity", "f1", "auroc"]
    rows = "".join(f"<tr><td>{k}</td><td>{_num(perf['window'][k])}</td>"
                   f"<td>{_num(perf['reference'][k])}</td></tr>" for k in keys)
    label = perf.get("label_drift", {})
    note = f"<p class=\"fo-note\">{_e(perf['note'])}</p>" if perf.get("note") else ""
    return (f"<h2>Model quality on labelled rows (class {_e(perf['class'])})</h2>{note}"
            f"<table><tr><th>metric</th><th>window</th><th>reference</th></tr>{rows}</table>"
            f"<p class=\"fo-note\">Label drift ({_e(label.get('method'))}): score "
            f"{_num(label.get('score'))}, {'drift' if label.get('drifted') else 'no drift'}.</p>")


def report_banner(summary: dict) -> str:
    """The verdict banner and summary tables put in front of Evidently's report."""
    css, heading = verdict(summary)
    win, rows = summary.get("window", {}), summary.get("rows", {})
    facts = {"report date": summary.get("report_date"),
             "window": f"{win.get('start')} .. {win.get('end')} ({win.get('days')} day(s))",
             "model": f"{summary.get('model_name')} v{summary.get('model_version')}",
             "rows (window / reference)": f"{rows.get('window')} / {rows.get('reference')}",
             "labelled window rows": rows.get("window_labelled"),
             "share of drifted feature columns":
                 f"{_num(summary.get('drift_share'))} (threshold "
                 f"{_num(summary.get('thresholds', {}).get('drift_share_threshold'))})"}
    parts = [f"<div class=\"fo-banner {css}\"><h1>{heading}</h1></div><div class=\"fo-wrap\">",
             '<p><a href="../index.html">All drift reports</a></p><table>',
             *[f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items()], "</table>"]
    if summary.get("reasons"):
        parts.append("<h2>Why</h2><ul>" + "".join(f"<li>{_e(r)}</li>" for r in summary["reasons"])
                     + "</ul>")
    if summary.get("status") == "ok":
        parts += [_column_table("Data drift: image features", summary["features"]),
                  _column_table("Prediction drift", summary["prediction_drift"]["columns"]),
                  _quality_html(summary["performance"])]
        parts.append('<p class="fo-note">Below: Evidently\'s panels, in this order: the dataset '
                     "drift table of the image features, one panel per prediction column, then "
                     "model quality on the labelled rows (when labels exist).</p>")
    parts += [f"<p class=\"fo-note\">{_e(n)}</p>" for n in summary.get("notes", [])]
    parts.append("<p class=\"fo-note\">Research and education only; not for clinical use.</p></div>")
    return "".join(parts)


def insert_banner(page: str, banner: str, title: str) -> str:
    """Put ``banner`` first in ``page``'s body and our styles and ``title`` in its head."""
    head = f"<title>{_e(title)}</title><style>{_CSS}</style>"
    page, n = re.subn(r"<head>", lambda m: m.group(0) + head, page, count=1)
    if not n:
        page = head + page
    match = re.search(r"</head>\s*<body[^>]*>", page)
    if match is None:  # not Evidently's usual page: prepend, the browser copes
        return banner + page
    return page[:match.end()] + banner + page[match.end():]


def standalone_page(summary: dict, title: str) -> str:
    """A report page without Evidently's panels (too few rows to compare)."""
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}"
            f"</title><style>{_CSS}</style></head><body>{report_banner(summary)}</body></html>")


def collect_entries(drift_root: str) -> list[dict]:
    """One entry per finished date folder under ``drift_root``, newest first."""
    files = set(storage.list_files(drift_root))
    entries = []
    for uri in files:
        if not uri.endswith(SUMMARY):
            continue
        folder = uri[: -len(SUMMARY)].rstrip("/\\")
        date = re.split(r"[/\\]", folder)[-1]
        if not DATE_RE.match(date) or storage.join(folder, storage.SUCCESS_MARKER) not in files:
            continue
        entries.append(storage.read_json(uri))
    return sorted(entries, key=lambda s: s["report_date"], reverse=True)


def render_index(entries: list[dict]) -> str:
    """The index page: one row per date, newest first, linking each date's report."""
    rows = []
    for s in entries:
        css, heading = verdict(s)
        date = _e(s["report_date"])
        drifted = ", ".join(d["column"] for d in s.get("drifted_features", [])[:6]) or "-"
        rows.append(
            f"<tr><td><a href=\"{date}/{REPORT}\">{date}</a></td>"
            f"<td class=\"{'fo-yes' if css == 'drift' else 'fo-no'}\">{heading}</td>"
            f"<td>{_num(s.get('drift_share'))}</td><td>{_e(drifted)}</td>"
            f"<td>{_e(s.get('model_version'))}</td><td>{_e(s.get('rows', {}).get('window'))}</td>"
            f"<td><a href=\"{date}/{SUMMARY}\">json</a></td></tr>")
    body = "".join(rows) or "<tr><td colspan=\"7\">No reports yet.</td></tr>"
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Drift reports</title><style>{_CSS}</style></head><body><div class=\"fo-wrap\">"
            "<h1>Drift reports</h1><p class=\"fo-note\">Prediction-log windows compared with the "
            "model version's reference table (Evidently); newest first.</p><table><tr><th>date</th>"
            "<th>verdict</th><th>drift share</th><th>drifted features</th><th>model version</th>"
            f"<th>rows</th><th>summary</th></tr>{body}</table></div></body></html>")


def write_index(drift_root: str) -> str:
    """Rebuild ``<drift_root>/index.html`` (and ``index.json``) from the finished dates."""
    entries = collect_entries(drift_root)
    storage.write_json(storage.join(drift_root, "index.json"),
                       [{k: s.get(k) for k in ("report_date", "status", "drift_detected",
                                                "drift_share", "model_version")}
                        | {"drifted_features": [d["column"] for d in s.get("drifted_features", [])]}
                        for s in entries])
    return storage.write_text(storage.join(drift_root, INDEX), render_index(entries))
