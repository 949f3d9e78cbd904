"""Reports of the ``deidentify`` step: ``report.json``, ``report.html`` and ``audit.jsonl``.

All three are PHI-free: inputs are named by a keyed hash of their path, outputs by pseudonyms.
The HTML report shows each output image as a thumbnail with its blanked boxes outlined, drawn
from the written output only (never from an input), the counts per reason and the quarantined
inputs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections import Counter

import numpy as np

from fracture_ops import storage
from fracture_ops.config import write_resolved
from fracture_ops.deid.config import SECRET_ENV, STEP, DeidConfig
from fracture_ops.deid.dicom import _profile_options
from fracture_ops.deid.gallery import write_gallery
from fracture_ops.deid.profile import DeidKeys, method_codes
from fracture_ops.errors import BadInputError, ErrorBudgetExceeded

log = logging.getLogger("fracture_ops.deid")

BURNED_IN_FLAGS = ("burned_in_annotation_absent", "burned_in_annotation_yes",
                   "burned_in_annotation_unrecognised", "watchlist_modality",
                   "watchlist_manufacturer")
NOTES = [
    ("Burned-in text: every image is searched on several renderings (the stored window in both "
     "polarities and a contrast-independent stroke rendering); lines read as text, holding a "
     "header value, or letter-like in the border band are blanked whole (keep-list markers "
     "kept), and the output is read again on a locally normalised rendering; a file where "
     "text or an identifier-shaped word is still read is quarantined and never written. A "
     "letter-like region inside the body that no engine reads is not blanked: the file is held "
     "for review (gallery.html; `fracture-ops deid review`). BurnedInAnnotation is set to NO "
     "only for files that passed that read."),
    ("OCR finds most but not all text: very small, faint, rotated or handwritten text can be "
     "missed by both reads. Review the thumbnails of report.html before release."),
    "Blanked regions are filled with the image's minimum stored value.",
    "Unreadable or unsupported files are listed by a keyed hash of their path and never copied.",
]
THUMBNAILS = 200  # at most this many thumbnails in report.html
THUMB_SIDE = 256
GALLERY_SIDE = 480  # thumbnails kept for gallery.html (report.html shows them at 256)


def build_report(records: list[dict], cfg: DeidConfig, keys: DeidKeys, mode: str) -> dict:
    """The PHI-free run report: counts, flags, quarantined/skipped inputs by path hash."""
    status = Counter(r["status"] for r in records)
    candidates = len(records) - status["skipped"]
    elements: Counter = Counter()
    for r in records:
        elements.update(r.get("counts", {}))
    flagged = [{"output": r["output"], "flags": r["flags"]} for r in records if r.get("flags")]
    codes = [c for c, _ in method_codes(_profile_options(cfg, cfg.pixels.enabled))]
    return {
        "step": STEP, "mode": mode,
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "method_codes": codes,
        "dev_secret": not os.environ.get(SECRET_ENV),
        "counts": {"files": len(records), "deidentified": status["deidentified"],
                   "stripped": status["stripped"], "held": status["held"],
                   "quarantined": status["quarantined"],
                   "skipped": status["skipped"], "flagged": len(flagged),
                   "flagged_burned_in": sum(any(f in BURNED_IN_FLAGS for f in x["flags"])
                                            for x in flagged)},
        "bad_fraction": round(status["quarantined"] / candidates, 6) if candidates else 0.0,
        "max_bad_fraction": cfg.max_bad_fraction,
        "elements": dict(sorted(elements.items())),
        "flag_counts": dict(sorted(Counter(f for x in flagged for f in x["flags"]).items())),
        "flagged": flagged,
        "quarantined": [{"input": r["input"], "reason": r["reason"]}
                        for r in records if r["status"] == "quarantined"],
        "skipped": [{"input": r["input"], "reason": r["reason"]}
                    for r in records if r["status"] == "skipped"],
        "held": [{"input": r["input"], "output": r["output"], "reason": r["reason"]}
                 for r in records if r["status"] == "held"],
        "pixels": _pixel_summary(records),
        "pixel_policy": cfg.pixels.model_dump() if cfg.pixels.enabled else None,
        "notes": NOTES,
    }


def _pixel_summary(records: list[dict]) -> dict:
    scrubbed = [r["pixels"] for r in records if r.get("pixels") and r["status"] != "quarantined"]
    failed = [r for r in records if r.get("pixels", {}).get("passed") is False]
    engines: dict = {}
    for p in scrubbed:
        engines.update(p.get("engines", {}))
    return {"files_scrubbed": len(scrubbed),
            "files_with_text": sum(p["regions"] > 0 for p in scrubbed),
            "regions_blanked": sum(p["regions"] for p in scrubbed),
            "markers_kept": sum(p.get("kept_markers", 0) for p in scrubbed),
            "header_values_found": sum(p.get("phi_hits", 0) for p in scrubbed),
            "max_blanked_fraction": max((p["blanked_fraction"] for p in scrubbed), default=0.0),
            "quarantined_text_remains": len(failed),
            "files_held_for_review": sum(bool(p.get("held")) for p in scrubbed),
            "unread_regions_blanked": sum(p.get("unread_blanked", 0) for p in scrubbed),
            "unread_regions_ignored": sum(p.get("ignored", 0) for p in scrubbed),
            "engines": engines}


def thumbnail(data: bytes, boxes: list[list[list[int]]], held: list[list[list[int]]] = (),
              side: int = THUMB_SIDE) -> str | None:
    """A base64 PNG thumbnail of an output file's first frame with blanked boxes outlined in
    red and regions held for review in orange (drawn from the output bytes only)."""
    from PIL import Image, ImageDraw

    from fracture_ops.deid.pixels import to_gray8

    try:
        if data[128:132] == b"DICM":
            import pydicom

            arr = np.asarray(pydicom.dcmread(io.BytesIO(data)).pixel_array)
            if int(arr.ndim) == 3 and arr.shape[-1] not in (3, 4):
                arr = arr[0]
        else:
            arr = np.asarray(Image.open(io.BytesIO(data)))
        img = Image.fromarray(to_gray8(arr)).convert("RGB")
    except Exception:  # noqa: BLE001 - a thumbnail is a convenience, never a failure
        return None
    scale = side / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    draw = ImageDraw.Draw(img)
    for frame_boxes, colour in ((boxes, (255, 40, 40)), (held, (255, 160, 0))):
        for x0, y0, x1, y1 in (frame_boxes[0] if frame_boxes else []):
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=colour,
                           width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def render_html(report: dict, records: list[dict], thumbs: dict[str, str]) -> str:
    """The HTML report (thumbnails of outputs with blanked boxes, counts, quarantined inputs).

    ``thumbs`` maps output names to base64 PNG thumbnails drawn from the written outputs (the
    pixel path makes them in its workers; with pixel scrubbing off there are none).
    """
    e = html.escape
    counts = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in report["counts"].items())
    pix = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>"
                  for k, v in report["pixels"].items())
    flags = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>"
                    for k, v in report["flag_counts"].items())
    quarantined = "".join(f"<tr><td><code>{e(q['input'][:16])}</code></td><td>{e(q['reason'])}"
                          f"</td></tr>" for q in report["quarantined"]) or \
        "<tr><td colspan=2>none</td></tr>"
    cards = []
    written = [r for r in records if r.get("output")]
    for rec in written[:THUMBNAILS]:
        pixels = rec.get("pixels") or {}
        thumb = thumbs.get(rec["output"])
        img = f'<img src="data:image/png;base64,{thumb}" alt="output thumbnail">' if thumb \
            else "<em>no preview (pixel scrubbing off)</em>"
        cards.append(f'<figure class="card">{img}<figcaption><code>{e(rec["output"][-28:])}'
                     f'</code><br>{pixels.get("regions", 0)} region(s) blanked, '
                     f'{pixels.get("kept_markers", 0)} marker(s) kept</figcaption></figure>')
    more = (f"<p>{len(written) - THUMBNAILS} more outputs not shown.</p>"
            if len(written) > THUMBNAILS else "")
    notes = "".join(f"<li>{e(n)}</li>" for n in report["notes"])
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>De-identification report</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:2px 8px}} .card{{display:inline-block;margin:6px;width:260px;
vertical-align:top;font-size:12px}} .card img{{max-width:256px;border:1px solid #888}}
</style></head><body>
<h1>De-identification report</h1>
<p>{e(report['profile'])}. Research and education use only, not for clinical use.
Thumbnails are drawn from the written outputs; red outlines mark blanked regions.</p>
<h2>Files</h2><table>{counts}</table>
<h2>Burned-in text</h2><table>{pix}</table>
<h2>Flags</h2><table>{flags or '<tr><td>none</td></tr>'}</table>
<h2>Quarantined inputs (by path hash)</h2><table>{quarantined}</table>
<h2>Outputs</h2><div>{''.join(cards)}</div>{more}
<h2>Notes</h2><ul>{notes}</ul></body></html>"""


def finish(out_dir: str, records: list[dict], cfg: DeidConfig, keys: DeidKeys, mode: str,
           extra: dict, thumbs: dict[str, str] | None = None) -> dict:
    """Write the audit log and reports, log the totals, apply the error budget, mark success.

    Raises:
        BadInputError: no DICOM/PNG/JPEG input at all.
        ErrorBudgetExceeded: the quarantined fraction is above ``max_bad_fraction``.
    """
    report = build_report(records, cfg, keys, mode)
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    storage.write_text(storage.join(out_dir, "audit.jsonl"), lines)
    storage.write_json(storage.join(out_dir, "report.json"), report)
    storage.write_text(storage.join(out_dir, "report.html"), render_html(report, records, thumbs or {}))
    gallery = write_gallery(out_dir, report, records, thumbs or {})
    write_resolved(cfg, out_dir)
    counts, pixels = report["counts"], report["pixels"]
    log.info("deidentify: %d de-identified, %d stripped, %d quarantined, %d skipped, %d flagged",
             counts["deidentified"], counts["stripped"], counts["quarantined"],
             counts["skipped"], counts["flagged"])
    log.info("deidentify: burned-in text: %d file(s) scrubbed, %d with text, %d region(s) "
             "blanked, %d marker(s) kept, %d quarantined with text remaining",
             pixels["files_scrubbed"], pixels["files_with_text"], pixels["regions_blanked"],
             pixels["markers_kept"], pixels["quarantined_text_remains"])
    log.info("deidentify: review gallery %s: %d file(s) held for review (not released until "
             "`fracture-ops deid review %s --approve ID`), %d quarantined", gallery,
             counts["held"], out_dir, counts["quarantined"])
    if counts["files"] == counts["skipped"]:
        raise BadInputError("deidentify: no DICOM, PNG or JPEG input found")
    if report["bad_fraction"] > cfg.max_bad_fraction:
        raise ErrorBudgetExceeded(f"deidentify: {counts['quarantined']} bad file(s), fraction "
                                  f"{report['bad_fraction']:.3f} > {cfg.max_bad_fraction}")
    summary = {**extra, "mode": mode, **{k: counts[k] for k in
               ("files", "deidentified", "stripped", "held", "quarantined", "skipped",
                "flagged")}, "gallery_uri": gallery,
               "text_regions_blanked": pixels["regions_blanked"]}
    storage.mark_success(out_dir, summary)
    return summary
