"""The detection report: one self-contained HTML page (images inlined as base64 PNG).

Each test image is drawn with its ground-truth boxes (green) and predicted boxes (orange, with
their confidence), worst misses first (:func:`fracture_ops.detection.metrics.severity_key`), under
a table of the box and image-level metrics. The page makes no external requests: no scripts,
fonts or images from elsewhere. Image ids are shown (they are pseudonyms after de-identification);
patient ids and source paths are not.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import numpy as np

GT_COLOUR = (0, 200, 80)
PRED_COLOUR = (255, 140, 0)
MAX_SIDE = 512  # thumbnails keep the page small; boxes are scaled with them


@dataclass
class ReportItem:
    """One image of the report."""

    image_id: str
    image: np.ndarray | str  # [0, 1] grayscale at original size, or a URI read when drawn
    gt: list[tuple[float, float, float, float]]
    pred: list[dict]  # boxes as from ImagePrediction.boxes (x_min.., confidence)
    match: dict  # from metrics.match_image
    score: float


def draw_overlay(image: np.ndarray, gt: list, pred: list[dict], max_side: int = MAX_SIDE):
    """Draw ground truth and predictions on a (downscaled) RGB copy of ``image``.

    Args:
        image: [0, 1] grayscale image at original size.
        gt: ground-truth ``(x_min, y_min, x_max, y_max)`` boxes in original pixels.
        pred: predicted boxes (dicts with ``x_min``..``y_max`` and ``confidence``).
        max_side: longest side of the drawing.

    Returns:
        A Pillow RGB image.
    """
    from PIL import Image, ImageDraw

    from fracture_ops.data.images import to_uint8

    im = Image.fromarray(to_uint8(image)).convert("RGB")
    scale = min(1.0, max_side / max(im.size))
    if scale < 1.0:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(im)
    width = max(1, round(max(im.size) / 200))
    for box in gt:
        draw.rectangle([v * scale for v in box], outline=GT_COLOUR, width=width)
    for b in pred:
        xy = [b["x_min"] * scale, b["y_min"] * scale, b["x_max"] * scale, b["y_max"] * scale]
        draw.rectangle(xy, outline=PRED_COLOUR, width=width)
        draw.text((xy[0] + 2, max(0, xy[1] - 11)), f"{b['confidence']:.2f}", fill=PRED_COLOUR)
    return im


def png_bytes(im) -> bytes:
    """Encode a Pillow image as PNG."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for inlining."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}.grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;max-width:520px}
figcaption{font-size:.85em}.gt{color:rgb(0,160,64)}.pred{color:rgb(230,120,0)}.note{color:#666;font-size:.9em}"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if np.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def _metrics_table(metrics: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>"
                   for k, v in metrics.items() if not isinstance(v, (dict, list)))
    per_class = metrics.get("per_class") or {}
    cls_rows = "".join(
        f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{_fmt(m[k])}</td>" for k in
                                                     ("ap50", "ap50_95", "precision", "recall"))
        + "</tr>" for name, m in per_class.items())
    out = f"<table>{rows}</table>"
    if cls_rows:
        out += ("<table><tr><th>class</th><th>AP@0.5</th><th>AP@0.5:0.95</th><th>precision</th>"
                f"<th>recall</th></tr>{cls_rows}</table>")
    return out


def item_image(item: ReportItem) -> np.ndarray:
    """The item's image as an array (read with ``read_image`` when given as a URI)."""
    if isinstance(item.image, str):
        from fracture_ops.data.images import read_image

        return read_image(item.image)[0]
    return item.image


def _figure(item: ReportItem) -> str:
    uri = data_uri(png_bytes(draw_overlay(item_image(item), item.gt, item.pred)))
    m = item.match
    caption = (f"<b>{html.escape(item.image_id)}</b> &middot; fractures {m['gt']}, missed "
               f"{m['missed']}, false positives {m['false_pos']}, min best IoU "
               f"{m['min_best_iou']:.2f}, score {item.score:.2f}")
    return (f'<figure><img src="{uri}" alt="{html.escape(item.image_id)}" style="max-width:100%">'
            f"<figcaption>{caption}</figcaption></figure>")


def render_report(title: str, metrics: dict, items: list[ReportItem], notes: list[str] = ()) -> str:
    """Render the report page.

    Args:
        title: page heading.
        metrics: flat metrics (plus an optional ``per_class`` mapping) for the summary tables.
        items: images to show, already sorted worst first.
        notes: extra lines (settings, quarantined counts).

    Returns:
        The HTML document as a string.
    """
    figs = "".join(_figure(it) for it in items)
    note_html = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='note'>Research and education only; not for "
            f"clinical use.</p>{_metrics_table(metrics)}{note_html}"
            f"<h2>Test images, worst misses first</h2><p><span class='gt'>&#9632; ground truth"
            f"</span> &nbsp; <span class='pred'>&#9632; prediction (confidence)</span></p>"
            f"<div class='grid'>{figs}</div></body></html>")
