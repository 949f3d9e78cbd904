"""Glue between :class:`~fracture_ops.deid.config.PixelConfig` and the scrubbing core.

Engines are built once per process (ONNX sessions take ~0.3 s to load) and reused for every file
that process handles. :func:`scrub_array` scrubs a (frames, rows, cols[, samples]) array in place
and raises :class:`PixelTextRemains` when the verification read still finds text.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from fracture_ops.errors import FileRejected
from fracture_ops.deid.ocr import EngineUnavailable, TextEngine, get_engine
from fracture_ops.deid.phi_text import phi_tokens_from_values
from fracture_ops.deid.labels import label_key
from fracture_ops.deid.pixels import ScrubOptions, ScrubResult, scrub_frames

log = logging.getLogger("fracture_ops.deid")
_CACHE: dict[tuple, tuple[TextEngine, list[TextEngine], list[str]]] = {}


class PixelTextRemains(FileRejected):
    """Burned-in text is still found after the last scrub round; the file must not be released."""

    def __init__(self, message: str, result: ScrubResult):
        super().__init__(message)
        self.result = result


def _engine_options(name: str, pixcfg) -> dict:
    if name == "rapidocr":
        return {"target_side": pixcfg.target_side, "threads": pixcfg.threads}
    if name == "tesseract":  # it reads a mosaic of border bands at their own resolution, in a
        # rendering whose ink is always dark on white (strokes.z_view): no inverted second read
        return {"threads": pixcfg.threads, "max_side": 2400, "invert_lines": False}
    return {}


def engines_for(pixcfg) -> tuple[TextEngine, list[TextEngine], list[str]]:
    """(detector, verifiers that could be built, notes on those that could not).

    Raises:
        EngineUnavailable: the detector is missing, or a verifier is and ``require_verifiers``.
    """
    key = (pixcfg.engine, tuple(pixcfg.verifiers), pixcfg.target_side, pixcfg.threads,
           pixcfg.require_verifiers)
    if key not in _CACHE:
        engine = get_engine(pixcfg.engine, **_engine_options(pixcfg.engine, pixcfg))
        verifiers, notes = [], []
        for name in pixcfg.verifiers:
            try:
                verifiers.append(get_engine(name, **_engine_options(name, pixcfg)))
            except EngineUnavailable as exc:
                if pixcfg.require_verifiers:
                    raise
                notes.append(f"verifier {name} not used: {exc}")
                log.warning("deidentify: verifier %s not available: %s", name, exc)
        _CACHE[key] = (engine, verifiers, notes)
    return _CACHE[key]


def options_for(pixcfg) -> ScrubOptions:
    return ScrubOptions(policy=pixcfg.policy,
                        keep_tokens=frozenset(t.strip().upper() for t in pixcfg.keep_tokens),
                        keep_labels=frozenset(label_key(t) for t in pixcfg.keep_labels),
                        label_words=frozenset(w.upper() for t in pixcfg.keep_labels
                                              for w in re.split(r"\W+", t) if w),
                        pad_fraction=pixcfg.pad_fraction, rounds=pixcfg.rounds,
                        min_score=pixcfg.min_score)


def scrub_array(frames: np.ndarray, pixcfg, phi: dict[str, list[str]],
                fill=None) -> ScrubResult:
    """Scrub burned-in text from every frame in place.

    Args:
        frames: (frames, rows, cols) or (frames, rows, cols, samples) stored values.
        pixcfg: the :class:`~fracture_ops.deid.config.PixelConfig`.
        phi: header values by kind (``names``, ``ids``, ``dates``, ``texts``) to hunt for.
        fill: the value blanked pixels take (default: the minimum over all frames, the value the
            DICOM writer uses too, so the verified pixels are the written ones).

    Raises:
        PixelTextRemains: text is still found after the last round (nothing may be released).
    """
    engine, verifiers, _ = engines_for(pixcfg)
    tokens = phi_tokens_from_values(**{k: phi.get(k, []) for k in ("names", "ids", "dates",
                                                                    "texts")})
    fill = frames.min() if fill is None else fill
    result = scrub_frames(frames, engine, verifiers, options_for(pixcfg), tokens, fill)
    if not result.passed:
        left = sum(len(f.residual) for f in result.frames)
        raise PixelTextRemains(f"burned-in text remains after scrubbing: {left} region(s) still "
                               f"read as text after {pixcfg.rounds + 1} round(s)", result)
    return result


def scrub_report(result: ScrubResult, pixcfg) -> dict:
    """The PHI-free audit entry of one file: boxes, counts, policy and engines with versions."""
    return {"policy": pixcfg.policy, "engines": result.engines, "regions": result.regions,
            "passed": result.passed, "kept_markers": sum(len(f.kept) for f in result.frames),
            "phi_hits": sum(f.phi_hits for f in result.frames),
            "blanked_fraction": round(result.blanked_fraction, 5),
            "boxes": [[list(b) for b in f.blanked] for f in result.frames],
            "held": result.held, "unread_blanked": sum(f.unread_blanked for f in result.frames),
            "ignored": sum(f.ignored for f in result.frames),
            "held_boxes": [[list(b) for b in f.held] for f in result.frames]}
