"""Image checks of the ``validate`` step: decode, size, bit depth, blank, cross-patient duplicates.

The policies (what counts as bad, which duplicate copy is kept) are described once, in
:mod:`fracture_ops.data.validation`; this module implements them so validation stays small.
Rows are keyed by their position in the manifest DataFrame.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import pandas as pd

from fracture_ops.data import images
from fracture_ops.errors import ImageDecodeError



class ImageCheckSettings(Protocol):
    """The fields of the validate step's config that the image checks read (the config itself
    lives with the step, which imports this module)."""

    workers: int
    cross_patient_duplicates: str
    max_truncated_fraction: float
    min_image_size: int
    max_image_size: int
    allowed_bit_depths: list[int]
    blank_std_threshold: float


@dataclass
class RowFailures:
    """Failures found per row (keys are positions in the validated DataFrame)."""

    reasons: dict[int, list[str]] = field(default_factory=dict)
    details: dict[int, list[str]] = field(default_factory=dict)

    def add(self, row: int, reason: str, detail: str = "") -> None:
        """Record ``reason`` (once) and an optional ``detail`` for ``row``."""
        if reason not in self.reasons.setdefault(row, []):
            self.reasons[row].append(reason)
        if detail:
            self.details.setdefault(row, []).append(detail)

    def merge(self, other: RowFailures) -> RowFailures:
        """Add all of ``other``'s failures to this one; returns self."""
        for row, reasons in other.reasons.items():
            for reason in reasons:
                self.add(row, reason)
            self.details.setdefault(row, []).extend(other.details.get(row, []))
        return self


@dataclass
class ImageResult:
    """Outcome of the image checks."""

    failures: RowFailures
    hashes: dict[int, str]
    warnings: dict[int, list[str]]
    facts: pd.DataFrame  # image_id, format, width, height, bit_depth, photometric, pixel_hash


def _check_one(uri: str, cfg: ImageCheckSettings) -> dict:
    """Decode one image and judge it; never raises for bad input."""
    out: dict = {"reasons": [], "details": [], "warnings": [], "hash": None, "meta": None}
    try:
        img, meta = images.read_image(uri, max_missing_fraction=cfg.max_truncated_fraction)
    except ImageDecodeError as exc:
        reason = ("missing_file" if exc.cause == images.CAUSE_NOT_FOUND else
                  "truncated_image" if exc.cause.startswith(images.CAUSE_TRUNCATED) else
                  "decode_error")
        out["reasons"].append(reason)
        out["details"].append(exc.cause)
        return out
    except Exception as exc:
        # A decoder bug on one odd file must not stop the run (it is quarantined and counted
        # against the budget); storage/network errors may heal on retry, so they propagate.
        if type(exc).__module__.split(".")[0] in ("botocore", "boto3", "urllib3"):
            raise
        out["reasons"].append("decode_error")
        out["details"].append(f"unexpected {type(exc).__name__}: {exc}")
        return out
    out["meta"], out["warnings"] = meta, list(meta.warnings)
    small = min(meta.width, meta.height)
    if small < cfg.min_image_size:
        out["reasons"].append("image_too_small")
        out["details"].append(f"{meta.width}x{meta.height} px < {cfg.min_image_size}")
    if max(meta.width, meta.height) > cfg.max_image_size:
        out["reasons"].append("image_too_large")
        out["details"].append(f"{meta.width}x{meta.height} px > {cfg.max_image_size}")
    if meta.bit_depth not in cfg.allowed_bit_depths:
        out["reasons"].append("bad_bit_depth")
        out["details"].append(f"bit depth {meta.bit_depth}")
    std = float(img.std())
    if std < cfg.blank_std_threshold:
        out["reasons"].append("blank_image")
        out["details"].append(f"pixel std {std:.2g} < {cfg.blank_std_threshold:g}")
    digest = hashlib.sha256(f"{img.shape}".encode())
    digest.update(images.to_uint8(img).tobytes())
    out["hash"] = digest.hexdigest()[:32]
    return out


def check_images(df: pd.DataFrame, cfg: ImageCheckSettings,
                 already_bad: frozenset[int] | set[int] = frozenset(),
                 skip: frozenset[int] | set[int] = frozenset()) -> ImageResult:
    """Decode every image of a manifest (thread pool) and check it.

    Args:
        df: manifest; rows are keyed by position.
        cfg: the step config (bounds, workers, duplicate policy).
        already_bad: rows failing other checks; never chosen as the kept copy of a duplicate.
        skip: rows whose files must not be opened at all (outside the data roots).

    Returns:
        :class:`ImageResult` with per-row failures, pixel hashes, warnings and image facts.
    """
    from fracture_ops.cli_common import progress

    data = df.reset_index(drop=True)
    rows = [i for i, uri in enumerate(data["image_uri"])
            if isinstance(uri, str) and uri and i not in skip]
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        results = list(progress(pool.map(lambda i: _check_one(data.at[i, "image_uri"], cfg), rows),
                                desc="validate images", total=len(rows)))
    failures, hashes, warns, facts = RowFailures(), {}, {}, []
    for i, res in zip(rows, results):
        for reason, detail in zip(res["reasons"], res["details"]):
            failures.add(i, reason, detail)
        if res["warnings"]:
            warns[i] = res["warnings"]
        if res["hash"]:
            hashes[i] = res["hash"]
        m = res["meta"]
        facts.append({"image_id": data.at[i, "image_id"], "format": m.format if m else None,
                      "width": m.width if m else None, "height": m.height if m else None,
                      "bit_depth": m.bit_depth if m else None,
                      "photometric": m.photometric if m else None, "pixel_hash": res["hash"],
                      "warnings": "; ".join(res["warnings"])})
    bad = set(already_bad) | set(failures.reasons)
    failures.merge(_cross_patient_duplicates(data, hashes, bad, cfg.cross_patient_duplicates))
    return ImageResult(failures, hashes, warns, pd.DataFrame(facts))


def _cross_patient_duplicates(data: pd.DataFrame, hashes: dict[int, str], bad: set[int],
                              policy: str) -> RowFailures:
    """Flag copies of one image filed under different patients (see the module docstring)."""
    failures = RowFailures()
    groups: dict[str, list[int]] = {}
    for i, h in hashes.items():
        groups.setdefault(h, []).append(i)
    for members in groups.values():
        patients = {data.at[i, "patient_id"] for i in members if pd.notna(data.at[i, "patient_id"])}
        if len(members) < 2 or len(patients) < 2:
            continue
        members = sorted(members, key=lambda i: str(data.at[i, "image_id"]))
        labels = {data.at[i, "label"] for i in members}
        keep = None
        if policy == "keep_first" and len(labels) == 1:
            keep = next((i for i in members if i not in bad), None)
        ids = ", ".join(str(data.at[i, "image_id"]) for i in members)
        for i in members:
            if i != keep:
                failures.add(i, "duplicate_across_patients",
                             f"same pixels in {len(patients)} patients (image ids: {ids})")
    return failures
