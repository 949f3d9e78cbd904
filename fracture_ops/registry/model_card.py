"""Model card of a registered version: Markdown (the version's description in the MLflow UI) and
a self-contained HTML page (logged with the run, linked from the version's tags).

Sections follow the spirit of MONAI bundle metadata and the TRIPOD+AI / CLAIM checklists:
intended use (research only), data sources and licences, patient-wise split counts, metrics
with 95% confidence intervals per class and per body region, thresholds, calibration, Grad-CAM
examples and known limitations.
"""

from __future__ import annotations

import html
import re

from fracture_ops import catalog
from fracture_ops import storage

LICENCES = {
    "fracatlas": "FracAtlas (Abedeen et al., 2023), CC BY 4.0",
    "grazpedwri": "GRAZPEDWRI-DX (Nagy et al., 2022), CC BY 4.0",
    "mura": "MURA (Rajpurkar et al., 2017), Stanford research use agreement",
    "synthetic": "fracture-ops synthetic radiographs (generated; no patients)",
}
DISCLAIMER = ("Research and education only. Not a medical device and not for clinical use: "
              "never use its output to make or support decisions about a patient's care.")
LIMITATIONS = [
    "Validated only on the data sets listed here; performance on other sites, devices, "
    "populations or body regions is unknown.",
    "Grad-CAM maps are coarse and can highlight regions that are not the fracture; they explain "
    "the model, not the anatomy.",
    "Where a source has no patient ids (FracAtlas), images of one person may fall into different "
    "splits, which can make the metrics optimistic.",
    "Calibration and thresholds were fitted on the validation split; they drift with prevalence.",
]


def _ci(leaf: dict | None) -> str:
    if not leaf or leaf.get("value") is None:
        return "n/a"
    lo, hi = leaf.get("ci_low"), leaf.get("ci_high")
    ci = f" ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
    return f"{leaf['value']:.3f}{ci}"


def _metric_rows(per_class: dict) -> list[list[str]]:
    keys = ["auroc", "ap", "sensitivity", "specificity", "sens_at_spec_0.80", "spec_at_sens_0.90", "ece"]
    return [[c] + [_ci(m.get(k)) for k in keys] for c, m in per_class.items()]


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


NOT_RECORDED = object()


def _weights_line(pretrained) -> str:
    """Where the starting weights come from (the train step's provenance record; runs trained
    before it was recorded say so)."""
    if pretrained is NOT_RECORDED:
        return "- Initial weights: not recorded by the training run"
    if not pretrained:
        return "- Initial weights: none (trained from scratch)"
    text = f"- Initial weights: `{pretrained.get('source')}`"
    if pretrained.get("package"):
        text += f" ({pretrained['package']} {pretrained.get('package_version', '')}".rstrip() + ")"
    text += f", file SHA-256 `{pretrained.get('file_sha256')}`"
    if pretrained.get("license"):
        text += f", licence {pretrained['license']}"
    if pretrained.get("origin"):
        text += f"; {pretrained['origin']}"
    return text


def _calibration_text(cal: dict, test: dict) -> str:
    """What calibration did: the method applied (or why none was), ECE on validation and on
    test before and after (a calibration that made test worse is there to see)."""
    nan = float("nan")
    method = cal.get("calibrator", {}).get("method")
    if cal.get("applied") is False:
        head = f"Not applied (`{cal.get('requested_method')}` requested): {cal.get('why')}."
    else:
        head = f"Method `{method}`, fitted on validation" + (f" ({cal['why']})" if cal.get("why") else "") + "."
    ece = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"{head} ECE on validation {ece(cal.get('val', {}).get('ece_before', nan))} before, "
            f"{ece(cal.get('val', {}).get('ece_after', nan))} after; on test "
            f"{ece(test.get('ece_uncalibrated'))} before, {ece(test.get('ece_calibrated'))} after.")


def build_markdown(ctx: dict) -> str:
    """The card as Markdown from the run's reports (``ctx``: see :func:`collect`)."""
    ev, split, th, cal = ctx["evaluation"], ctx["split"], ctx["thresholds"], ctx["calibration"]
    header = ["class", "AUROC", "AP", "sensitivity", "specificity", "sens@spec0.80", "spec@sens0.90", "ECE"]
    regions = [[r] + [_ci(v.get("metrics", {}).get("overall", {}).get("auroc_macro"))]
               + [str(v.get("n_images", ""))]
               for r, v in ev.get("by_body_region", {}).items() if "metrics" in v]
    skipped = [f"{r} ({v.get('n_images')} images: {v.get('skipped')})"
               for r, v in ev.get("by_body_region", {}).items() if "skipped" in v]
    split_rows = [[s, str(split[s]["patients"]), str(split[s]["images"]),
                   ", ".join(f"{k} {v:.1%}" for k, v in split[s]["prevalence"].items())]
                  for s in ("train", "val", "test")]
    parts = [
        f"# Model card: {ctx['model_name']} version {ctx['version']}",
        f"**{DISCLAIMER}**",
        "## Model", f"- Backbone: `{ctx['info'].get('backbone')}`, input {ctx['info'].get('image_size')} px, "
        f"task {ctx['info'].get('task')}, classes {', '.join(ctx['info'].get('class_names', []))}",
        f"- Training run: `{ctx['run_id']}`; data hash `{ctx['info'].get('manifest_hash')}`, split hash "
        f"`{ctx['info'].get('split_hash')}`; code revision `{ctx['git_revision']}`",
        _weights_line(ctx["info"].get("pretrained", NOT_RECORDED)),
        "## Intended use", "Research on automated fracture detection in musculoskeletal radiographs, "
        "benchmarking and teaching. Not for screening, triage or diagnosis.",
        "## Data sources and licences",
        *[f"- {LICENCES.get(s, f'{s}: user-provided data; licence to be stated by the data owner')}"
          for s in ctx["sources"]],
        "## Patient-wise split", "Each patient is in exactly one split.",
        _table(["split", "patients", "images", "prevalence"], split_rows),
        "## Test metrics (95% CI, bootstrap resampling patients)",
        _table(header, _metric_rows(ev["metrics"]["per_class"])),
        "### By body region", _table(["region", "AUROC (95% CI)", "images"], regions) if regions else "none large enough",
        *([f"Not evaluated: {', '.join(skipped)}"] if skipped else []),
        "## Thresholds", f"Tuned on validation by `{th.get('method')}`: "
        + ", ".join(f"{c} {t:.4f}" for c, t in th.get("thresholds", {}).items()),
        "## Calibration", _calibration_text(cal, ev.get("calibration", {})),
        "## Grad-CAM examples", f"{len(ctx['cam_images'])} example(s) below; the full report is logged "
        "with the run (`explain/gradcam_report.html`).",
        "## Known limitations", *[f"- {x}" for x in LIMITATIONS],
    ]
    return "\n\n".join(parts) + "\n"


def build_html(markdown: str, cam_images: list[str]) -> str:
    """A self-contained HTML rendering of the Markdown card (headings, lists, tables, images)."""
    body, table = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not line.startswith("|---"):
                table.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
            continue
        if table:
            head, *rows = table
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
            table = []
        m = re.match(r"^(#+) (.*)", line)
        if m:
            n = len(m.group(1))
            body.append(f"<h{n}>{html.escape(m.group(2))}</h{n}>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        if line.startswith("## Grad-CAM"):
            body += [f'<img alt="Grad-CAM example" src="{src}">' for src in cam_images]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.3em .6em}"
             "img{max-width:45%;margin:.5em}p strong{color:#a00}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Model card</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def cam_examples(report_uri: str, limit: int = 2) -> list[str]:
    """Up to ``limit`` embedded overlay images (data: URIs) from the Grad-CAM report."""
    if not storage.exists(report_uri):
        return []
    found = re.findall(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', storage.read_text(report_uri))
    return found[1:2 * limit:2] if len(found) > 1 else found[:limit]  # overlays follow originals


def collect(run_folder: str, model_name: str, version: str, run_id: str, git_revision: str) -> dict:
    """Gather what the card needs from a training run's step folders."""
    j = lambda path: storage.read_json(storage.join(run_folder, path))  # noqa: E731
    ingest = storage.join(run_folder, catalog.INGEST_REPORT.path)
    manifest = storage.read_parquet(storage.join(run_folder, catalog.SPLIT.path))
    return {"model_name": model_name, "version": version, "run_id": run_id, "git_revision": git_revision,
            "evaluation": j(catalog.EVALUATION.path), "split": j(catalog.SPLIT_REPORT.path),
            "thresholds": j(catalog.THRESHOLDS.path),
            "calibration": j(catalog.CALIBRATION.path), "info": j(catalog.MODEL_INFO.path),
            "sources": sorted(set(manifest["source"].astype(str))) if "source" in manifest else [],
            "ingest": storage.read_json(ingest) if storage.exists(ingest) else {},
            "cam_images": cam_examples(storage.join(run_folder, catalog.CAM_REPORT.path))}


def write_model_card(run_folder: str, out_dir: str, model_name: str, version: str, run_id: str,
                     git_revision: str) -> tuple[str, str, str]:
    """Write ``model_card.md`` and ``model_card.html``; returns (markdown, md_uri, html_uri)."""
    ctx = collect(run_folder, model_name, version, run_id, git_revision)
    md = build_markdown(ctx)
    md_uri = storage.write_text(storage.join(out_dir, "model_card.md"), md)
    html_uri = storage.write_text(storage.join(out_dir, "model_card.html"), build_html(md, ctx["cam_images"]))
    return md, md_uri, html_uri
