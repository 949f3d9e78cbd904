"""What the verification read treats as an identifier, whether or not it matches a header value.

A file's header does not always carry what is burned into its pixels (a bare PNG has no header;
a secondary capture may name another visit), so after scrubbing, the verification read fails
closed on any word *shaped* like an identifier (HIPAA Safe Harbor's kinds, 45 CFR 164.514(b)):

- a run of five or more digits (record, accession, phone or social security numbers);
- a date (digits separated by ``/``, ``-`` or ``.``, or a month name beside a number);
- an accession-like code: letters and at least three digits mixed in one word of 5+ characters;
- a name-like word: four or more letters, read with good confidence, that is not a keep-listed
  marker, a field label or a word of the radiographic vocabulary below.
"""

from __future__ import annotations

import re

import numpy as np

_MONTHS = "JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC"
_DATE = re.compile(r"\d{1,4}[/\-.]\d{1,2}[/\-.]\d{2,4}|\b(?:" + _MONTHS + r")[A-Z]*\.?\s*\d{1,4}",
                   re.IGNORECASE)
# words printed on radiographs that identify nobody (views, positions, devices, units)
RADIOGRAPHIC_WORDS = frozenset("""
LEFT RIGHT PORTABLE SUPINE ERECT UPRIGHT PRONE STANDING LATERAL OBLIQUE FRONTAL AXIAL VIEW
CHEST HAND WRIST ELBOW ANKLE FOOT KNEE SHOULDER FEMUR TIBIA FIBULA HUMERUS PELVIS SPINE SKULL
FLEX FLEXION EXTENSION INSPIRATION EXPIRATION DECUBITUS SITTING MARKER GRID
""".split())


def _letters(word: str) -> str:
    return re.sub(r"[^A-Za-z\u00C0-\u024F\u0370-\u03FF\u0400-\u04FF]", "", word)


def identifier_kind(text: str, score: float, keep_tokens=frozenset(), keep_labels=frozenset(),
                    name_score: float = 0.8) -> str | None:
    """The kind of identifier ``text`` looks like (``digits``, ``date``, ``code``, ``name``),
    or None.

    Args:
        text: one word (or a few) as read.
        score: the read's confidence, 0-1 (names need ``name_score``; numbers and dates any).
        keep_tokens: markers kept on purpose (upper case).
        keep_labels: field labels kept on purpose (upper-case letters and digits only).
    """
    t = text.strip()
    if not t:
        return None
    if _DATE.search(t):
        return "date"
    if re.search(r"\d{5,}", t.replace(" ", "")):
        return "digits"
    compact = re.sub(r"[^0-9A-Za-z]", "", t)
    if len(compact) >= 5 and len(re.findall(r"\d", compact)) >= 3 and re.search("[A-Za-z]",
                                                                                   compact):
        return "code"
    for word in t.split():
        letters = _letters(word)
        up = letters.upper()
        if (len(letters) >= 4 and score >= name_score and len(letters) >= 0.8 * len(word.strip(".,:;"))
                and up not in keep_tokens and up not in keep_labels
                and up not in RADIOGRAPHIC_WORDS):
            return "name"
    return None


def verification_regions(shape, band: float, lines=()) -> list[tuple[int, int, int, int]]:
    """Where the verification read looks: the four border bands (``band`` of each side; the
    left and right ones between the top and bottom ones) and, padded by two line heights, every
    line box outside them."""
    h, w = shape[:2]
    bh, bw = max(int(band * h), 1), max(int(band * w), 1)
    regions = [(0, 0, w, bh), (0, h - bh, w, h), (0, bh, bw, h - bh), (w - bw, bh, w, h - bh)]
    for x0, y0, x1, y1 in lines:
        if x0 > bw and x1 < w - bw and y0 > bh and y1 < h - bh:
            p = 2 * (y1 - y0)
            regions.append((max(x0 - p, 0), max(y0 - p, 0), min(x1 + p, w), min(y1 + p, h)))
    return [r for r in regions if r[2] > r[0] and r[3] > r[1]]


def read_regions(engine, view, regions, upscale_below: int = 600, max_side: int = 2400):
    """Words an engine reads in the given regions of ``view``, boxes in frame coordinates.

    The regions are packed into one mosaic (one engine call: Tesseract loads its model per
    call), each separated by a blank margin; regions of a small frame are enlarged twice
    (small text), a mosaic longer than ``max_side`` is shrunk to it.
    """
    import cv2

    grow = 2.0 if min(view.shape[:2]) < upscale_below else 1.0
    gap = 16
    crops = [view[y0:y1, x0:x1] for x0, y0, x1, y1 in regions]
    # rows of the mosaic: the wide regions one under another, then the tall ones side by side
    wide = [k for k, c in enumerate(crops) if c.shape[1] >= c.shape[0]]
    tall = [k for k, c in enumerate(crops) if c.shape[1] < c.shape[0]]
    width = max([crops[k].shape[1] for k in wide] + [sum(crops[k].shape[1] + gap for k in tall)])
    height = sum(crops[k].shape[0] + gap for k in wide) + max([crops[k].shape[0] for k in tall],
                                                              default=0)
    canvas = np.full((height + gap, width + gap), 255, np.uint8)
    place = {}
    y = 0
    for k in wide:
        h, w = crops[k].shape
        canvas[y:y + h, :w] = crops[k]
        place[k] = (0, y)
        y += h + gap
    x = 0
    for k in tall:
        h, w = crops[k].shape
        canvas[y:y + h, x:x + w] = crops[k]
        place[k] = (x, y)
        x += w + gap
    scale = min(grow, max_side / max(canvas.shape))
    if scale != 1.0:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale,
                            interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    words = []
    for tb in engine.detect(np.ascontiguousarray(canvas)):
        bx = [v / scale for v in tb.box]
        cx, cy = (bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2
        for k, (px, py) in place.items():
            h, w = crops[k].shape
            if px <= cx < px + w and py <= cy < py + h:
                x0, y0 = regions[k][0] - px, regions[k][1] - py
                words.append(tb._replace(box=(int(bx[0] + x0), int(bx[1] + y0),
                                              int(bx[2] + x0) + 1, int(bx[3] + y0) + 1)))
                break
    return words
