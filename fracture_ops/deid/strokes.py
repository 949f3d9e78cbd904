"""Contrast-independent views of a frame for finding burned-in text, and stroke geometry.

Burned-in text defeats a detector that sees one rendering of the pixels: white letters running
from a dark background onto bright bone lose their contrast half-way, grey letters on a region of
nearly their own value barely show. Letter strokes, though, are always thin structures brighter
or darker than what is right next to them, whatever the background does. Morphological top-hats
(the frame minus its opening, its closing minus the frame; Serra 1982, *Image Analysis and
Mathematical Morphology*) keep exactly such structures and flatten everything wider than the
kernel: steps, gradients, soft tissue, bone shafts. This module builds:

- :func:`stroke_view`: max(white top-hat, black top-hat), stretched to 8 bits and inverted
  (dark strokes on white: how text detectors were trained), a detection rendering in which text
  of either polarity on any background looks alike;
- :func:`z_view`: a local mean/std binarisation for the verification read (a rendering the
  detector did not use);
- :func:`stroke_components`: the glyph-sized connected components of the stroke mask, with which
  :func:`extend_along_strokes` grows a blanked line over letters the detector dropped, and
  :func:`looks_like_text` tells a row of letters from a texture.
"""

from __future__ import annotations

import numpy as np

Box = tuple[int, int, int, int]


def kernel_side(shape) -> int:
    """Top-hat kernel side: wider than a stroke of the largest annotation text expected on a
    frame of this size (strokes are ~1/8 of a letter's height; letters up to ~6% of the side)."""
    return int(np.clip(min(shape[:2]) // 45, 7, 41)) | 1


def _tophats(gray: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(white top-hat, black top-hat) of a median-filtered copy (pixel noise is not a stroke;
    a 2-pixel stroke survives a 3x3 median)."""
    import cv2

    k = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
    g = cv2.medianBlur(gray, 3)
    return cv2.morphologyEx(g, cv2.MORPH_TOPHAT, k), cv2.morphologyEx(g, cv2.MORPH_BLACKHAT, k)


def _above_noise(s: np.ndarray, side: int, min_strength: float) -> np.ndarray:
    """Pixels stronger than ``min_strength`` and than three times the median strength of a
    window of a few kernels around them (letters cover well under half of any window, so
    they do not raise it; texture does)."""
    import cv2

    window = min(4 * side + 1, 255) | 1
    step = max(1, window // 8)  # the median over a coarse grid, then back to full size
    coarse = cv2.resize(s, (max(1, s.shape[1] // step), max(1, s.shape[0] // step)),
                        interpolation=cv2.INTER_AREA)
    noise = cv2.medianBlur(coarse, max(3, (window // step) | 1))
    noise = cv2.resize(noise, (s.shape[1], s.shape[0]), interpolation=cv2.INTER_LINEAR)
    # s > max(min_strength, 3 * noise + 4) in whole numbers: a table from noise to the largest
    # value that is not above it (255: nothing is)
    table = np.minimum(np.maximum(np.floor(min_strength), 3 * np.arange(256) + 4), 255)
    return s > cv2.LUT(noise, table.astype(np.uint8))


def glyphs(gray: np.ndarray, side: int | None = None, min_strength: float = 8.0
           ) -> tuple[np.ndarray, np.ndarray]:
    """Letter-like stroke components of both polarities: (stats rows of (x, y, w, h, area),
    a mask of their pixels).

    Each polarity's top-hat is thresholded against its local noise (:func:`_above_noise`) and
    split into connected components. The opposite polarity of a line of text marks the gaps
    between its letters as one solid blob (a closing fills them): components taller than two
    and a half kernels, or filling more than 70% of their box when longer than a kernel, are
    such blobs (or anatomy) and are dropped.
    """
    import cv2

    side = side or kernel_side(gray.shape)
    rows, mask = [], np.zeros(gray.shape, bool)
    for hat in _tophats(gray, side):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(
            _above_noise(hat, side, min_strength).astype(np.uint8), 8)
        st = stats[1:]
        fill = st[:, 4] / np.maximum(st[:, 2] * st[:, 3], 1)
        keep = (st[:, 3] <= 2.5 * side) & ~((fill > 0.7) & (np.maximum(st[:, 2], st[:, 3]) > side))
        lut = np.concatenate([[False], keep])
        mask |= lut[labels]
        rows.append(st[keep])
    return np.concatenate(rows) if rows else np.zeros((0, 5), np.int32), mask


def stroke_view(gray: np.ndarray, side: int | None = None) -> np.ndarray:
    """The detection rendering: letter-like strokes of either polarity as black ink on white
    (uint8), whatever the background under them (:func:`glyphs`)."""
    _, mask = glyphs(gray, side)
    return np.where(mask, np.uint8(0), np.uint8(255))


def z_view(gray: np.ndarray, k: int = 21, threshold: float = 1.2) -> np.ndarray:
    """A binary rendering from local mean/std normalisation: a pixel more than ``threshold``
    local standard deviations from its neighbourhood's mean is ink (black), of either polarity.
    Used by the verification read (Tesseract binarises globally and so misses low-contrast
    text; here every region is judged against its own surroundings)."""
    import cv2

    f = gray.astype(np.float32)
    mean = cv2.blur(f, (k, k))
    sd = np.sqrt(np.maximum(cv2.blur(f * f, (k, k)) - mean * mean, 0))
    z = np.abs(f - mean) / (sd + 4.0)
    return np.where(z > threshold, np.uint8(0), np.uint8(255))


def z_view_regions(gray: np.ndarray, regions, k: int = 21) -> np.ndarray:
    """:func:`z_view` computed only where it is read (each region with the filter's reach
    around it; white elsewhere): the same pixels inside the regions, for a fraction of the
    work when the regions are the border bands."""
    out = np.full(gray.shape[:2], 255, np.uint8)
    m = k // 2 + 1
    h, w = gray.shape[:2]
    for x0, y0, x1, y1 in regions:
        cx0, cy0, cx1, cy1 = max(x0 - m, 0), max(y0 - m, 0), min(x1 + m, w), min(y1 + m, h)
        z = z_view(gray[cy0:cy1, cx0:cx1], k)
        out[y0:y1, x0:x1] = z[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
    return out


def _glyphs_in_row(comps: np.ndarray, box: Box, vertical: bool) -> np.ndarray:
    """Letter-sized components whose extent lies within a line's band (across the line)."""
    x0, y0, x1, y1 = box
    if vertical:  # work in the turned frame: swap the axes of boxes and components
        comps = comps[:, [1, 0, 3, 2, 4]]
        x0, y0, x1, y1 = y0, x0, y1, x1
    h = y1 - y0
    sel = ((comps[:, 3] >= 0.25 * h) & (comps[:, 3] <= 1.15 * h) & (comps[:, 2] <= 1.6 * h)
           & (comps[:, 4] >= 3) & (comps[:, 1] >= y0 - 0.3 * h)
           & (comps[:, 1] + comps[:, 3] <= y1 + 0.3 * h))
    return comps[sel]


def looks_like_text(comps: np.ndarray, box: Box) -> bool:
    """A row (or column, for a tall box) of letters: at least three letter-sized stroke
    components covering a third of the line's length, most of one height and standing on one
    baseline (bone edges, trabeculae and screws are letter-sized too, but ragged)."""
    vertical = (box[3] - box[1]) > 1.5 * (box[2] - box[0])
    glyphs = _glyphs_in_row(comps, box, vertical)
    x0, x1 = (box[1], box[3]) if vertical else (box[0], box[2])
    inside = glyphs[(glyphs[:, 0] >= x0 - 2) & (glyphs[:, 0] + glyphs[:, 2] <= x1 + 2)]
    if len(inside) < 3 or inside[:, 2].sum() < 0.33 * (x1 - x0):
        return False
    heights = inside[:, 3].astype(np.float32)
    size = float(np.median(heights))
    tall = np.abs(heights - size) <= 0.25 * size  # letters of the common height (caps, digits)
    bottoms = (inside[:, 1] + inside[:, 3])[tall].astype(np.float32)
    return bool(tall.sum() >= max(3, 0.6 * len(inside))
                and np.median(np.abs(bottoms - np.median(bottoms))) <= 0.12 * size + 1)


def extend_along_strokes(comps: np.ndarray, box: Box, shape, barriers: list[Box] = (),
                         max_reach: float = 10.0, max_gap: float = 1.2) -> Box:
    """Grow a line box along its row while letter-sized strokes continue.

    Starting from the box's ends, a component of the line's height range within ``max_gap``
    line heights of the current end (a letter or two may vanish where the background matches
    the text's grey) is taken in, one at a time, up to ``max_reach`` line heights
    each way, never into a ``barriers`` box (a kept marker or label) on the same row. The row's
    background is not looked at, so text that crosses from a dark region onto bright bone is
    followed to its end. Tall boxes (vertical text) grow along their columns.
    """
    vertical = (box[3] - box[1]) > 1.5 * (box[2] - box[0])
    x0, y0, x1, y1 = box
    if vertical:
        x0, y0, x1, y1 = y0, x0, y1, x1
        barriers = [(b[1], b[0], b[3], b[2]) for b in barriers]
    h = max(y1 - y0, 1)
    glyphs = _glyphs_in_row(comps, box, vertical)
    row = [b for b in barriers if min(b[3], y1) - max(b[1], y0) > 0.3 * h]
    stop_l = max((b[2] for b in row if b[2] <= x0 + 1), default=-1)
    stop_r = min((b[0] for b in row if b[0] >= x1 - 1), default=10 ** 9)
    glyphs = glyphs[(glyphs[:, 0] >= stop_l) & (glyphs[:, 0] + glyphs[:, 2] <= stop_r)]
    lo, hi = x0, x1
    grew = True
    while grew and len(glyphs):
        grew = False
        ends = glyphs[:, 0] + glyphs[:, 2]
        right = ends[(glyphs[:, 0] <= hi + max_gap * h) & (ends > hi)
                     & (ends <= x1 + max_reach * h)]
        left = glyphs[(ends >= lo - max_gap * h) & (glyphs[:, 0] < lo)
                      & (glyphs[:, 0] >= x0 - max_reach * h), 0]
        if len(right):
            hi, grew = int(right.max()), True
        if len(left):
            lo, grew = int(left.min()), True
    if vertical:
        return (max(y0, 0), max(lo, 0), min(y1, shape[1]), min(hi, shape[0]))
    return (max(lo, 0), max(y0, 0), min(hi, shape[1]), min(y1, shape[0]))


def in_border_band(box: Box, shape, band: float) -> bool:
    """The box reaches into the outer ``band`` fraction of the frame on some side (where
    burned-in annotations are written)."""
    h, w = shape[:2]
    x0, y0, x1, y1 = box
    return x0 <= band * w or x1 >= (1 - band) * w or y0 <= band * h or y1 >= (1 - band) * h


def neighbour_lines(comps: np.ndarray, boxes: list[Box], avoid: list[Box], shape) -> list[Box]:
    """Lines of a text block that no rendering found, next to lines that were: for each line
    box, the row one line pitch (1.2 to 1.6 line heights) above and below it over the same
    span, when its strokes form a row of letters (:func:`looks_like_text`) and it overlaps
    neither a known line nor an ``avoid`` box (a kept marker or label)."""
    found: list[Box] = []
    known = list(boxes) + list(avoid)
    for box in boxes:
        vertical = (box[3] - box[1]) > 1.5 * (box[2] - box[0])  # its lines stand side by side
        x0, y0, x1, y1 = (box[1], box[0], box[3], box[2]) if vertical else box
        h = y1 - y0
        if h <= 0:
            continue
        for sign in (-1, 1):
            for pitch in (1.2, 1.4, 1.6):
                dy = int(round(sign * pitch * h))
                lo, hi = max(y0 + dy, 0), min(y1 + dy, shape[1] if vertical else shape[0])
                cand = (lo, x0, hi, x1) if vertical else (x0, lo, x1, hi)
                if hi - lo < 0.6 * h or any(
                        min(cand[2], k[2]) - max(cand[0], k[0]) > (0.3 * h if vertical else 0)
                        and min(cand[3], k[3]) - max(cand[1], k[1]) > (0 if vertical else 0.3 * h)
                        for k in known):
                    continue
                if looks_like_text(comps, cand):
                    found.append(cand)
                    known.append(cand)
                    break
    return found
