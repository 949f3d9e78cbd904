"""Offline text engines behind one small interface, for finding burned-in text in radiographs.

An engine takes an 8-bit greyscale image (rows, cols) and offers:

- ``locate(gray) -> list[Box]``: axis-aligned boxes ``(x0, y0, x1, y1)`` (x1/y1 exclusive) of text
  lines, in the image's own pixel coordinates;
- ``read(gray, boxes) -> list[(text, score)]``: what each box says;
- ``detect(gray) -> list[TextBox]``: both at once (the interface a site implements to plug in its
  own engine: see :func:`get_engine`).

Two engines ship, both with their models inside a registry package, so nothing is downloaded at
run time:

- ``rapidocr``: PP-OCRv4 detection (DB, Liao et al. 2020) and recognition (SVTR-LCNet CRNN) ONNX
  models carried by the ``rapidocr-onnxruntime`` wheel. Detection runs on a copy scaled so that
  text lands in the size range the model was trained on (``target_side``), in both polarities
  (burned-in text is white on dark or dark on bright), and boxes are mapped back.
- ``tesseract``: Debian's ``tesseract-ocr`` through ``pytesseract`` (an independent second read:
  an LSTM recogniser with its own layout analysis). It reads clean text well and noisy radiograph
  texture poorly, so it serves as a verifier that looks for known PHI values.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

Box = tuple[int, int, int, int]


_TESS_ENV_LOCK = threading.Lock()


class TextBox(NamedTuple):
    """One text region: its box, what it says (None: not read) and the engine's confidence."""

    box: Box
    text: str | None
    score: float


class TextEngine(Protocol):
    """What the scrubber needs from an OCR engine."""

    name: str
    version: str

    def locate(self, gray: np.ndarray) -> list[Box]: ...

    def read(self, gray: np.ndarray, boxes: list[Box]) -> list[tuple[str, float]]: ...

    def detect(self, gray: np.ndarray) -> list[TextBox]: ...


class EngineUnavailable(RuntimeError):
    """The engine's package or binary is not installed; the message says how to install it."""


def _clip(box, shape) -> Box | None:
    h, w = shape[:2]
    x0, y0, x1, y1 = (int(np.floor(box[0])), int(np.floor(box[1])),
                      int(np.ceil(box[2])), int(np.ceil(box[3])))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _resize(gray: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    if scale == 1.0:
        return gray
    h, w = gray.shape
    size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def _pad(img: np.ndarray, pad: int) -> np.ndarray:
    """``img`` framed by ``pad`` pixels of the median of its outermost rows and columns."""
    import cv2

    if pad <= 0:
        return img
    edge = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                              value=int(np.median(edge)))


def _with_arena(wrapper, model_path: str, threads: int) -> None:
    """Rebuild a rapidocr session with ONNX Runtime's CPU memory arena on.

    rapidocr turns the arena off, so every call allocates its activation buffers afresh; with
    it on, a detection pass on a 2-3 megapixel radiograph's copy takes about three quarters of
    the time (measured: 0.23 s -> 0.17 s, one thread). Same model, options and threads.
    """
    import onnxruntime as ort

    old = wrapper.session
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = max(int(threads), 1)
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = True
    wrapper.session = ort.InferenceSession(str(model_path), sess_options=opts,
                                           providers=old.get_providers())


def _detect_gray(det, gray: np.ndarray):
    """rapidocr's ``TextDetector.__call__`` on a greyscale image, without making it three
    channels first: the same resize (sides rounded to multiples of 32, bilinear) and the same
    normalisation, done through a 256-entry table per channel (rapidocr computes it in float64
    over every pixel of three identical channels: a sixth of the detection's own time on a
    radiograph's copy). The network's input is bit-identical; so are the boxes."""
    h, w = gray.shape[:2]
    pre = det.get_preprocess(max(h, w))
    resized = pre.resize(gray)
    if resized is None:
        return None
    levels = np.arange(256, dtype=np.float32) * pre.scale  # float32, as rapidocr's first step
    table = ((levels[None, :] - np.asarray(pre.mean)[:, None])
             / np.asarray(pre.std)[:, None]).astype(np.float32)
    import cv2

    x = np.empty((1, 3, *resized.shape), np.float32)
    for c in range(3):
        x[0, c] = cv2.LUT(resized, table[c])
    preds = det.infer(x)[0]
    quads, _ = det.postprocess_op(preds, (h, w))
    return det.filter_tag_det_res(quads, (h, w))


@dataclass
class RapidOcrEngine:
    """PP-OCRv4 through ``rapidocr-onnxruntime`` (models in the wheel; no network).

    Args:
        target_side: detection runs on a copy whose shorter side is this many pixels (text of a
            2-3 megapixel radiograph shrinks, that of a small image grows into range).
        max_side: cap on the longer side of the detection copy (bounds time and memory).
        max_upscale: small images are enlarged at most this much (a thumbnail's text, if any,
            is already large relative to the image).
        both_polarities: also detect on the inverted image.
        threads: ONNX Runtime intra-op threads (1 when a process pool runs files in parallel).
        box_thresh / unclip_ratio: DB post-processing; lower/larger finds fainter text and
            draws looser boxes.
        edge_pad: pixels of the frame's edge value added around the detection copy (a line
            the film's edge cuts through is found like any other; boxes are clipped back).
    """

    target_side: int = 800
    max_side: int = 1600
    max_upscale: float = 2.5
    both_polarities: bool = True
    threads: int = 1
    box_thresh: float = 0.3
    thresh: float = 0.2
    unclip_ratio: float = 1.6
    rec_batch: int = 16
    edge_pad: int = 16
    name: str = "rapidocr"

    def __post_init__(self) -> None:
        try:
            import rapidocr_onnxruntime  # noqa: F401 - fail here, not at the first image
            from importlib.metadata import version
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EngineUnavailable("rapidocr engine needs `pip install rapidocr-onnxruntime` "
                                    "(a dependency of fracture-ops)") from exc
        self.version = version("rapidocr-onnxruntime")
        self._lock = threading.Lock()
        self._det = self._rec = None

    def _models(self):
        with self._lock:
            if self._det is None:
                from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
                from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer
                from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH, read_yaml, update_model_path

                cfg = update_model_path(read_yaml(DEFAULT_CFG_PATH))
                threads = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
                # limit_type "min" with a tiny limit: the detector keeps the size we give it
                det = dict(cfg["Det"], **threads, limit_type="min", limit_side_len=32,
                           thresh=self.thresh, box_thresh=self.box_thresh,
                           unclip_ratio=self.unclip_ratio)
                self._det = TextDetector(det)
                self._rec = TextRecognizer(dict(cfg["Rec"], **threads,
                                                rec_batch_num=self.rec_batch))
                _with_arena(self._det.infer, det["model_path"], self.threads)
                _with_arena(self._rec.session, cfg["Rec"]["model_path"], self.threads)
        return self._det, self._rec

    def scale_for(self, shape) -> float:
        """The detection scale for an image of this shape."""
        h, w = shape[:2]
        scale = min(self.target_side / max(min(h, w), 1), self.max_upscale)
        return min(scale, self.max_side / max(h, w, 1))

    def locate(self, gray: np.ndarray, scale: float | None = None,
               polarity: str | None = None) -> list[Box]:
        """Text-line boxes; ``scale`` multiplies :meth:`scale_for`, ``polarity`` is ``pos``
        (as stored), ``neg`` (inverted) or ``both`` (default: ``both_polarities``)."""
        det, _ = self._models()
        scale = self.scale_for(gray.shape) * (1.0 if scale is None else scale)
        small = _pad(_resize(gray, scale), self.edge_pad)
        polarity = polarity or ("both" if self.both_polarities else "pos")
        passes = {"pos": [small], "neg": [255 - small], "both": [small, 255 - small]}[polarity]
        boxes = []
        for img in passes:
            quads = _detect_gray(det, img)
            for quad in quads if quads is not None else []:
                q = (np.asarray(quad, dtype=np.float64) - self.edge_pad) / scale
                box = _clip((*q.min(axis=0), *q.max(axis=0)), gray.shape)
                if box is not None:
                    boxes.append(box)
        return boxes

    def read(self, gray: np.ndarray, boxes: list[Box]) -> list[tuple[str, float]]:
        if not boxes:
            return []
        _, rec = self._models()
        crops = []
        for x0, y0, x1, y1 in boxes:
            crop = gray[y0:y1, x0:x1]
            if crop.shape[0] < 32:  # the recogniser's input height is 48: give it room
                crop = _resize(crop, 32 / max(crop.shape[0], 1))
            crops.append(np.ascontiguousarray(np.stack([crop] * 3, axis=-1)))
        results, _ = rec(crops)
        return [(str(r[0]), float(r[1])) for r in results]

    def detect(self, gray: np.ndarray) -> list[TextBox]:
        boxes = self.locate(gray)
        return [TextBox(b, t, s) for b, (t, s) in zip(boxes, self.read(gray, boxes))]


@dataclass
class TesseractEngine:
    """Debian's Tesseract through ``pytesseract`` (``apt-get install tesseract-ocr``).

    (A build kept loaded in the process through ``tesserocr`` was tried: 3x faster per read,
    but its bundled libtesseract 5.5.4 read 553 of 656 side-band identifiers at 16 px where
    Debian's 5.3.0 program read 585: the verification read stays with the program.)

    Args:
        min_conf: words below this confidence (0-100) are ignored.
        psm: page segmentation mode; 11 (sparse text) suits annotations scattered on an image.
        max_side: larger images are read from a copy shrunk to this longer side (Tesseract's
            time grows with pixels; annotation text stays legible), boxes mapped back.
        threads: OpenMP threads of the tesseract process (1 when a process pool runs files).
        invert_lines: let Tesseract also read each doubtful line inverted (its default); off for
            a rendering whose ink is always dark on white (the scrub's verification read), where
            that second read finds nothing and takes a third of the time.
    """

    min_conf: float = 40.0
    psm: int = 11
    max_side: int = 800
    threads: int = 1
    invert_lines: bool = True
    name: str = "tesseract"

    def __post_init__(self) -> None:
        try:
            import pytesseract
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EngineUnavailable("tesseract engine needs `pip install pytesseract`") from exc
        if shutil.which("tesseract") is None:
            raise EngineUnavailable("tesseract engine needs the tesseract binary: "
                                    "apt-get install tesseract-ocr tesseract-ocr-eng")
        self._tess = pytesseract
        self.version = str(pytesseract.get_tesseract_version())

    def _words(self, gray: np.ndarray, psm: int) -> list[TextBox]:
        import os
        import tempfile

        from PIL import Image

        scale = min(1.0, self.max_side / max(gray.shape[:2]))
        small = _resize(gray, scale)
        with _TESS_ENV_LOCK, tempfile.TemporaryDirectory(prefix="fo-tess-") as tmp:
            # the thread limit is for the tesseract child process only; the image goes to it as
            # an uncompressed PGM (pytesseract's own PNG encoding took as long as the read)
            path = os.path.join(tmp, "frame.pgm")
            Image.fromarray(small).save(path, format="PPM")
            before = os.environ.get("OMP_THREAD_LIMIT")
            os.environ["OMP_THREAD_LIMIT"] = str(self.threads)
            try:
                config = f"--psm {psm}" + ("" if self.invert_lines else
                                           " -c tessedit_do_invert=0")
                data = self._tess.image_to_data(path, config=config,
                                                output_type=self._tess.Output.DICT)
            finally:
                if before is None:
                    os.environ.pop("OMP_THREAD_LIMIT", None)
                else:
                    os.environ["OMP_THREAD_LIMIT"] = before
        return self._boxes([(text, float(data["conf"][i]),
                             tuple(int(data[k][i]) for k in ("left", "top", "width", "height")))
                            for i, text in enumerate(data["text"])], scale, gray.shape)

    def _boxes(self, words, scale: float, shape) -> list[TextBox]:
        """Words at or above ``min_conf``, their boxes mapped back to the frame."""
        out = []
        for text, conf, (x, y, w, h) in words:
            if text.strip() and conf >= self.min_conf:
                box = _clip((x / scale, y / scale, (x + w) / scale, (y + h) / scale), shape)
                if box is not None:
                    out.append(TextBox(box, text.strip(), conf / 100.0))
        return out

    def locate(self, gray: np.ndarray) -> list[Box]:
        return [t.box for t in self._words(gray, self.psm)]

    def read(self, gray: np.ndarray, boxes: list[Box]) -> list[tuple[str, float]]:
        out = []
        for x0, y0, x1, y1 in boxes:
            words = self._words(np.ascontiguousarray(gray[y0:y1, x0:x1]), 7)
            out.append((" ".join(w.text for w in words),
                        min((w.score for w in words), default=0.0)))
        return out

    def detect(self, gray: np.ndarray) -> list[TextBox]:
        return self._words(gray, self.psm)


_ENGINES = {"rapidocr": RapidOcrEngine, "tesseract": TesseractEngine}


def get_engine(name: str, **options) -> TextEngine:
    """An engine by name (``rapidocr``, ``tesseract``) or ``package.module:Class`` of a site's own.

    Raises:
        EngineUnavailable: its package or binary is missing.
        ValueError: unknown name.
    """
    if name in _ENGINES:
        return _ENGINES[name](**options)
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)(**options)
    raise ValueError(f"unknown OCR engine {name!r}: use rapidocr, tesseract or module:Class")


def engine_available(name: str) -> bool:
    """True when :func:`get_engine` can build this engine here."""
    try:
        get_engine(name)
    except EngineUnavailable:
        return False
    return True
