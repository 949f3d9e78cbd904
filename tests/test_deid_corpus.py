"""The pixel scrub on a generated family of burned-in text styles it was not tuned on (seed 7; the
development runs used seed 0), on synthetic and real radiograph backgrounds, judged two ways
that do not rely on the scrubber's own verification: the exact ink of every PHI token (the text
is drawn here) and an independent Tesseract read of each line's original box in the output.

Also: precision on text-free films (nothing blanked, markers kept) and the identifier shapes
the verification read fails closed on."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest

from fracture_ops.deid.corpus import STYLES, case_for, exposed_tokens, real_background
from fracture_ops.deid.ocr import engine_available
from fracture_ops.deid.phi_text import contains_phi, normalise
from fracture_ops.deid.verify import identifier_kind

pytestmark = [pytest.mark.slow]
SEED = 7
# 11 styles x 6 = 66 files in the suite; the measurement of the note used 19 per style
# (209 files): FRACTURE_OPS_CORPUS_PER_STYLE=19 pytest -s tests/test_deid_corpus.py prints it
PER_STYLE = int(os.environ.get("FRACTURE_OPS_CORPUS_PER_STYLE", "6"))
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "fracatlas" / "images"


def _backgrounds() -> list[np.ndarray]:
    if not REAL.is_dir():
        return []
    paths = sorted(REAL.rglob("*.jpg"))[::7][:24]
    return [real_background(p, None) for p in paths]


def _tesseract_reads(image: np.ndarray, boxes: list) -> list[str]:
    """Tesseract on one mosaic of every box (padded by half its height, enlarged 3x, vertical
    ones turned both ways), in both polarities: one read per polarity, not one per word."""
    import cv2
    import pytesseract

    crops = []
    for x0, y0, x1, y1 in boxes:
        p = max(2, (y1 - y0) // 2)
        crop = image[max(0, y0 - p):y1 + p, max(0, x0 - p):x1 + p]
        turns = [np.rot90(crop, 1), np.rot90(crop, -1)] if (y1 - y0) > 1.5 * (x1 - x0) else [crop]
        for c in turns:
            crops.append(cv2.resize(np.ascontiguousarray(c), None, fx=3, fy=3,
                                    interpolation=cv2.INTER_CUBIC))
    if not crops:
        return []
    gap = 24
    width = max(c.shape[1] for c in crops) + 2 * gap
    out = []
    for invert in (False, True):
        rows = []
        for c in crops:
            c = 255 - c if invert else c
            fill = int(np.median(c))
            row = np.full((c.shape[0] + gap, width), fill, np.uint8)
            row[gap // 2:gap // 2 + c.shape[0], gap:gap + c.shape[1]] = c
            rows.append(row)
        out.append(pytesseract.image_to_string(np.vstack(rows), config="--psm 6"))
    return out


def _readable(tokens, reads: list[str]) -> list[str]:
    """Tokens (letters/digits only, 3+ long) that some read contains."""
    got = []
    for tok in tokens:
        key = normalise(tok.text)
        if len(key) >= 3 and any(contains_phi(r, {key}) for r in reads):
            got.append(tok.text)
    return got


def _run_case(job):
    """Scrub one case in a worker; what both judges say about it."""
    from fracture_ops.deid import scrub
    from fracture_ops.deid.config import PixelConfig

    style, i, backgrounds = job
    case = case_for(style, i, backgrounds, SEED)
    frames = case.image[None].copy()
    try:
        result = scrub.scrub_array(frames, PixelConfig(threads=1), case.header)
        status = "held" if result.held else "released"
    except scrub.PixelTextRemains:
        status = "quarantined"
    out = frames[0]
    boxes = [t.box for t in case.tokens]
    judged = engine_available("tesseract")
    # the judge's own sensitivity, on every third input (it is not blind)
    before = _readable(case.tokens, _tesseract_reads(case.image, boxes)) \
        if judged and i % 3 == 0 else None
    after = _readable(case.tokens, _tesseract_reads(out, boxes)) if judged else []
    mx0, my0, mx1, my1 = case.markers[0][1]
    region = (slice(my0, my1), slice(mx0, mx1))
    return {"name": case.name, "style": style, "status": status, "tokens": len(case.tokens),
            "ink_exposed": [t.text for t in exposed_tokens(case, out)],
            "tess_before": before, "tess_after": after,
            "marker_kept": bool((out[region] == case.image[region]).mean() > 0.9)}


@pytest.fixture(scope="module")
def corpus_results():
    backgrounds = _backgrounds()
    jobs = [(s, i, backgrounds) for s in STYLES for i in range(PER_STYLE)]
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        return list(pool.map(_run_case, jobs)), bool(backgrounds)


def _table(results) -> str:
    rows = defaultdict(Counter)
    for r in results:
        c = rows[r["style"]]
        c["files"] += 1
        c["tokens"] += r["tokens"]
        c["ink"] += len(r["ink_exposed"])
        c["tess_before"] += len(r["tess_before"] or [])
        c["judged"] += r["tokens"] if r["tess_before"] is not None else 0
        c["tess_after"] += len(r["tess_after"])
        c[r["status"]] += 1
        c["markers"] += r["marker_kept"]
    head = "style | files | PHI tokens | ink left | Tesseract read before (of judged) | " \
           "Tesseract read after | released | held | quarantined | markers kept"
    lines = [head]
    for style in STYLES:
        c = rows[style]
        lines.append(f"{style} | {c['files']} | {c['tokens']} | {c['ink']} | {c['tess_before']} "
                     f"({c['judged']}) | {c['tess_after']} | {c['released']} | {c['held']} | "
                     f"{c['quarantined']} | {c['markers']}")
    return "\n".join(lines)


def test_every_style_leaves_no_readable_token_and_releases_no_leak(corpus_results):
    results, real = corpus_results
    print("\n" + _table(results) + f"\n(real backgrounds: {real})")
    assert len(results) == len(STYLES) * PER_STYLE and {r["style"] for r in results} == set(STYLES)
    readable = [(r["name"], r["status"], r["tess_after"]) for r in results if r["tess_after"]]
    # the independent read finds no PHI token in any output, released or not
    assert readable == [], f"PHI readable by Tesseract after scrubbing: {readable[:5]}"
    # the exact judge: ink left visible (readable or not) on at most 0.5 % of the tokens;
    # measured 3 of 1,287 before the last two fixes (vertical block lines, block widening),
    # each of those files then re-checked clean
    ink = [(r["name"], r["status"], r["ink_exposed"]) for r in results if r["ink_exposed"]]
    tokens = sum(r["tokens"] for r in results)
    assert sum(len(x[2]) for x in ink) <= 0.005 * tokens, f"ink left: {ink[:5]}"
    if engine_available("tesseract"):
        # the independent judge does read the tokens before scrubbing (it is not blind)
        judged = [r for r in results if r["tess_before"] is not None]
        assert sum(len(r["tess_before"]) for r in judged) >= 0.4 * sum(r["tokens"] for r in judged)


def test_markers_survive_and_few_files_are_held(corpus_results):
    results, _ = corpus_results
    kept = sum(r["marker_kept"] for r in results) / len(results)
    held = sum(r["status"] == "held" for r in results) / len(results)
    quarantined = sum(r["status"] == "quarantined" for r in results) / len(results)
    assert kept >= 0.95, kept  # plain letters and lead-marker icons (box, circle) alike
    assert held <= 0.1 and quarantined <= 0.1, (held, quarantined)


def _text_free_job(job):
    from fracture_ops.deid import scrub
    from fracture_ops.deid.config import PixelConfig
    from fracture_ops.deid.corpus import synthetic_background

    kind, ref = job
    if kind == "synthetic":
        rng = np.random.default_rng([SEED, ref])
        h, w = (int(rng.integers(300, 1100)), int(rng.integers(300, 1100)))
        img = synthetic_background(rng, h, w)
    else:
        img = real_background(Path(ref), None, max_side=1400)
    frames = img[None].copy()
    try:
        result = scrub.scrub_array(frames, PixelConfig(threads=1), {})
        frame = result.frames[0]
        return kind, [list(b) for b in frame.blanked], len(frame.held), list(frame.read), img.shape
    except scrub.PixelTextRemains:
        return kind, None, 0, [], img.shape


def _inside_body(box, shape, band=0.1) -> bool:
    h, w = shape[:2]
    x0, y0, x1, y1 = box
    return x0 > band * w and x1 < (1 - band) * w and y0 > band * h and y1 < (1 - band) * h


def _near_read(box, read, reach=12) -> bool:
    """Within ``reach`` pixels of a region read as text across its line, and within two line
    heights along it (the line is followed over letters the reader's box clipped)."""
    x0, y0, x1, y1 = box
    for r in read:
        vertical = (r[3] - r[1]) > 1.5 * (r[2] - r[0])
        line = (r[2] - r[0]) if vertical else (r[3] - r[1])
        rx, ry = (reach, max(reach, 2 * line)) if vertical else (max(reach, 2 * line), reach)
        if x0 >= r[0] - rx and y0 >= r[1] - ry and x1 <= r[2] + rx and y1 <= r[3] + ry:
            return True
    return False


def test_text_free_films_keep_their_anatomy():
    """Synthetic films with anatomy-like texture and no text: nothing blanked. Real FracAtlas
    films (their own burned-in labels, logos and markers, no PHI): nothing blanked inside the
    body that no engine read as text, unless the file is held for review."""
    jobs = [("synthetic", k) for k in range(40)]
    real = sorted(REAL.rglob("*.jpg"))[3::10] if REAL.is_dir() else []
    jobs += [("real", str(p)) for p in real]
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        results = list(pool.map(_text_free_job, jobs))
    synthetic = [r for r in results if r[0] == "synthetic"]
    blanked = [r for r in synthetic if r[1] is None or r[1]]
    assert len(blanked) <= 0.01 * len(synthetic), f"{len(blanked)} synthetic text-free films blanked"
    reals = [r for r in results if r[0] == "real"]
    body = [r for r in reals if r[1] is None or (r[2] == 0 and any(
        _inside_body(b, r[4]) and not _near_read(b, r[3]) for b in r[1]))]
    # measured: 0 of 30 (1 before the along-line reach of two heights: a vertical label
    # followed 39 px past the reader's box)
    assert len(body) <= max(1, 0.01 * len(reals)), f"{len(body)} of {len(reals)} real films"
    stray = [r for r in reals if r[1] and r[2] == 0 and not all(_near_read(b, r[3]) for b in r[1])]
    print(f"\nreal films: {len(reals)}, any blank: {sum(bool(r[1]) for r in reals)}, held: "
          f"{sum(r[2] > 0 for r in reals)}, blanked away from any read text: {len(stray)}")
    if not REAL.is_dir():
        pytest.skip("../shared/realdata is absent (a user's clone): real films not checked")


@pytest.mark.parametrize("text,kind", [
    ("8989193730", "digits"), ("MRN 54204", "digits"), ("2009-03-14", "date"),
    ("07/22/1943", "date"), ("14.03.2009", "date"), ("Mar 7 1961", "date"),
    ("ACC12A345", "code"), ("ABERNATHY", "name"), ("Okonkwo,", "name"),
])
def test_identifier_shapes_fail_closed(text, kind):
    assert identifier_kind(text, 0.9) == kind


@pytest.mark.parametrize("text", ["L", "AP", "LAT", "PORTABLE", "Wrist", "Patient", "1234", "x7"])
def test_markers_labels_and_short_numbers_are_not_identifiers(text):
    keep = frozenset({"L", "AP", "LAT"})
    labels = frozenset({"PATIENT", "NAME"})
    assert identifier_kind(text, 0.95, keep, labels) is None


def test_a_low_confidence_word_is_not_a_name():
    assert identifier_kind("Sees", 0.5) is None and identifier_kind("Sees", 0.9) == "name"
