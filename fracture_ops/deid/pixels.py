"""Burned-in text scrubbing: find text in the pixels, blank it, read the result again.

The pure core of pixel de-identification (no file I/O): it works on numpy frames and returns the
boxes it blanked, the regions it held for a person and what the verification read found. DICOM
and PNG/JPEG callers (:mod:`fracture_ops.deid.dicom`, :mod:`fracture_ops.deid.images`) decode,
call :func:`scrub_frames`, and write back.

Finding: the detector looks at the stored window in both polarities (``window_polarity``) and at
a stroke rendering
(:mod:`.strokes`: letters of either polarity on any background, so that text crossing from a dark
background onto bright bone, or grey on grey, is found); boxes are merged into lines
(:mod:`.lines`).

Deciding (``PixelConfig.policy``):
- ``default``: every detection is read (a tall one turned both ways). Read as text, or holding
  one of the file's header values: blanked, except short markers on the keep-list (``L``, ``R``,
  ``AP``, ``LAT``...) and keep-listed field labels before a colon (:mod:`.labels`: the label
  stays, the value goes). Not read: blanked when it continues a line that was read or when its
  strokes form a row of letters in the border band (where annotations are written); held for a
  person (not blanked, the file not released) when letter-like inside the body; ignored when its
  strokes are not letters (bone edges, trabeculae, wires).
- ``blank-unread``: as ``default``, but unread detections are blanked instead of held.
- ``all-text``: every detected region is blanked, nothing is read before blanking.

Blanking is line-level: each box grows along its row over the letters' strokes, whatever the
background under them, and the boxes of one line are joined with the gaps between them; then it
is padded. Verification looks again on the stroke rendering at another scale, and Tesseract
(where installed) reads a locally normalised rendering of the border bands and of the region
around every blanked line outside them; any header value or identifier-shaped word it reads
(:mod:`.verify`) is blanked in another round, and text still present after the last round fails
the file (callers quarantine it). Blanked pixels take the frame's minimum value; every other
pixel is left bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from fracture_ops.deid.ocr import Box, TextEngine
from fracture_ops.deid.options import ScrubOptions
from fracture_ops.deid.labels import _head, _is_label, _reads_label, split_label
from fracture_ops.deid.lines import (  # noqa: F401 - merge_boxes, widen_continuations: public here too
    _glyphs,
    _same_row,
    _text_colour,
    fit_to_glyphs,
    join_lines,
    merge_boxes,
    pad_box,
    widen_block,
    widen_continuations,
)
from fracture_ops.deid.phi_text import contains_phi
from fracture_ops.deid.strokes import (
    extend_along_strokes,
    neighbour_lines,
    in_border_band,
    z_view_regions,
    looks_like_text,
    glyphs,
    stroke_view,
)
from fracture_ops.deid.verify import identifier_kind, read_regions, verification_regions

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
    """Stored values -> 8 bits, the range spanning the 0.01th to 99.99th percentiles (burned-in
    text sits at an extreme of the range and covers far more than 0.01 % of a frame; a few hot
    or dead pixels at the type's limits no longer squeeze the image into a few grey levels)."""
    a = frame.astype(np.float32)
    if a.ndim == 3:
        a = a.mean(axis=-1)
    sample = a[::max(1, a.shape[0] // 512), ::max(1, a.shape[1] // 512)]
    lo, hi = (float(v) for v in np.percentile(sample, [0.01, 99.99]))
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.ascontiguousarray(np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255).round()
                                .astype(np.uint8))


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


def _reads_as_text(box: Box, text: str, score: float, shape, opts: ScrubOptions,
                   tokens: set[str]) -> bool:
    """Read as text: a header value, an identifier-shaped word, or (``_is_text``) two letters or
    digits read with ``min_score``; inside the body, where textures fool the recogniser into
    short confident reads, three or more read with a score of 0.85."""
    if contains_phi(text, tokens) or identifier_kind(text, score, opts.keep_tokens,
                                                     opts.label_words):
        return True
    if in_border_band(box, shape, opts.border_band):
        return _is_text(text, score, opts)
    return score >= max(opts.min_score, 0.85) and len(re.sub(r"[^0-9A-Za-z]", "", text)) >= 3


def _continues(box: Box, lines: list[Box]) -> bool:
    """On the row of a line read as text (top and bottom aligned with it, a similar height)
    and within five of its heights of it: the rest of
    that line (a word the recogniser could not read on its own)."""
    h = box[3] - box[1]
    return any(abs(box[1] - o[1]) <= 0.3 * h + 1 and abs(box[3] - o[3]) <= 0.3 * h + 1
               and 0.7 * h <= (o[3] - o[1]) <= 1.5 * h
               and max(o[0] - box[2], box[0] - o[2]) <= 5 * min(h, o[3] - o[1]) for o in lines)


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
        if not _reads_as_text(b, text, score, gray.shape, opts, tokens):
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
            scale: float | None = None, window: bool = True,
            strokes: np.ndarray | None = None) -> list[Box]:
    """Text-line boxes on the window rendering (``window``; inverted, or in both polarities:
    ``opts.window_polarity``) and, with
    ``stroke_view``, on the stroke rendering (text of either polarity on any background,
    :mod:`.strokes`; ``strokes``: its glyph mask, when already computed)."""
    views = [gray] if window or not opts.stroke_view else []
    if opts.stroke_view:
        views.append(stroke_view(gray) if strokes is None
                     else np.where(strokes, np.uint8(0), np.uint8(255)))
    boxes: list[Box] = []
    for view in views:
        kwargs = {} if scale is None else {"scale": scale}
        # dark strokes on white; the window in the options' polarity
        kwargs["polarity"] = "pos" if view is not gray else opts.window_polarity
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
        regions = verification_regions(gray.shape, opts.border_band, frame.blanked)
        view = z_view_regions(gray, regions)
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


def _extend(gray: np.ndarray, comps: np.ndarray, boxes: list[Box], kept: list[Box],
            read: list[Box]) -> list[Box]:
    """Each line read as text grown along its row over the letters' strokes
    (:mod:`.strokes`; an unread fragment is not: it could be anatomy), the boxes of one line
    joined (:func:`join_lines`), and lines of the same block that no rendering found, right
    above or below, added (:func:`neighbour_lines`)."""
    lines = join_lines([extend_along_strokes(comps, b, gray.shape, kept)
                        if _inside(b, read) or any(_inside(r, [b]) for r in read) else b
                        for b in boxes], kept)
    more = neighbour_lines(comps, lines, kept, gray.shape)
    return widen_block(lines + [extend_along_strokes(comps, b, gray.shape, kept) for b in more],
                       kept)


def scrub_frame(frame: np.ndarray, engine: TextEngine, verifiers: list[TextEngine],
                opts: ScrubOptions, tokens: set[str], fill=None) -> FrameScrub:
    """Find, blank (in place) and verify one frame; see the module docstring."""
    result = FrameScrub()
    fill = frame.min() if fill is None else fill
    gray = to_gray8(frame)
    comps, strokes = glyphs(gray)
    found = _plausible(_locate(engine, gray, opts, strokes=strokes), gray.shape, opts)
    # letters and words a line's detections come in (spaced-out letters, words cut by a band
    # of another brightness) are read as the one line they are
    boxes = join_lines(_plausible(merge_boxes(found), gray.shape, opts), [], max_gap=1.0,
                       max_ratio=1.5)
    boxes = widen_continuations(boxes)
    todo = fit_to_glyphs(gray, _decide(gray, boxes, engine, opts, tokens, result, comps),
                         barriers=result.kept)
    todo = _extend(gray, comps, todo, result.kept, result.read)
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
        todo = _extend(gray, comps, todo, result.kept, result.read)
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
