"""Line geometry of burned-in text: boxes from several renderings merged into lines, fused blocks
split back into rows, wrapped values widened, boxes fitted to the glyphs of the text's own
colour, and the boxes of one line joined so that the whole line is blanked.

Pure functions on boxes ``(x0, y0, x1, y1)`` (exclusive ends) and 8-bit frames; see
:mod:`fracture_ops.deid.pixels` for how they are used.
"""

from __future__ import annotations

import threading

import numpy as np

from fracture_ops.deid.ocr import Box
from fracture_ops.deid.options import ScrubOptions


def _overlap(a: Box, b: Box) -> bool:
    """Same line: the boxes intersect, share at least half the smaller one's height, and
    neither is more than twice as tall as the other (a line never merges into a block)."""
    ha, hb = a[3] - a[1], b[3] - b[1]
    shared = min(a[3], b[3]) - max(a[1], b[1])
    return (a[0] < b[2] and b[0] < a[2] and shared >= 0.5 * min(ha, hb)
            and max(ha, hb) <= 2 * max(min(ha, hb), 1))


def _covers(big: Box, small: Box) -> bool:
    ix = min(big[2], small[2]) - max(big[0], small[0])
    iy = min(big[3], small[3]) - max(big[1], small[1])
    return ix > 0 and iy > 0 and ix * iy >= 0.8 * (small[2] - small[0]) * (small[3] - small[1])


def drop_fused(boxes: list[Box]) -> list[Box]:
    """Replace a box that covers two or more thinner boxes (several lines one rendering fused
    into a block that another rendering found line by line) by the bands of it those lines do
    not cover: a line only the fusing rendering saw is kept, as a box of its own."""
    def thin(a: Box, b: Box) -> bool:  # b is a thinner line (not a letter) inside a
        ta, tb = min(a[2] - a[0], a[3] - a[1]), min(b[2] - b[0], b[3] - b[1])
        return tb < 0.7 * ta and max(b[2] - b[0], b[3] - b[1]) >= 2 * tb and _covers(a, b)

    out: list[Box] = []
    for a in boxes:
        lines = [b for b in boxes if b != a and thin(a, b)]
        vertical = (a[3] - a[1]) > (a[2] - a[0]) and all(
            (b[3] - b[1]) > (b[2] - b[0]) for b in lines)
        # fused lines lie one under another: "lines" all on one row are words of one line
        same = (lambda u, v: _same_row((u[1], u[0], u[3], u[2]), (v[1], v[0], v[3], v[2]))) \
            if vertical else _same_row
        rows = [b for k, b in enumerate(lines) if not any(same(b, o) for o in lines[:k])]
        if len(lines) < 2 or len(rows) < 2:
            out.append(a)
            continue
        lo, hi = (a[0], a[2]) if vertical else (a[1], a[3])
        spans = sorted((b[0], b[2]) if vertical else (b[1], b[3]) for b in lines)
        size = min(e - s for s, e in spans)
        cursor = lo
        for s_, e_ in spans + [(hi, hi)]:
            if s_ - cursor >= 0.5 * size:  # an uncovered band at least half a line thick
                out.append((cursor, a[1], s_, a[3]) if vertical else (a[0], cursor, a[2], s_))
            cursor = max(cursor, e_)
    return out


def merge_boxes(boxes: list[Box]) -> list[Box]:
    """Union boxes of the same line that overlap (both polarities and renderings find a line
    more than once); a block fused from several lines is dropped first (:func:`drop_fused`)."""
    out = [tuple(b) for b in drop_fused(list(dict.fromkeys(tuple(b) for b in boxes)))]
    changed = True
    while changed:
        changed = False
        merged: list[Box] = []
        for b in out:
            for i, m in enumerate(merged):
                if _overlap(b, m):
                    merged[i] = (min(b[0], m[0]), min(b[1], m[1]), max(b[2], m[2]),
                                 max(b[3], m[3]))
                    changed = True
                    break
            else:
                merged.append(b)
        out = merged
    return sorted(out, key=lambda b: (b[1], b[0]))


def widen_continuations(boxes: list[Box]) -> list[Box]:
    """Widen a wrapped line to the right edge of the line it continues.

    A line directly under another (gap under one line height, similar height) that starts
    inside it (or within a line height of its start) and ends before it holds the rest of that
    line's value: a value box drawn for the whole value spans that width.
    """
    out = list(boxes)
    for i, (x0, y0, x1, y1) in enumerate(out):
        h = y1 - y0
        for ax0, ay0, ax1, ay1 in boxes:
            ah = ay1 - ay0
            if (0.5 * h <= ah <= 2 * h and -0.5 * h <= y0 - ay1 <= h
                    and ax0 - h < x0 < ax1 and ax1 > x1):
                out[i] = (x0, y0, ax1, y1)
    return out


def _text_colour(gray: np.ndarray, boxes: list[Box]) -> int | None:
    """0 or 255 when burned-in text sits at that extreme (it is drawn in one value): the one
    far more frequent inside the text boxes than in the whole image; None when neither is."""
    if not boxes:
        return None
    inside = np.concatenate([gray[y0:y1, x0:x1].ravel() for x0, y0, x1, y1 in boxes])
    best, ratio = None, 2.0
    for value in (0, 255):
        frac_in = float((inside == value).mean())
        frac_all = float((gray == value).mean()) + 1e-6
        if frac_in >= 0.05 and frac_in / frac_all > ratio:
            best, ratio = value, frac_in / frac_all
    return best


_LAST = threading.local()  # the last (gray, colour, components): a frame's decide and fit share


def _glyphs(gray: np.ndarray, colour: int) -> np.ndarray:
    """Connected components of exactly the text colour: rows of (x, y, w, h, area).

    The scrub asks twice for the same rendering (deciding, then fitting the boxes); the last
    answer is kept with the array it came from (renderings are never changed in place: each
    round makes a new one), so the second ask costs nothing."""
    import cv2

    last = getattr(_LAST, "value", None)
    if last is not None and last[0] is gray and last[1] == colour:
        return last[2]
    _, _, stats, _ = cv2.connectedComponentsWithStats((gray == colour).astype(np.uint8), 8)
    _LAST.value = (gray, colour, stats[1:])
    return stats[1:]


def _in_band(comps: np.ndarray, box: Box, height: float) -> np.ndarray:
    """Glyph-sized components inside a line's row band."""
    _, y0, _, y1 = box
    h = height
    return comps[(comps[:, 3] >= 0.25 * h) & (comps[:, 3] <= 1.1 * h) & (comps[:, 4] >= 4)
                 & (comps[:, 1] >= y0 - 0.2 * h) & (comps[:, 1] + comps[:, 3] <= y1 + 0.2 * h)]


def _rows(glyphs: np.ndarray) -> list[np.ndarray]:
    """Group glyphs into text rows: a glyph joins a row when it shares at least half of the
    smaller height with the row's vertical extent."""
    rows: list[list] = []
    for g in glyphs[np.argsort(glyphs[:, 1] + glyphs[:, 3] / 2)]:
        top, bottom = g[1], g[1] + g[3]
        for row in rows:
            rt, rb = row[0], row[1]
            if min(bottom, rb) - max(top, rt) >= 0.5 * min(g[3], rb - rt):
                row[0], row[1] = min(rt, top), max(rb, bottom)
                row[2].append(g)
                break
        else:
            rows.append([top, bottom, [g]])
    return [np.array(r[2]) for r in rows]


def split_lines(comps: np.ndarray, boxes: list[Box]) -> list[Box]:
    """Split a box that holds several rows of letters into one box per row.

    Detectors fuse neighbouring lines (and a short line beside a long one) into one box; its
    bounding rectangle then covers the empty corners between them. Where a box holds two or
    more rows of glyph-sized components of the text colour, each with at least two glyphs,
    it is replaced by each row's own extent (letters' rows plus a third of their height above
    and below, so a row box has a detector box's proportions). Text a split leaves out is found
    by the verification read and blanked in the next round.
    """
    out: list[Box] = []
    for box in boxes:
        x0, y0, x1, y1 = box
        h = y1 - y0
        inside = comps[(comps[:, 0] >= x0 - 2) & (comps[:, 0] + comps[:, 2] <= x1 + 2)
                       & (comps[:, 1] >= y0 - 2) & (comps[:, 1] + comps[:, 3] <= y1 + 2)
                       & (comps[:, 3] >= 6) & (comps[:, 3] <= 0.6 * h)
                       & (comps[:, 2] <= 2 * comps[:, 3]) & (comps[:, 4] >= 4)]
        rows = [r for r in _rows(inside) if len(r) >= 2] if len(inside) >= 4 else []
        if len(rows) < 2:
            out.append(box)
            continue
        for r in rows:
            top, bottom = int(r[:, 1].min()), int((r[:, 1] + r[:, 3]).max())
            m = max(1, (bottom - top) // 3)
            out.append((max(x0, int(r[:, 0].min())), max(y0, top - m),
                        min(x1, int((r[:, 0] + r[:, 2]).max())), min(y1, bottom + m)))
    return out


def _same_row(a: Box, b: Box) -> bool:
    return min(a[3], b[3]) - max(a[1], b[1]) >= 0.5 * min(a[3] - a[1], b[3] - b[1])


def fit_to_glyphs(gray: np.ndarray, boxes: list[Box], max_reach: float = 8.0,
                  barriers: list[Box] = ()) -> list[Box]:
    """Fit each line box to the glyphs drawn in the text's own colour.

    Burned-in text is drawn in one value. Where that value is found (:func:`_text_colour`),
    connected components of exactly it, glyph-sized and inside a line's row band, are the
    line's letters: the box grows along the row over letters within one and a half line
    heights of its ends (line detectors drop short trailing tokens such as a one-letter sex or a
    two-digit age, and clip first/last letters; at most ``max_reach`` line heights each way, and
    never into a ``barriers`` box on the same row: a kept label or marker), and its top and bottom shrink to the letters' rows when the letters span most of the box
    (detector boxes are about twice the letter height). Boxes without such letters stay as
    they are.
    """
    colour = _text_colour(gray, boxes)
    if colour is None:
        return boxes
    comps = _glyphs(gray, colour)
    out = []
    for x0, y0, x1, y1 in split_lines(comps, boxes):
        h = y1 - y0
        band = _in_band(comps, (x0, y0, x1, y1), h)
        row = [k for k in barriers if _same_row(k, (x0, y0, x1, y1))]
        stop_l = max((k[2] for k in row if k[2] <= x0 + 1), default=-1)
        stop_r = min((k[0] for k in row if k[0] >= x1 - 1), default=gray.shape[1] + 1)
        band = band[(band[:, 2] <= 1.5 * h) & (band[:, 0] >= stop_l)
                    & (band[:, 0] + band[:, 2] <= stop_r)]
        lo, hi, grew = x0, x1, True
        while grew:  # one letter at a time, each way; stops when nothing new is reached
            grew = False
            ends = band[:, 0] + band[:, 2]
            right = ends[(band[:, 0] >= hi - 1) & (band[:, 0] <= hi + 1.5 * h)
                         & (ends <= x1 + max_reach * h) & (ends > hi)]
            left = band[(ends <= lo + 1) & (ends >= lo - 1.5 * h)
                        & (band[:, 0] >= x0 - max_reach * h) & (band[:, 0] < lo), 0]
            if len(right):
                hi, grew = int(right.max()), True
            if len(left):
                lo, grew = int(left.min()), True
        inside = band[(band[:, 0] >= lo) & (band[:, 0] + band[:, 2] <= hi)]
        top, bottom = y0, y1
        if len(inside) and inside[:, 2].sum() >= 0.5 * (hi - lo):
            top = max(y0, int(inside[:, 1].min()) - 1)
            bottom = min(y1, int((inside[:, 1] + inside[:, 3]).max()) + 1)
        out.append((lo, top, hi, bottom))
    return out


def pad_box(box: Box, shape, opts: ScrubOptions) -> Box:
    """Pad by ``pad_fraction`` of the line's thickness across it and ``pad_x_factor`` times
    that along it (line detectors clip first and last letters more often than tops and
    bottoms); a vertical line's thickness is its width."""
    x0, y0, x1, y1 = box
    vertical = (y1 - y0) > 1.5 * (x1 - x0)
    p = max(opts.min_pad, int(round(opts.pad_fraction * min(y1 - y0, x1 - x0))))
    along = int(round(opts.pad_x_factor * p))
    px, py = (p, along) if vertical else (along, p)
    return max(x0 - px, 0), max(y0 - py, 0), min(x1 + px, shape[1]), min(y1 + py, shape[0])


def join_lines(boxes: list[Box], kept: list[Box], max_gap: float = 3.0,
               max_ratio: float = 2.0) -> list[Box]:
    """Blank whole lines: boxes on one row (similar heights) with gaps under ``max_gap`` line
    heights are joined into one, the gap included (a word between two detections that no
    rendering found is part of the line), never across a kept marker or label on that row."""
    out = sorted(boxes, key=lambda b: (b[0], b[1]))
    joined = True
    while joined:
        joined = False
        for i, a in enumerate(out):
            for j in range(i + 1, len(out)):
                b = out[j]
                ha, hb = a[3] - a[1], b[3] - b[1]
                if max(ha / max(a[2] - a[0], 1), hb / max(b[2] - b[0], 1)) >= 3:
                    continue  # vertical text: its lines stand side by side, not end to end
                gap = max(b[0] - a[2], a[0] - b[2])
                if not (_same_row(a, b) and max(ha, hb) <= max_ratio * min(ha, hb)
                        and gap <= max_gap * min(ha, hb)):
                    continue
                span = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                if any(_same_row(k, span) and k[0] >= min(a[2], b[2]) - 1
                       and k[2] <= max(a[0], b[0]) + 1 for k in kept):
                    continue  # a kept label or marker sits between them
                out[i] = span
                del out[j]
                joined = True
                break
            if joined:
                break
    return out


def widen_block(boxes: list[Box], kept: list[Box] = ()) -> list[Box]:
    """Blank a text block to its right edge: a line directly above or below another (gap under
    one line height, similar height, starting within two line heights of it) is widened to the
    other's right end, never over a kept marker or label on its row. A value's last letters,
    lost where the background matched the text's grey, go with it; the block's empty corners
    are a small price."""
    out = list(boxes)
    changed = True
    while changed:
        changed = False
        for i, (x0, y0, x1, y1) in enumerate(out):
            h = y1 - y0
            if h > 1.5 * (x1 - x0):
                continue
            for ax0, ay0, ax1, ay1 in out:
                ah = ay1 - ay0
                gap = max(ay0 - y1, y0 - ay1)
                if not (0.5 * h <= ah <= 2 * h and -0.5 * h <= gap <= h and abs(ax0 - x0) <= 2 * h
                        and ax1 > x1):
                    continue
                wide = (x0, y0, ax1, y1)
                if any(_same_row(k, wide) and k[0] >= x1 - 1 and k[0] < ax1 for k in kept):
                    continue
                out[i] = wide
                changed = True
                break
    return out
