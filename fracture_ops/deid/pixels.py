"""Burned-in text scrubbing: find text in the pixels, blank it, read the result again.

The pure core of pixel de-identification (no file I/O): it works on numpy frames and returns the
boxes it blanked and what the verification read found. DICOM and PNG/JPEG callers
(:mod:`fracture_ops.deid.dicom`, :mod:`fracture_ops.deid.images`) decode, call
:func:`scrub_frames`, and write back.

Policy (``PixelConfig.policy``):
- ``default``: every detected text region is blanked except short radiographic markers on the
  keep-list (laterality ``L``/``R``, ``AP``, ``PA``, ``LAT``...); a region is read only when its
  shape could hold such a marker; of a wider line only its start is read, for a field label. A
  region whose text matches one of the file's own header values (names, ids, dates in common
  formats, institution, accession) is always blanked, keep-list or not. A line that reads
  ``<label>: <value>`` with a field label on ``keep_labels`` is cut at its colon: the label is
  kept, the value blanked; the cut stands only when the label's crop, read alone, is that label
  and nothing more (a cut inside the value would read as more), otherwise the whole line goes.
- ``all-text``: every detected region is blanked, nothing is read before blanking.

Geometry: a box holding several rows of letters (a detector fusing lines) is split into rows;
a line that sits under another and starts inside it (a wrapped value such as a long
institution name) is widened to the line it continues; where the text is drawn in one value (as
burned-in annotations are), each line box is fitted to its letters of that value, growing along
the row over letters the detector dropped (a one-letter sex, a two-digit age) and shrinking to the
letters' rows; then it is padded by ``pad_fraction`` of its height (twice that left/right).
Boxes taller than a tenth of the image are not text lines (anatomy, wires) and are never blanked. Verification runs the detector again on the blanked image at another scale (and
Tesseract, where installed, looking for header values); what it finds off the keep-list is blanked
in another round, and text still present after the last round fails the file (callers quarantine
it). Blanked pixels take the frame's minimum value; every other pixel is left bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from fracture_ops.deid.ocr import Box, TextEngine
from fracture_ops.deid.phi_text import contains_phi
from fracture_ops.deid.strokes import (
    extend_along_strokes,
    in_border_band,
    z_view,
    looks_like_text,
    glyphs,
    stroke_view,
)
from fracture_ops.deid.verify import identifier_kind, read_regions, verification_regions

@dataclass(frozen=True)
class ScrubOptions:
    """The knobs of :func:`scrub_frames` (built from ``PixelConfig``)."""

    policy: str = "default"
    keep_tokens: frozenset[str] = frozenset()
    keep_labels: frozenset[str] = frozenset()  # label_key() of field labels kept before a colon
    label_words: frozenset[str] = frozenset()  # the labels' words, upper case ("PATIENT", "ID")
    label_reach: float = 12.0  # how much of a line (in line heights) is read for its label
    pad_fraction: float = 0.1
    min_pad: int = 3
    marker_aspect: float = 6.0
    rounds: int = 2
    min_score: float = 0.5
    verify_scale: float = 0.8
    max_line_height: float = 0.1  # of the shorter image side
    pad_x_factor: float = 2.0  # left/right padding as a multiple of the vertical padding
    border_band: float = 0.1  # outer fraction of each side where annotations are written
    stroke_view: bool = True  # also detect on the contrast-independent stroke rendering
    verify_patterns: bool = True  # identifier-like words in the verification read fail closed


@dataclass
class FrameScrub:
    """What was done to one frame."""

    blanked: list[Box] = field(default_factory=list)
    kept: list[Box] = field(default_factory=list)
    residual: list[Box] = field(default_factory=list)
    held: list[Box] = field(default_factory=list)  # unread detections left for a person
    read: list[Box] = field(default_factory=list)  # detections an engine read as text
    unread_blanked: int = 0  # text-like border regions blanked though no engine read them
    ignored: int = 0  # unread detections whose strokes are not a row of letters (anatomy)
    phi_hits: int = 0
    area_fraction: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.residual


@dataclass
class ScrubResult:
    """What :func:`scrub_frames` did, frame by frame; ``passed`` when nothing was left."""

    frames: list[FrameScrub]
    engines: dict[str, str]

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.frames)

    @property
    def regions(self) -> int:
        return sum(len(f.blanked) for f in self.frames)

    @property
    def held(self) -> int:
        """Detections no engine read as text, left unblanked for a person to review."""
        return sum(len(f.held) for f in self.frames)

    @property
    def blanked_fraction(self) -> float:
        return max((f.area_fraction for f in self.frames), default=0.0)


def to_gray8(frame: np.ndarray) -> np.ndarray:
    """Stored values -> 8 bits by min-max (burned-in text sits at an extreme of the range)."""
    a = frame.astype(np.float32)
    if a.ndim == 3:
        a = a.mean(axis=-1)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.ascontiguousarray(((a - lo) * (255.0 / (hi - lo))).round().astype(np.uint8))


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
    def thin(a: Box, b: Box) -> bool:  # b is a thinner line inside a
        ta, tb = min(a[2] - a[0], a[3] - a[1]), min(b[2] - b[0], b[3] - b[1])
        return tb < 0.7 * ta and _covers(a, b)

    out: list[Box] = []
    for a in boxes:
        lines = [b for b in boxes if b != a and thin(a, b)]
        if len(lines) < 2:
            out.append(a)
            continue
        vertical = (a[3] - a[1]) > (a[2] - a[0]) and all(
            (b[3] - b[1]) > (b[2] - b[0]) for b in lines)
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


def _glyphs(gray: np.ndarray, colour: int) -> np.ndarray:
    """Connected components of exactly the text colour: rows of (x, y, w, h, area)."""
    import cv2

    _, _, stats, _ = cv2.connectedComponentsWithStats((gray == colour).astype(np.uint8), 8)
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
    """Pad by ``pad_fraction`` of the height above/below and ``pad_x_factor`` times that
    left/right (line detectors clip first and last letters more often than tops and bottoms)."""
    x0, y0, x1, y1 = box
    p = max(opts.min_pad, int(round(opts.pad_fraction * (y1 - y0))))
    px = int(round(opts.pad_x_factor * p))
    return max(x0 - px, 0), max(y0 - p, 0), min(x1 + px, shape[1]), min(y1 + p, shape[0])


def _near(box: Box, others: list[Box]) -> bool:
    """Touching or within one line height of a blanked box: a fragment of blanked text."""
    h, w = box[3] - box[1], box[2] - box[0]
    return w <= 3 * h and any(
        h <= (o[3] - o[1]) and box[0] < o[2] + h and o[0] < box[2] + h
        and box[1] < o[3] + h // 2 and o[1] < box[3] + h // 2 for o in others)


def _is_marker(text: str, opts: ScrubOptions, tokens: set[str]) -> bool:
    word = re.sub(r"[^0-9A-Z]", "", text.upper())
    return bool(word) and word in opts.keep_tokens and not contains_phi(text, tokens)


def _plausible(boxes: list[Box], shape, opts: ScrubOptions) -> list[Box]:
    """Drop boxes too thick to be a line of annotation text (anatomy the detector mistook).

    A line's thickness is its smaller side: a vertical line of text is tall and thin."""
    limit = opts.max_line_height * min(shape[:2])
    return [b for b in boxes if min(b[3] - b[1], b[2] - b[0]) <= limit]


def _is_tall(box: Box) -> bool:
    return (box[3] - box[1]) >= 1.5 * (box[2] - box[0]) and (box[3] - box[1]) >= 24


def _read(gray: np.ndarray, boxes: list[Box], engine: TextEngine) -> dict[Box, tuple[str, float]]:
    """Read boxes; a tall box is read turned a quarter both ways (vertical text), best kept."""
    flat = [b for b in boxes if not _is_tall(b)]
    out = dict(zip(flat, engine.read(gray, flat))) if flat else {}
    for b in (b for b in boxes if _is_tall(b)):
        crop = np.ascontiguousarray(gray[b[1]:b[3], b[0]:b[2]])
        best = ("", 0.0)
        for turned in (np.rot90(crop, 1), np.rot90(crop, -1)):
            turned = np.ascontiguousarray(turned)
            got = engine.read(turned, [(0, 0, turned.shape[1], turned.shape[0])])[0]
            best = max(best, got, key=lambda r: r[1])
        out[b] = best
    return out


def _is_text(text: str, score: float, opts: ScrubOptions) -> bool:
    return score >= opts.min_score and len(re.sub(r"[^0-9A-Za-z]", "", text)) >= 2


def _continues(box: Box, lines: list[Box]) -> bool:
    """On the row of a line read as text and within five of its heights of it: the rest of
    that line (a word the recogniser could not read on its own)."""
    h = box[3] - box[1]
    return any(_same_row(box, o) and 0.5 * h <= (o[3] - o[1]) <= 2 * h
               and max(o[0] - box[2], box[0] - o[2]) <= 5 * (o[3] - o[1]) for o in lines)


def _unread(box: Box, shape, boxes: list[Box], texts: dict, comps: np.ndarray,
            opts: ScrubOptions) -> str:
    """What to do with a detection no engine read as text: ``blank``, ``hold`` or ``ignore``.

    ``blank``: policy ``blank-unread``; or a fragment touching a line that did read as text on
    the same row (a clipped word); or letter-like strokes in the border band. ``hold``:
    letter-like strokes inside the body (a person decides). ``ignore``: strokes that are not a
    row of letters (bone edges, trabeculae, wires), whose count the report gives.
    """
    if opts.policy == "blank-unread":
        return "blank"
    read = [b for b in boxes if b != box and _is_text(*texts.get(b, ("", 0.0)), opts)]
    if _near(box, read) or _continues(box, read):
        return "blank"
    if not looks_like_text(comps, box):
        return "ignore"
    return "blank" if in_border_band(box, shape, opts.border_band) else "hold"


def _decide(gray: np.ndarray, boxes: list[Box], engine: TextEngine, opts: ScrubOptions,
            tokens: set[str], frame: FrameScrub, comps: np.ndarray) -> list[Box]:
    """Which boxes to blank; keep-list markers and field labels go to ``frame.kept``, unread
    detections a person must look at to ``frame.held``.

    Every box is read (a tall one turned both ways). A box is blanked when it reads as text
    (``min_score``, two letters or digits) or holds a header value; under the default policy
    a line that reads ``<keep-listed label>: <value>`` keeps its label and has the rest
    blanked. A box no engine reads is blanked only when it reaches into the border band and
    its strokes form a row of letters (:func:`looks_like_text`); any other unread box (inside
    the body, or not letter-like) is held for review, not blanked (``blank-unread`` blanks
    it). Every box is blanked unread under ``all-text``.
    """
    if opts.policy == "all-text":
        return boxes
    ask = [b for b in boxes if (b[2] - b[0]) <= opts.marker_aspect * (b[3] - b[1])]
    texts = _read(gray, ask, engine) if ask else {}
    # a line's label is in its first few letters: only that much of a wide line is read
    heads = {b: _head(b, opts) for b in boxes
             if opts.keep_labels and b not in texts and not _is_tall(b)}
    texts.update(zip(heads, engine.read(gray, list(heads.values())) if heads else []))
    again = [b for b, h in heads.items() if h != b and not _reads_label(texts[b][0], opts)]
    if again:  # a misread head: the whole line, read once more
        texts.update(zip(again, engine.read(gray, again)))
        heads.update((b, b) for b in again)
    unread = [b for b in boxes if b not in texts]
    if unread:  # wide lines when no label is kept: read whole
        texts.update(_read(gray, unread, engine))
    colour = _text_colour(gray, boxes) if opts.keep_labels else None
    glyphs = _glyphs(gray, colour) if colour is not None else None
    blank: list[Box] = []
    splits: list[tuple[Box, list, list]] = []
    for b in boxes:
        text, score = texts.get(b, ("", 0.0))
        if _is_marker(text, opts, tokens) and score >= opts.min_score:
            frame.kept.append(b)
            continue
        if not (_is_text(text, score, opts) or contains_phi(text, tokens)):
            verdict = _unread(b, gray.shape, boxes, texts, comps, opts)
            if verdict == "ignore":
                frame.ignored += 1
                continue
            if verdict == "hold":
                frame.held.append(b)
                continue
            frame.unread_blanked += 1
        else:
            frame.read.append(b)
        frame.phi_hits += bool(text) and contains_phi(text, tokens)
        if text:
            cuts = split_label(gray, colour, glyphs, b, text, opts, tokens, heads.get(b, b)[2])
            if cuts[0] or cuts[1]:
                splits.append((b, *cuts))
        blank.append(b)
    # a label is kept only if its own crop reads as that label and nothing more (the leftmost
    # cut that does, so that no value letter stays); the colon and the space after it are
    # tried first, the letter-by-letter cuts only for lines where neither reads right
    for stage in (1, 2):
        tries = [(b, cut) for b, *cuts in splits if b in blank for cut in cuts[stage - 1]]
        reads = engine.read(gray, [lab for _, (lab, _) in tries]) if tries else []
        for (b, (lab, value)), (got, score) in zip(tries, reads):
            got = got.strip().rstrip(":;").strip()
            want = _is_label(re.split("[:;]", texts[b][0])[0], opts.keep_labels)
            if b in blank and score >= opts.min_score and want is not None \
                    and _is_label(got, opts.keep_labels) == want \
                    and not contains_phi(got, tokens):
                frame.kept.append(lab)
                blank[blank.index(b)] = value
    # the other polarity's box around a kept marker is the same marker
    return [b for b in blank if not _inside(b, frame.kept) or _area(b) > 2 * min(
        (_area(k) for k in frame.kept), default=0)]


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _inside(box: Box, kept: list[Box]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return any(k[0] <= cx <= k[2] and k[1] <= cy <= k[3] for k in kept)


def _locate(engine: TextEngine, gray: np.ndarray, opts: ScrubOptions,
            scale: float | None = None, window: bool = True) -> list[Box]:
    """Text-line boxes on the window rendering (both polarities; ``window``) and, with
    ``stroke_view``, on the stroke rendering (text of either polarity on any background,
    :mod:`.strokes`)."""
    views = ([gray] if window or not opts.stroke_view else []) + \
        ([stroke_view(gray)] if opts.stroke_view else [])
    boxes: list[Box] = []
    for view in views:
        kwargs = {} if scale is None else {"scale": scale}
        if view is not gray:
            kwargs["polarity"] = "pos"  # dark strokes on white
        try:
            boxes += engine.locate(view, **kwargs)
        except TypeError:  # a site's engine without scale/polarity arguments
            boxes += engine.locate(view)
    return boxes


def _residual(gray: np.ndarray, engine: TextEngine, verifiers: list[TextEngine],
              opts: ScrubOptions, tokens: set[str], frame: FrameScrub) -> list[Box]:
    """Text the verification read still finds: off the keep-list, or holding a header value.

    The engine looks again at another scale (``verify_scale``) where it supports one; each
    verifier engine reads a rendering the detector did not see (locally normalised,
    :func:`~.strokes.z_view`) and reports header values and, with ``verify_patterns``, any word shaped like an
    identifier (:func:`~fracture_ops.deid.verify.identifier_kind`): those fail closed.
    Regions held for review are not looked at again (a person will).
    """
    # the second look: the stroke rendering only (both polarities at once), at another scale
    boxes = _plausible(_locate(engine, gray, opts, opts.verify_scale, window=False), gray.shape,
                       opts)
    boxes = [b for b in _plausible(merge_boxes(boxes), gray.shape, opts)
             if not _inside(b, frame.kept) and not _inside(b, frame.held)]
    found = []
    for b, (text, score) in _read(gray, boxes, engine).items():
        if _is_marker(text, opts, tokens) and (b[2] - b[0]) <= opts.marker_aspect * (b[3] - b[1]):
            frame.kept.append(b)  # a marker the first look missed stays
        elif contains_phi(text, tokens) or _is_text(text, score, opts):
            found.append(b)
            frame.read.append(b)
        elif _near(b, frame.blanked) and not _is_tall(b):
            found.append(b)  # a fragment of blanked text (a clipped first or last letter)
    if verifiers:
        view = z_view(gray)
        regions = verification_regions(gray.shape, opts.border_band, frame.blanked)
        for verifier in verifiers:
            for tb in read_regions(verifier, view, regions):
                if not tb.text or _inside(tb.box, frame.kept):
                    continue
                if contains_phi(tb.text, tokens) or (
                        opts.verify_patterns and identifier_kind(tb.text, tb.score, opts.keep_tokens,
                                                                 opts.label_words)):
                    found.append(tb.box)
                    frame.read.append(tb.box)
    return found


def blank(frame: np.ndarray, boxes: list[Box], fill) -> None:
    """Fill boxes (x0, y0, x1, y1; exclusive ends) of a (rows, cols[, samples]) frame in place."""
    for x0, y0, x1, y1 in boxes:
        frame[y0:y1, x0:x1, ...] = fill


def join_lines(boxes: list[Box], kept: list[Box], max_gap: float = 3.0) -> list[Box]:
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
                gap = max(b[0] - a[2], a[0] - b[2])
                if not (_same_row(a, b) and max(ha, hb) <= 2 * min(ha, hb)
                        and gap <= max_gap * max(ha, hb)):
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


def _extend(gray: np.ndarray, comps: np.ndarray, boxes: list[Box],
            kept: list[Box]) -> list[Box]:
    """Each line box grown along its row over the letters' strokes (:mod:`.strokes`), then
    the boxes of one line joined (:func:`join_lines`)."""
    return join_lines([extend_along_strokes(comps, b, gray.shape, kept) for b in boxes], kept)


def scrub_frame(frame: np.ndarray, engine: TextEngine, verifiers: list[TextEngine],
                opts: ScrubOptions, tokens: set[str], fill=None) -> FrameScrub:
    """Find, blank (in place) and verify one frame; see the module docstring."""
    result = FrameScrub()
    fill = frame.min() if fill is None else fill
    gray = to_gray8(frame)
    comps, _ = glyphs(gray)
    found = _plausible(_locate(engine, gray, opts), gray.shape, opts)
    boxes = widen_continuations(_plausible(merge_boxes(found), gray.shape, opts))
    todo = fit_to_glyphs(gray, _decide(gray, boxes, engine, opts, tokens, result, comps),
                         barriers=result.kept)
    todo = _extend(gray, comps, todo, result.kept)
    for _ in range(opts.rounds + 1):  # the first look, then up to `rounds` more
        padded = [pad_box(b, frame.shape, opts) for b in todo]
        blank(frame, padded, fill)
        result.blanked.extend(padded)
        if padded:
            gray = to_gray8(frame)
        result.residual = _residual(gray, engine, verifiers, opts, tokens, result)
        if not result.residual:
            break
        todo = fit_to_glyphs(gray, widen_continuations(merge_boxes(result.residual)),
                             barriers=result.kept)
        todo = _extend(gray, comps, todo, result.kept)
    mask = np.zeros(frame.shape[:2], bool)
    for x0, y0, x1, y1 in result.blanked:
        mask[y0:y1, x0:x1] = True
    result.area_fraction = float(mask.mean())
    return result


def scrub_frames(frames: np.ndarray, engine: TextEngine, verifiers: list[TextEngine],
                 opts: ScrubOptions, tokens: set[str], fill=None) -> ScrubResult:
    """Scrub every frame of a (frames, rows, cols[, samples]) array in place."""
    engines = {engine.name: engine.version, **{v.name: v.version for v in verifiers}}
    return ScrubResult([scrub_frame(f, engine, verifiers, opts, tokens, fill) for f in frames],
                       engines)
