"""A generated family of burned-in text cases, for testing a pixel scrub on styles it was not
built from (and for a site to test its own OCR engine before trusting it).

Each :class:`BurnedCase` is an 8-bit radiograph with fake PHI drawn into it in one *style* (the
ways real burned-in annotations defeat a scrubber: contrast that changes under the text, low
contrast in both polarities, tiny text, gradients, vertical text, boxed labels, multi-line
blocks, non-Latin names), plus laterality/projection markers that must survive (plain letters and
lead-marker icons: a letter inside a box or circle). Because the text is drawn here, the exact
glyph pixels of every PHI token are known: :func:`exposed_tokens` says which tokens still have
ink left after a scrub, independently of any OCR engine.

Backgrounds are synthetic (anatomy-like texture, :func:`synthetic_background`) or real radiographs
a caller passes in (e.g. FracAtlas images); the PHI is always fake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Box = tuple[int, int, int, int]

STYLES = ("bright", "dark", "boxed", "boundary", "lowcontrast_dark", "lowcontrast_bright",
          "small", "gradient", "rotated", "multiline", "nonlatin")

SURNAMES = ["ABERNATHY", "OKONKWO", "FITZGERALD", "VANDERBILT", "HOLLOWAY", "KIMURA", "PETROVA",
            "CASTELLANOS", "WHITFIELD", "BRANNIGAN", "LINDQVIST", "MORETTI", "ACHTERBERG",
            "DELACROIX", "HUNNICUTT", "RASMUSSEN"]
GIVEN = ["LUCAS", "AMARA", "THEODORE", "PRIYA", "GRETCHEN", "OSWALDO", "MEREDITH", "HIROSHI",
         "BEATRIX", "CORNELIUS", "SOLVEIG", "EZEKIEL"]
NONLATIN = [("MÜLLER", "JÜRGEN"), ("ØSTERGÅRD", "MADS"), ("KOWALSKI", "ŁUKASZ"),
            ("GARCÍA", "JOSÉ"), ("ΠΑΠΑΔΟΠΟΥΛΟΣ", "ΝΙΚΟΣ"), ("ИВАНОВ", "ПЁТР"),
            ("NGUYỄN", "VĂN"), ("ÇELİK", "AYŞE")]
INSTITUTIONS = ["LAKESIDE TRAUMA", "NORTHGATE CLINIC", "RIVERBEND HOSP", "ST BRIGID MEDICAL",
                "HIGHMOOR ORTHO", "WESTFIELD GENERAL"]
MARKERS = ["L", "R", "AP", "PA", "LAT"]
FONT_FILES = ["dejavu/DejaVuSans.ttf", "dejavu/DejaVuSansMono.ttf", "dejavu/DejaVuSerif.ttf",
              "dejavu/DejaVuSans-Bold.ttf", "liberation/LiberationSans-Regular.ttf",
              "liberation/LiberationMono-Regular.ttf", "liberation/LiberationSansNarrow-Regular.ttf"]
FONT_ROOT = Path("/usr/share/fonts/truetype")


@dataclass
class Token:
    """One PHI token drawn into a case: its text, kind and the mask of its glyph pixels."""

    text: str
    kind: str  # name, id, date, institution
    box: Box
    mask: np.ndarray = field(repr=False)  # bool, image-sized: the token's own ink


@dataclass
class BurnedCase:
    """A radiograph with fake PHI burned in, and the truth about what was drawn where."""

    name: str
    style: str
    image: np.ndarray  # uint8 (rows, cols)
    lines: list[str]
    line_boxes: list[Box]
    tokens: list[Token]
    markers: list[tuple[str, Box]]
    header: dict[str, list[str]]  # header values a DICOM would carry ({} for a bare image)


def fonts() -> list:
    """Font files available here (DejaVu/Liberation from Debian), else Pillow's built-in font."""
    found = [FONT_ROOT / f for f in FONT_FILES if (FONT_ROOT / f).exists()]
    return found or [None]


def _font(path, size: int):
    from PIL import ImageFont

    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size)


def synthetic_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An anatomy-like 8-bit film: dark surround, soft tissue, bright bones with trabecular
    texture (fine oriented noise), a collimation edge."""
    import cv2

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 25 + 80 * np.exp(-(((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 2.4)) ** 2))
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.25, 0.75) * h
        a, b = rng.uniform(0.04, 0.1) * w, rng.uniform(0.2, 0.4) * h
        t = rng.uniform(-0.4, 0.4)
        u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
        v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
        r = u ** 2 + v ** 2
        img += np.where(r < 1, 70 + 40 * (np.abs(u) > 0.7), 0)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.2)
    img += 14 * tex * (img > 110)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def real_background(path: Path, rng: np.random.Generator, max_side: int = 1000) -> np.ndarray:
    """A real radiograph as 8-bit grey, shrunk so its longer side is at most ``max_side``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        scale = min(1.0, max_side / max(im.size))
        if scale < 1:
            im = im.resize((max(1, int(im.size[0] * scale)), max(1, int(im.size[1] * scale))),
                           Image.BILINEAR)
        return np.asarray(im).copy()


def _phi_lines(rng: np.random.Generator, style: str, i: int) -> tuple[list[tuple[str, str]], dict]:
    """(line text, token kind of its value) pairs and the matching header values."""
    if style == "nonlatin":
        sur, given = NONLATIN[i % len(NONLATIN)]
    else:
        sur, given = SURNAMES[i % len(SURNAMES)], GIVEN[(i * 7) % len(GIVEN)]
    mrn = str(int(rng.integers(10000, 99999999)))
    y, m, d = int(rng.integers(1930, 2020)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    inst = INSTITUTIONS[i % len(INSTITUTIONS)]
    fmt = i % 3
    dob = [f"{y}-{m:02d}-{d:02d}", f"{m:02d}/{d:02d}/{y}", f"{d:02d}.{m:02d}.{y}"][fmt]
    lines = [(f"{sur}, {given}", "name"), (f"MRN {mrn}", "id"), (f"DOB {dob}", "date"),
             (inst, "institution")]
    if style == "multiline":
        acc = f"ACC {rng.integers(100000, 999999)}"
        lines += [(acc, "id"), (f"{given} {sur}", "name")]
    header = {"names": [f"{sur}^{given}"], "ids": [mrn], "dates": [f"{y}{m:02d}{d:02d}"],
              "texts": [inst]}
    return lines, header


def render_block(lines: list[tuple[str, str]], font, spacing: int
                 ) -> tuple[np.ndarray, list[tuple[str, str, np.ndarray]]]:
    """Draw text lines on an empty canvas: (alpha 0-255 of all ink, [(token, kind, alpha)]).

    Labels before a value (``MRN``, ``DOB``, ``ACC``) are drawn but are not PHI tokens."""
    from PIL import Image, ImageDraw

    widths = [ImageDraw.Draw(Image.new("L", (1, 1))).textlength(t, font=font) for t, _ in lines]
    cw, ch = int(max(widths)) + 8, spacing * len(lines) + spacing
    total = np.zeros((ch, cw), np.uint8)
    tokens = []
    for k, (line, kind) in enumerate(lines):
        cursor = 2.0
        words = line.split(" ")
        for j, word in enumerate(words):
            layer = Image.new("L", (cw, ch), 0)
            draw = ImageDraw.Draw(layer)
            draw.text((cursor, 2 + k * spacing), word, font=font, fill=255)
            arr = np.asarray(layer)
            total = np.maximum(total, arr)
            if not (j == 0 and kind in ("id", "date") and len(words) > 1):
                tokens.append((word.strip(","), kind, arr))
            cursor += draw.textlength(word + " ", font=font)
    return total, tokens


def _paste(img: np.ndarray, alpha: np.ndarray, x: int, y: int, fill) -> None:
    """Blend ink into ``img`` at (x, y): each pixel moves toward ``fill(background)``."""
    h, w = alpha.shape
    region = img[y:y + h, x:x + w].astype(np.float32)
    a = alpha[:region.shape[0], :region.shape[1]].astype(np.float32) / 255.0
    target = np.asarray(fill(region), np.float32)
    img[y:y + h, x:x + w] = np.clip(region * (1 - a) + target * a, 0, 255).round().astype(np.uint8)


def _full(mask: np.ndarray, x: int, y: int, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    h, w = mask.shape
    out[y:y + h, x:x + w] = mask[:shape[0] - y, :shape[1] - x] > 64
    return out


def _bbox(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _draw_marker(img: np.ndarray, rng: np.random.Generator, text: str, x: int, y: int,
                 size: int, icon: str, font_path) -> Box:
    """A laterality/projection marker: plain, or a lead-marker icon (letter in a box/circle)."""
    from PIL import Image, ImageDraw

    font = _font(font_path, size)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    bx = draw.textbbox((x, y), text, font=font)
    pad = size // 4
    frame = (bx[0] - pad, bx[1] - pad, bx[2] + pad, bx[3] + pad)
    if icon == "box":
        draw.rectangle(frame, outline=250, width=max(2, size // 12))
    elif icon == "circle":
        draw.ellipse(frame, outline=250, width=max(2, size // 12))
    draw.text((x, y), text, font=font, fill=250)
    img[:] = np.asarray(pil)
    return tuple(int(v) for v in (frame if icon != "plain" else bx))


def _fill_for(style: str, rng: np.random.Generator):
    """The text value as a function of the background under it (style-specific)."""
    if style in ("bright", "boundary", "multiline", "nonlatin", "rotated", "small"):
        v = float(rng.uniform(235, 255))
        return lambda r: np.full_like(r, v)
    if style == "dark":
        return lambda r: np.full_like(r, float(rng.uniform(0, 15)))
    if style == "boxed":
        return lambda r: np.full_like(r, 10.0)
    if style == "lowcontrast_dark":  # dark grey on a dark region: about 20-35 levels apart
        d = float(rng.uniform(20, 35))
        return lambda r: np.minimum(np.median(r) + d, 255)
    if style == "lowcontrast_bright":  # light grey on a bright region
        d = float(rng.uniform(20, 35))
        return lambda r: np.maximum(np.median(r) - d, 0)
    if style == "gradient":  # one mid value: brighter than the dark end, darker than the bright
        v = float(rng.uniform(110, 150))
        return lambda r: np.full_like(r, v)
    raise ValueError(f"unknown style {style!r}")


def _prepare_region(img: np.ndarray, style: str, rng: np.random.Generator, x: int, y: int,
                    bw: int, bh: int) -> None:
    """Shape the background under the text block as the style needs (in place)."""
    import cv2

    region = img[y:y + bh, x:x + bw]
    rh, rw = region.shape
    if style == "dark" or style == "lowcontrast_bright":  # a bright area (MONOCHROME1-like)
        base = rng.uniform(190, 225)
        region[:] = np.clip(base + rng.normal(0, 3, region.shape), 0, 255)
    elif style == "lowcontrast_dark":
        base = rng.uniform(20, 60)
        region[:] = np.clip(base + rng.normal(0, 3, region.shape), 0, 255)
    elif style == "boundary":  # text runs from dark background onto bright bone
        cut = int(rw * rng.uniform(0.3, 0.6))
        tex = cv2.GaussianBlur(rng.normal(0, 1, (rh, rw - cut)).astype(np.float32), (0, 0), 1.5)
        region[:, :cut] = np.clip(rng.uniform(15, 40) + rng.normal(0, 3, (rh, cut)), 0, 255)
        region[:, cut:] = np.clip(rng.uniform(185, 215) + 10 * tex, 0, 255)
    elif style == "gradient":
        ramp = np.linspace(rng.uniform(0, 40), rng.uniform(215, 255), rw)
        if rng.random() < 0.5:
            ramp = ramp[::-1]
        region[:] = np.clip(ramp[None, :] + rng.normal(0, 3, region.shape), 0, 255)
    elif style == "boxed":
        region[:] = 0
        region[2:-2, 2:-2] = 232
        region[4:-4, 4:-4] = 240


def make_case(i: int, style: str, background: np.ndarray | None = None,
              seed: int = 0, with_header: bool | None = None) -> BurnedCase:
    """Case ``i`` of one style: fake PHI lines and markers drawn on a background.

    Args:
        i: case number (chooses names, corner, font, size, marker).
        style: one of :data:`STYLES`.
        background: an 8-bit radiograph to draw on (a copy is made); synthetic when None.
        seed: base of the random generator (with ``i`` and the style).
        with_header: whether the case carries header values (a DICOM) or none (a bare PNG);
            default alternates with ``i``.
    """
    rng = np.random.default_rng([seed, i, STYLES.index(style)])
    if background is None:
        h, w = (int(rng.integers(280, 360)), int(rng.integers(320, 420))) if style == "small" \
            else (int(rng.integers(700, 1100)), int(rng.integers(700, 1100)))
        img = synthetic_background(rng, h, w)
    else:
        img = background.copy()
        if style == "small":
            from PIL import Image
            s = 360 / max(img.shape)
            img = np.asarray(Image.fromarray(img).resize(
                (max(1, int(img.shape[1] * s)), max(1, int(img.shape[0] * s))), Image.BILINEAR)).copy()
    h, w = img.shape
    font_path = fonts()[i % len(fonts())]
    short = min(h, w)
    size = int(rng.integers(8, 10)) if style == "small" else \
        int(np.clip(short * rng.uniform(0.017, 0.035), 12, 40))
    font = _font(font_path, size)
    lines, header = _phi_lines(rng, style, i)
    alpha, tokens = render_block(lines, font, int(size * 1.45))
    rotate = 0
    if style == "rotated":
        rotate = 1 if i % 2 else -1
        alpha = np.ascontiguousarray(np.rot90(alpha, rotate))
        tokens = [(t, k, np.ascontiguousarray(np.rot90(a, rotate))) for t, k, a in tokens]
    bh, bw = alpha.shape
    if bw + 8 > w or bh + 8 > h:
        raise ValueError(f"text block {bw}x{bh} does not fit a {w}x{h} image")
    margin = max(4, short // 60)
    corner = i % 4
    x = margin if corner in (0, 2) else w - bw - margin
    y = margin if corner in (0, 1) else h - bh - margin
    _prepare_region(img, style, rng, x, y, bw, bh)
    _paste(img, alpha, x, y, _fill_for(style, rng))
    toks = []
    for text, kind, a in tokens:
        mask = _full(a, x, y, img.shape)
        if mask.any():
            toks.append(Token(text, kind, _bbox(mask), mask))
    line_boxes = []
    # markers: the corner diagonally opposite the text block, an icon every other case
    markers = []
    mtext = MARKERS[i % len(MARKERS)]
    msize = int(np.clip(short * 0.05, 14, 60))
    icon = ["plain", "box", "circle"][i % 3]
    mx = w - margin - 3 * msize if corner in (0, 2) else margin + msize // 2
    my = h - margin - 2 * msize if corner in (0, 1) else margin + msize // 2
    markers.append((mtext, _draw_marker(img, rng, mtext, mx, my, msize, icon, font_path)))
    for k in range(len(lines)):  # the line boxes, for coverage checks
        masks = [t.mask for t in toks if t.text in lines[k][0]]
        if masks:
            line_boxes.append(_bbox(np.logical_or.reduce(masks)))
    if with_header is None:
        with_header = i % 2 == 0
    return BurnedCase(f"{style}-{i:03d}", style, img, [t for t, _ in lines], line_boxes, toks,
                      markers, header if with_header else {})


def visible_ink(case: BurnedCase, output: np.ndarray, tok: Token) -> float:
    """Fraction of a token's edge ink that still stands out from the background next to it.

    An ink pixel is visible when it differs from some non-ink neighbour (3x3) by more than a
    third of the token's own contrast in the input. Blanking makes a region uniform (whatever
    the fill value, even one equal to the ink's), so blanked ink is not visible.
    """
    import cv2

    x0, y0, x1, y1 = tok.box
    pad = 3
    x0, y0 = max(x0 - pad, 0), max(y0 - pad, 0)
    x1, y1 = min(x1 + pad, output.shape[1]), min(y1 + pad, output.shape[0])
    ink = tok.mask[y0:y1, x0:x1]
    kernel = np.ones((3, 3), np.uint8)
    edge = ink & cv2.dilate((~ink).astype(np.uint8), kernel).astype(bool)
    if not edge.any():
        return 0.0

    def contrast(img: np.ndarray) -> np.ndarray:
        a = img[y0:y1, x0:x1].astype(np.float32)
        hi = cv2.dilate(np.where(ink, -1e9, a).astype(np.float32), kernel)
        lo = cv2.erode(np.where(ink, 1e9, a).astype(np.float32), kernel)
        return np.maximum(np.where(hi > -1e8, np.abs(a - hi), 0),
                          np.where(lo < 1e8, np.abs(a - lo), 0))

    before = contrast(case.image)[edge]
    after = contrast(output)[edge]
    threshold = max(4.0, float(np.median(before)) / 3)
    return float((after > threshold).mean())


def exposed_tokens(case: BurnedCase, output: np.ndarray, max_visible: float = 0.15
                   ) -> list[Token]:
    """Tokens with more than ``max_visible`` of their edge ink still visible in ``output``
    (:func:`visible_ink`): an OCR-free judge, exact because the ink was drawn here."""
    return [t for t in case.tokens if visible_ink(case, output, t) > max_visible]


def case_for(style: str, i: int, backgrounds: list[np.ndarray] = (), seed: int = 0
             ) -> BurnedCase:
    """Case ``i`` of ``style``: odd cases on a real background (cycled) when some are given."""
    bg = None
    if backgrounds and i % 2:
        bg = backgrounds[(i // 2 + STYLES.index(style)) % len(backgrounds)]
    return make_case(i, style, bg, seed)


def corpus(n_per_style: int, backgrounds: list[np.ndarray] = (), seed: int = 0,
           styles: tuple[str, ...] = STYLES):
    """Yield ``n_per_style`` cases of every style (see :func:`case_for`)."""
    for style in styles:
        for i in range(n_per_style):
            yield case_for(style, i, backgrounds, seed)
