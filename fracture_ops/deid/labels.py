"""Field labels printed before burned-in values (``Patient ID: ...``): read, matched against the
keep-list, and cut at their colon so that the label stays and the value is blanked.

See the ``default`` policy in :mod:`fracture_ops.deid.pixels`.
"""

from __future__ import annotations

import re
import numpy as np

from fracture_ops.deid.ocr import Box
from fracture_ops.deid.options import ScrubOptions
from fracture_ops.deid.phi_text import contains_phi


def label_key(text: str) -> str:
    """A field label compared without case, spacing or punctuation."""
    return re.sub(r"[^0-9A-Z]", "", text.upper())


def _is_label(text: str, labels: frozenset[str]) -> str | None:
    """The keep-listed label ``text`` reads as, or None. A label of six or more letters may be
    read with one letter wrong (never one more or one fewer: a value letter cannot hide)."""
    key = label_key(text)
    if key in labels:
        return key
    if len(key) >= 6:
        for label in labels:
            if len(label) == len(key) and sum(a != b for a, b in zip(label, key)) <= 1:
                return label
    return None


def _reads_label(text: str, opts: ScrubOptions) -> bool:
    m = re.match(r"\s*([^:;]{1,40}?)\s*[:;]", text)
    return bool(m) and _is_label(m.group(1), opts.keep_labels) is not None


def _colon_x(comps: np.ndarray, box: Box, near: float) -> int | None:
    """Right edge of the colon drawn nearest ``near`` inside a line box, or None.

    A colon is two dot-sized components of the text colour one above the other (same column,
    a gap between them), inside the line's rows; only one within a sixth of the box width of
    ``near`` (where the read text puts it) counts.
    """
    x0, y0, x1, y1 = box
    h = y1 - y0
    dots = comps[(comps[:, 0] >= x0) & (comps[:, 0] + comps[:, 2] <= x1)
                 & (comps[:, 1] >= y0) & (comps[:, 1] + comps[:, 3] <= y1)
                 & (comps[:, 2] <= 0.3 * h) & (comps[:, 3] <= 0.3 * h) & (comps[:, 4] >= 1)]
    best = None
    for i, a in enumerate(dots):
        for b in dots[i + 1:]:
            top, low = (a, b) if a[1] < b[1] else (b, a)
            cx_a, cx_b = a[0] + a[2] / 2, b[0] + b[2] / 2
            if abs(cx_a - cx_b) > max(1.5, 0.1 * h) or low[1] <= top[1] + top[3]:
                continue
            if low[1] + low[3] - top[1] < 0.25 * h or max(a[4], b[4]) > 3 * min(a[4], b[4]):
                continue
            right = int(max(a[0] + a[2], b[0] + b[2]))
            if abs(right - near) <= (x1 - x0) / 6 and (best is None or
                                                        abs(right - near) < abs(best - near)):
                best = right
    return best


def _gap_x(gray: np.ndarray, colour: int, box: Box, near: float) -> int | None:
    """Start of the widest run of ink-free columns within a sixth of the box width of
    ``near`` (the space after a label's colon), for text too small for a colon's two dots to
    be drawn apart; ink is any pixel within 64 grey levels of the text colour."""
    x0, y0, x1, y1 = box
    ink = np.abs(gray[y0:y1, x0:x1].astype(np.int16) - colour) <= 64
    empty = ~ink.any(axis=0)
    lo, hi = max(0, int(near - x0 - (x1 - x0) / 6)), min(x1 - x0, int(near - x0 + (x1 - x0) / 6))
    best, best_w, i = None, 1, lo
    while i < hi:
        if empty[i]:
            j = i
            while j < len(empty) and empty[j]:
                j += 1
            if j - i > best_w and i > 0:
                best, best_w = x0 + i, j - i
            i = j
        else:
            i += 1
    return best


def _head(box: Box, opts: ScrubOptions) -> Box:
    """The start of a line, ``label_reach`` line heights long (where a field label is)."""
    x0, y0, x1, y1 = box
    return x0, y0, min(x1, x0 + int(opts.label_reach * (y1 - y0))), y1


def split_label(gray: np.ndarray, colour: int | None, comps: np.ndarray | None, box: Box,
                text: str, opts: ScrubOptions, tokens: set[str], read_to: int | None = None
                ) -> tuple[list[tuple[Box, Box]], list[tuple[Box, Box]]]:
    """Candidate (label box, value box) cuts when a line reads ``<label>: <value>`` with a
    keep-listed label, as (cuts at the colon or the space after it, cuts a letter either side
    of where the read text puts the colon); ([], []) when it does not. ``text`` is what was
    read from the line's start up to ``read_to``.

    The label must be on ``opts.keep_labels``, hold no header value, and its colon must be
    found in the pixels where the text puts it (:func:`_colon_x`) or the space after it
    (:func:`_gap_x`), or a letter either side of where the read text puts it. Callers keep a
    label only when its crop alone reads as that label.
    """
    m = re.match(r"\s*([^:;]{1,40}?)\s*[:;]\s*(\S.*)$", text)
    if comps is None or not opts.keep_labels or not m:
        return [], []
    label = m.group(1)
    if _is_label(label, opts.keep_labels) is None or contains_phi(label, tokens):
        return [], []
    x0, y0, x1, y1 = box
    width = (read_to or x1) - x0
    near = x0 + width * (m.end(1) + 1) / max(len(text.rstrip()), 1)
    step = width / max(len(text.rstrip()), 1) / 2  # half a letter

    def boxes(cuts):
        return [((x0, y0, c, y1), (c, y0, x1, y1))
                for c in sorted({c for c in cuts if c is not None and x0 < c < x1})]

    first = boxes([_colon_x(comps, box, near), _gap_x(gray, colour, box, near)])
    return first, boxes([int(round(near + k * step)) for k in range(-2, 3)])
