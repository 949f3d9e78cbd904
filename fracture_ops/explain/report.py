"""The Grad-CAM report: one self-contained HTML page (inline CSS, images as base64 PNG data URIs).

Nothing in the page points outside it (no scripts, fonts, stylesheets or remote images), so it
opens the same from disk, from MLflow's artifact viewer or as an e-mail attachment.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

DISCLAIMER = "Research and education only; not for clinical use."

SECTIONS = (
    ("top", "Top positive predictions",
     "The test images the model scores highest among those it calls positive."),
    ("fn", "False negatives",
     "Positive images the model calls negative, lowest probability first."),
    ("fp", "False positives",
     "Negative images the model calls positive, highest probability first."),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5rem;color:#222}
h1{margin:0 0 .3rem 0}
.disclaimer{background:#fff3cd;border:1px solid #e0c36c;padding:.5rem .8rem;margin:.6rem 0;font-weight:600}
table.meta{border-collapse:collapse;margin:.6rem 0}
table.meta td{padding:.15rem .8rem .15rem 0;vertical-align:top}
table.meta td:first-child{color:#666}
.cases{display:flex;flex-wrap:wrap;gap:1rem}
.case{border:1px solid #ccc;border-radius:6px;padding:.5rem;background:#fafafa}
.case img{display:block;width:256px;max-width:100%;height:auto}
.pair{display:flex;gap:.4rem}
.pair figure{margin:0}
.pair figcaption{font-size:.75rem;color:#666;text-align:center}
.facts{font-size:.85rem;margin-top:.3rem;line-height:1.35}
.pos{color:#a40000;font-weight:600}.neg{color:#1d5e20;font-weight:600}
.empty{color:#666;font-style:italic}
.note{color:#555;font-size:.9rem;max-width:60rem}
"""


def png_data_uri(image: np.ndarray) -> str:
    """Encode an ``H x W`` (gray) or ``H x W x 3`` (RGB) image as a ``data:image/png`` URI.

    Float images are taken to lie in [0, 1]; uint8 images are used as they are.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fit_for_display(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an image so its longer side is at most ``max_side`` (keeps the report small)."""
    import cv2

    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _case_html(case: dict) -> str:
    e = html.escape
    name = str(case["class_name"])
    positive = bool(case["decision"])
    decision = name if positive else f"not {name}"
    truth = name if case["label"] else f"not {name}"
    threshold = case.get("threshold")
    rule = f"threshold {threshold:.3f}" if threshold is not None else "arg-max class"
    facts = [f"<b>{e(str(case['image_id']))}</b>",
             f"probability ({e(name)}): <b>{case['prob']:.3f}</b> &nbsp;{rule}",
             f"decision: <span class='{'pos' if positive else 'neg'}'>{e(decision)}</span>"
             f" &nbsp;ground truth: <b>{e(truth)}</b>"]
    if case.get("box_energy_ratio") is not None:
        facts.append(f"CAM energy in box / box area: {case['box_energy_ratio']:.2f}")
    return (
        "<div class='case'><div class='pair'>"
        f"<figure><img src='{case['original_png']}' alt='radiograph'>"
        "<figcaption>original</figcaption></figure>"
        f"<figure><img src='{case['overlay_png']}' alt='Grad-CAM overlay'>"
        "<figcaption>Grad-CAM overlay</figcaption></figure>"
        f"</div><div class='facts'>{'<br>'.join(facts)}</div></div>"
    )


def render_report(header: dict, cases: dict[str, list[dict]], notes: list[str] = ()) -> str:
    """Build the report page.

    Args:
        header: ordered facts about the model and run, shown as a table (values are escaped).
        cases: section key (``top``/``fn``/``fp``, see :data:`SECTIONS`) -> case dicts with
            ``image_id, class_name, prob, threshold`` (None: arg-max), ``decision`` and ``label``
            (0/1), ``original_png, overlay_png`` (data URIs) and optional ``box_energy_ratio``.
        notes: extra lines for the top of the page (e.g. images that could not be read).

    Returns:
        The HTML text.
    """
    e = html.escape
    rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(_fmt(v))}</td></tr>" for k, v in header.items())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        "<title>Grad-CAM report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>Grad-CAM report</h1>", f"<div class='disclaimer'>{e(DISCLAIMER)}</div>",
        f"<table class='meta'>{rows}</table>",
        "<p class='note'>Heatmaps are Grad-CAM (Selvaraju et al., ICCV 2017): the regions whose "
        "activations most raise the explained class's score. They show where the model looked, "
        "not where a fracture is, and are coarse (one cell per feature-map position).</p>",
    ]
    parts += [f"<p class='note'>{e(n)}</p>" for n in notes]
    for key, title, blurb in SECTIONS:
        items = cases.get(key, [])
        parts.append(f"<h2>{e(title)} ({len(items)})</h2><p class='note'>{e(blurb)}</p>")
        body = "".join(_case_html(c) for c in items) or "<p class='empty'>None in this split.</p>"
        parts.append(f"<div class='cases'>{body}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
