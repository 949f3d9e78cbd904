"""The knobs of the pixel scrub, shared by its modules (built from ``PixelConfig``)."""

from __future__ import annotations

from dataclasses import dataclass


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
    # the window rendering's polarities for detection: "both" (text drawn white or black is dark
    # on light in one of them); "neg" or "pos" save one detection pass (~0.2 s of a 2.7 MP film)
    # but lose coverage: measured on the real DICOMs (an institution line 54 % covered with one
    # polarity chosen per film) and on kept field labels
    window_polarity: str = "both"
    verify_patterns: bool = True  # identifier-like words in the verification read fail closed
