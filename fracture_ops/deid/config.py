"""Config of the ``deidentify`` step, and its secret.

One source for every de-identification parameter: :class:`DeidConfig` (YAML section
``deidentify``), with the pixel scrubbing knobs in :class:`PixelConfig` (``deidentify.pixels``).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.deid.profile import DeidKeys
from fracture_ops.errors import ConfigError
from fracture_ops import envvars

log = logging.getLogger("fracture_ops.deid")

STEP = "deidentify"
SECRET_ENV = envvars.DEID_SECRET
_DEV_SECRET = b"fracture-ops-dev-secret-NOT-FOR-REAL-DATA"
MIN_SECRET_BYTES = 32  # a 256-bit HMAC key
IMPLEMENTATION_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'fracture-ops/deidentify').int}"
IMPLEMENTATION_VERSION = "FRACTUREOPS_0_1"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
CANDIDATE_SUFFIXES = DICOM_SUFFIXES + (".png", ".jpg", ".jpeg")
# radiographic markers that carry no identity (laterality, projection, position)
DEFAULT_KEEP_TOKENS = ["L", "R", "LT", "RT", "AP", "PA", "LAT", "LATERAL", "OBL", "SUPINE",
                       "ERECT", "UPRIGHT", "PRONE", "STANDING", "WB"]
# Field labels printed before burned-in values ("Patient ID: ..."): the label is kept, the value
# after its colon is blanked (read and matched whole, case and spacing ignored)
DEFAULT_KEEP_LABELS = ["Institution Name", "Institution", "Hospital", "Study Date", "Study Time",
                       "Series Date", "Acquisition Date", "Patient ID", "Patient Name", "Name",
                       "ID", "MRN", "Age", "Sex", "DOB", "Date of Birth", "Birth Date",
                       "Accession", "Accession No", "Accession Number", "Physician",
                       "Referring Physician", "Operator", "Technologist", "Exam", "Study"]


def _same_text(want: str | None, got: str) -> bool:
    return want is None or want.strip().lower() == got.strip().lower()


class BlankRegion(BaseModel):
    """A rectangle to blank, in pixel coordinates ``(x0, y0, x1, y1)``, x1/y1 exclusive.

    The optional conditions (all that are set must match) limit it to one kind of source.
    """

    model_config = ConfigDict(extra="forbid")

    box: tuple[int, int, int, int]
    modality: str | None = None
    manufacturer: str | None = None
    rows: int | None = None
    columns: int | None = None

    @model_validator(mode="after")
    def _check_box(self) -> BlankRegion:
        x0, y0, x1, y1 = self.box
        if min(x0, y0) < 0 or x1 <= x0 or y1 <= y0:
            raise ValueError("box must be (x0, y0, x1, y1) with 0 <= x0 < x1 and 0 <= y0 < y1")
        return self

    def matches(self, modality: str, manufacturer: str, rows: int, columns: int) -> bool:
        """True when every condition that is set holds (text compared case-insensitively)."""
        return (_same_text(self.modality, modality) and _same_text(self.manufacturer, manufacturer)
                and self.rows in (None, rows) and self.columns in (None, columns))


class SafePrivateTag(BaseModel):
    """A private element to keep (Retain Safe Private Option): creator, group, element byte."""

    model_config = ConfigDict(extra="forbid")

    creator: str
    group: int = Field(ge=0x0009, le=0xFFFF)
    element: int = Field(ge=0x00, le=0xFF,
                         description="low byte of the element, the EE in (gggg,xxEE)")

    @model_validator(mode="after")
    def _check_odd(self) -> SafePrivateTag:
        if self.group % 2 == 0:
            raise ValueError("private groups are odd")
        return self


class PixelConfig(BaseModel):
    """Burned-in text scrubbing (YAML ``deidentify.pixels``; see :mod:`fracture_ops.deid.pixels`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="find, blank and verify burned-in text in pixels")
    policy: Literal["default", "blank-unread", "all-text"] = Field(
        "default", description="default: blank text read as text, matching a header value, or "
        "letter-like in the border band (keep-list markers kept); hold the file for review when "
        "a letter-like region inside the body reads as nothing; blank-unread: blank such "
        "regions too, holding nothing; all-text: blank every text region")
    keep_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_TOKENS),
                                   description="markers kept under the default policy")
    keep_labels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_KEEP_LABELS),
        description="field labels kept before a colon under the default policy (the value "
        "after the colon is blanked); [] blanks whole lines")
    pad_fraction: float = Field(0.1, ge=0.0, le=2.0,
                                description="padding above/below a region, as a fraction of "
                                "its height (twice that left/right)")
    engine: str = Field("rapidocr", description="text detector: rapidocr, tesseract or "
                        "module:Class of a site's own engine")
    verifiers: list[str] = Field(default_factory=lambda: ["tesseract"],
                                 description="second engines that re-read the output for header "
                                 "values (skipped with a note where not installed)")
    require_verifiers: bool = Field(False, description="fail when a verifier is not installed")
    target_side: int = Field(800, ge=256, le=4096,
                             description="detection runs on a copy with this shorter side")
    rounds: int = Field(2, ge=0, le=5, description="extra blank+verify rounds for text the "
                        "verification read still finds")
    min_score: float = Field(0.5, ge=0.0, le=1.0,
                             description="recognition confidence that counts as text")
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime threads per worker")


class DeidConfig(StepConfig):
    """Config of the ``deidentify`` step (YAML section ``deidentify``)."""

    @field_validator("keep_unknown_tags")
    @classmethod
    def _check_tags(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag) or int(tag[:4], 16) % 2:
                raise ValueError(f"{tag!r}: give a public tag as 8 hex digits GGGGEEEE "
                                 "(even group; private tags go in safe_private_tags)")
        return tags

    section: ClassVar[str] = "deidentify"

    manifest_uri: str = Field("", description="manifest mode: canonical manifest (Parquet)")
    boxes_uri: str = Field("", description="box table; default: boxes.parquet beside the manifest")
    allow_dev_secret: bool = Field(False, description="demos/tests only: use a built-in secret "
                                   f"when ${SECRET_ENV} is unset (logs a warning)")
    shift_dates: bool = Field(True, description="shift DA/DT by a per-patient offset (else remove)")
    max_shift_days: int = Field(3650, ge=1, le=36500)
    retain_patient_characteristics: bool = Field(False, description="keep sex, age, size, weight")
    safe_private_tags: list[SafePrivateTag] = Field(default_factory=list)
    keep_unknown_tags: list[str] = Field(
        default_factory=list, description="public tags outside the DICOM dictionary to keep, as "
        "8 hex digits GGGGEEEE (others are removed: the profile cannot judge them)")
    blank_regions: list[BlankRegion] = Field(default_factory=list)
    pixels: PixelConfig = Field(default_factory=PixelConfig)
    data_roots: list[str] = Field(
        default_factory=storage.data_roots,
        description="manifest mode: image_uri must resolve under one of these (default "
        "$FRACTURE_OPS_DATA_ROOTS; empty: any local path or s3:// URI without '..'); others are "
        "quarantined unread")
    workers: int = Field(0, ge=0, le=256,
                         description="processes across files (0: one per usable CPU, at most 8)")
    watch_modalities: list[str] = Field(
        default_factory=lambda: ["US", "SC", "OT", "XA", "RF", "ES", "XC"],
        description="modalities whose files are flagged for possible burned-in text")
    watch_manufacturers: list[str] = Field(default_factory=list)
    keep_columns: list[str] = Field(
        default_factory=list, description="extra manifest columns to keep (others are dropped)")
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)


def load_keys(cfg: DeidConfig) -> DeidKeys:
    """Build the keyed functions from ``$FRACTURE_OPS_DEID_SECRET``.

    Raises:
        ConfigError: the variable is unset and ``allow_dev_secret`` is false, or it holds fewer
            than ``MIN_SECRET_BYTES`` bytes.
    """
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        if not cfg.allow_dev_secret:
            raise ConfigError(f"{SECRET_ENV} is not set: de-identification needs a secret key "
                              "(e.g. from a Kubernetes Secret); allow_dev_secret is for demos")
        log.warning("%s is unset: using the built-in DEV secret; pseudonyms are NOT protected",
                    SECRET_ENV)
        return DeidKeys(_DEV_SECRET, cfg.max_shift_days)
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{SECRET_ENV} is {len(secret.encode())} bytes; de-identification needs at least "
            f"{MIN_SECRET_BYTES} (a short key can be guessed and every pseudonym reversed). "
            "Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return DeidKeys(secret.encode(), cfg.max_shift_days)
