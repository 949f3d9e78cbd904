"""De-identification step: DICOM PS3.15 Annex E Basic Profile, in folder mode and manifest mode.

- Folder mode (``fracture-ops deidentify INPUT OUTPUT``, :func:`deidentify_folder`): every DICOM
  under INPUT is de-identified into ``OUTPUT/dicom/<patient pseudonym>/<new SOP UID>.dcm``;
  PNG/JPEG files lose their metadata into ``OUTPUT/images/<path hash>.<ext>``; ``report.json``
  and ``audit.jsonl`` go beside them.
- Manifest mode (``--manifest URI``, :func:`deidentify_manifest_step`): every row of a canonical
  manifest is de-identified into ``<run>/deidentify/images/<image pseudonym>.<ext>`` and the
  manifest's ``image_id``/``patient_id``/``study_id`` are replaced by the same keyed functions
  used inside the DICOM, so splits by patient still work and the manifest agrees with the files.

The attribute actions live in :mod:`fracture_ops.data.deid_profile` (the pure core). Here:
the config, the secret, burned-in annotation flags and region blanking, lossless metadata
stripping of PNG/JPEG, file I/O, reports and the CLI. Names of output files, reports and the audit
log never carry PHI: inputs are named by a keyed hash of their path. Files that cannot be read
are listed with a reason and never copied (their content could leak). Pixel data is copied
byte for byte unless a configured region is blanked.

Burned-in text: a file is flagged (not blocked) when Burned In Annotation (0028,0301) is absent or
YES, or its Modality/Manufacturer is on a watch list. A header saying NO is trusted; sources known
to lie (e.g. the TCIA pseudo-PHI DX files from "Philips Medical Systems") need the watch list.
Pixel text detection is not implemented.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.data.deid_profile import (
    DeidKeys,
    ProfileOptions,
    ProfileResult,
    apply_profile,
    method_codes,
)
from fracture_ops.data.deid_images import (  # noqa: F401  (re-exported: public API)
    PNG_SIGNATURE,
    FileRejected,
    strip_image_metadata,
    strip_jpeg,
    strip_png,
)
from fracture_ops.errors import BadInputError, ConfigError, ErrorBudgetExceeded

log = logging.getLogger(__name__)

STEP = "deidentify"
SECRET_ENV = "FRACTURE_OPS_DEID_SECRET"
_DEV_SECRET = b"fracture-ops-dev-secret-NOT-FOR-REAL-DATA"
IMPLEMENTATION_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'fracture-ops/deidentify').int}"
IMPLEMENTATION_VERSION = "FRACTUREOPS_0_1"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
CANDIDATE_SUFFIXES = DICOM_SUFFIXES + (".png", ".jpg", ".jpeg")
BURNED_IN_FLAGS = ("burned_in_annotation_absent", "burned_in_annotation_yes",
                   "burned_in_annotation_unrecognised", "watchlist_modality",
                   "watchlist_manufacturer")
NOTES = [
    ("Burned-in text is not detected in pixels: files are flagged when Burned In Annotation is "
     "absent or YES, or their Modality/Manufacturer is on the watch lists. A header saying NO is "
     "trusted; add sources known to burn in text anyway to watch_modalities/watch_manufacturers."),
    "Blanked regions are filled with the image's minimum stored value.",
    "Unreadable or unsupported files are listed by a keyed hash of their path and never copied.",
]


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


class DeidConfig(StepConfig):
    """Config of the ``deidentify`` step (YAML section ``deidentify``)."""

    section: ClassVar[str] = "deidentify"

    manifest_uri: str = Field("", description="manifest mode: canonical manifest (Parquet)")
    boxes_uri: str = Field("", description="box table; default: boxes.parquet beside the manifest")
    allow_dev_secret: bool = Field(False, description="demos/tests only: use a built-in secret "
                                   f"when ${SECRET_ENV} is unset (logs a warning)")
    shift_dates: bool = Field(True, description="shift DA/DT by a per-patient offset (else remove)")
    max_shift_days: int = Field(3650, ge=1, le=36500)
    retain_patient_characteristics: bool = Field(False, description="keep sex, age, size, weight")
    safe_private_tags: list[SafePrivateTag] = Field(default_factory=list)
    blank_regions: list[BlankRegion] = Field(default_factory=list)
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
        ConfigError: the variable is unset and ``allow_dev_secret`` is false.
    """
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        if not cfg.allow_dev_secret:
            raise ConfigError(f"{SECRET_ENV} is not set: de-identification needs a secret key "
                              "(e.g. from a Kubernetes Secret); allow_dev_secret is for demos")
        log.warning("%s is unset: using the built-in DEV secret; pseudonyms are NOT protected",
                    SECRET_ENV)
        return DeidKeys(_DEV_SECRET, cfg.max_shift_days)
    if len(secret) < 16:
        log.warning("%s is shorter than 16 characters; use a long random value", SECRET_ENV)
    return DeidKeys(secret.encode(), cfg.max_shift_days)


def burned_in_flags(ds, cfg: DeidConfig) -> list[str]:
    """Flags for files that may carry burned-in identifying text (see module docstring)."""
    flags = []
    value = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if not value:
        flags.append("burned_in_annotation_absent")
    elif value == "YES":
        flags.append("burned_in_annotation_yes")
    elif value != "NO":
        flags.append("burned_in_annotation_unrecognised")
    if str(ds.get("Modality", "")).strip().upper() in {m.upper() for m in cfg.watch_modalities}:
        flags.append("watchlist_modality")
    manufacturer = str(ds.get("Manufacturer", "") or "").strip().lower()
    if manufacturer and manufacturer in {m.strip().lower() for m in cfg.watch_manufacturers}:
        flags.append("watchlist_manufacturer")
    return flags


def _pixel_array(ds) -> tuple[np.ndarray, int]:
    """A writable copy of native pixel data shaped (frames, rows, cols[, samples]), and its size."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed or not ts.is_little_endian:
        raise FileRejected("cannot blank regions in compressed or big-endian pixel data")
    bits = int(ds.BitsAllocated)
    if bits not in (8, 16, 32):
        raise FileRejected(f"cannot blank regions with BitsAllocated={bits}")
    dtype = np.dtype(f"<{'i' if int(ds.get('PixelRepresentation', 0)) else 'u'}{bits // 8}")
    frames, spp = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1))
    rows, cols = int(ds.Rows), int(ds.Columns)
    count = frames * rows * cols * spp
    if len(ds.PixelData) < count * dtype.itemsize:
        raise FileRejected("pixel data is shorter than its header says")
    arr = np.frombuffer(ds.PixelData, dtype, count=count).copy()
    if spp == 1:
        return arr.reshape(frames, rows, cols), count * dtype.itemsize
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    shape = (frames, spp, rows, cols) if planar else (frames, rows, cols, spp)
    return arr.reshape(shape), count * dtype.itemsize


def blank_pixels(ds, regions: list[BlankRegion]) -> int:
    """Fill the regions with the image's minimum stored value; return how many were applied.

    Raises:
        FileRejected: pixel data that cannot be edited natively (compressed, unusual bit depth).
    """
    arr, nbytes = _pixel_array(ds)
    fill = arr.min()
    planar = arr.ndim == 4 and int(ds.get("PlanarConfiguration", 0) or 0) == 1
    for region in regions:
        x0, y0, x1, y1 = region.box
        if planar:
            arr[:, :, y0:y1, x0:x1] = fill
        else:
            arr[:, y0:y1, x0:x1] = fill
    ds.PixelData = arr.tobytes() + bytes(ds.PixelData[nbytes:])  # keep any padding byte
    return len(regions)


def _replace_file_meta(ds) -> None:
    """PS3.15 E.1.1 step 7: the file meta and preamble describe the de-identifier only."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian

    old = getattr(ds, "file_meta", None)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = getattr(old, "TransferSyntaxUID", None) or ImplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128


def _profile_options(cfg: DeidConfig, pixels_cleaned: bool = False) -> ProfileOptions:
    safe = frozenset((t.creator.strip(), t.group, t.element) for t in cfg.safe_private_tags)
    return ProfileOptions(shift_dates=cfg.shift_dates,
                          retain_patient_characteristics=cfg.retain_patient_characteristics,
                          safe_private=safe, pixels_cleaned=pixels_cleaned)


def deidentify_dicom_bytes(data: bytes, keys: DeidKeys, cfg: DeidConfig,
                           patient_key: str | None = None,
                           study_key: str | None = None) -> tuple[bytes, ProfileResult]:
    """De-identify one DICOM file given as bytes (no disk access).

    Args:
        data: the file's bytes.
        keys: keyed pseudonym functions (:func:`load_keys`).
        cfg: the step config (options, blank regions, watch lists).
        patient_key: the manifest's patient id, which then overrides the header's Patient ID as
            the pseudonym and date-shift key (counted as ``patient_id_from_manifest`` when the
            two differ), so the manifest and the file always agree.
        study_key: the manifest's study id; the new Study Instance UID is then
            ``keys.uid(study_key)`` (counted as ``study_uid_from_manifest`` when it differs from
            the header's), which is what a header-driven remap gives when they are equal.

    Returns:
        The de-identified file's bytes and what was done (flags include burned-in warnings).

    Raises:
        FileRejected: the data set lacks SOP UIDs or its pixels cannot be blanked.
        Exception: pydicom's own errors for unreadable files (callers quarantine them).
    """
    from pydicom.config import disable_value_validation

    # pydicom's validation warnings quote offending values (names, dates): keep them out of logs
    with disable_value_validation():
        return _deidentify_dicom(data, keys, cfg, patient_key, study_key)


def _deidentify_dicom(data: bytes, keys: DeidKeys, cfg: DeidConfig, patient_key: str | None,
                      study_key: str | None) -> tuple[bytes, ProfileResult]:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise FileRejected("not a DICOM instance: SOP Class/Instance UID missing")
    flags = burned_in_flags(ds, cfg)
    overrides = Counter()
    header_pid = str(ds.get("PatientID", "") or "").strip()
    if patient_key is not None and header_pid != patient_key.strip():
        overrides["patient_id_from_manifest"] = 1
    if study_key is not None and str(ds.get("StudyInstanceUID", "")).strip() != study_key.strip():
        overrides["study_uid_from_manifest"] = 1
    where = (str(ds.get("Modality", "")), str(ds.get("Manufacturer", "") or ""),
             int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    regions = [r for r in cfg.blank_regions if r.matches(*where)]
    blanked = blank_pixels(ds, regions) if regions and "PixelData" in ds else 0
    result = apply_profile(ds, keys, _profile_options(cfg, blanked > 0), patient_key)
    if study_key is not None:
        ds.StudyInstanceUID = result.study_uid = keys.uid(study_key)
    result.counts.update(overrides)
    if blanked:
        flags.append("regions_blanked")
        result.counts["regions_blanked"] = blanked
    result.flags = flags + result.flags
    _replace_file_meta(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), result


def _kind(data: bytes, suffix: str) -> str | None:
    if data[128:132] == b"DICM" or suffix in DICOM_SUFFIXES:
        return "dicom"
    if data.startswith(PNG_SIGNATURE) or data[:2] == b"\xff\xd8":
        return "image"
    return None


def _process(data: bytes, suffix: str, keys: DeidKeys, cfg: DeidConfig,
             patient_key: str | None = None,
             study_key: str | None = None) -> tuple[str, bytes, ProfileResult | None, str]:
    """Classify and de-identify one file: (kind, bytes, result or None, extension)."""
    kind = _kind(data, suffix)
    if kind == "dicom":
        out, result = deidentify_dicom_bytes(data, keys, cfg, patient_key, study_key)
        return kind, out, result, ".dcm"
    if kind == "image":
        out, ext = strip_image_metadata(data)
        return kind, out, None, ext
    raise FileRejected("not DICOM, PNG or JPEG")


def _fill_record(rec: dict, kind: str, result: ProfileResult | None, output: str) -> None:
    rec.update(status="deidentified" if kind == "dicom" else "stripped", kind=kind, output=output)
    if result is not None:
        rec.update(patient=result.patient, study=result.study_uid,
                   counts=dict(sorted(result.counts.items())), flags=result.flags)


def _quarantine(rec: dict, exc: Exception) -> None:
    reason = str(exc) if isinstance(exc, FileRejected) else f"unreadable: {type(exc).__name__}"
    rec.update(status="quarantined", reason=reason)


# ---- folder mode ----

def _check_folders(input_uri: str, output_uri: str) -> list[str]:
    if not storage.is_s3(input_uri) and not Path(input_uri).is_dir():
        raise BadInputError("deidentify: the INPUT folder does not exist")
    if not storage.is_s3(input_uri) and not storage.is_s3(output_uri):
        inp, out = Path(input_uri).resolve(), Path(output_uri).resolve()
        if inp == out or inp in out.parents or out in inp.parents:
            raise BadInputError("deidentify: OUTPUT must not be INPUT, inside it, or contain it")
    existing = storage.list_files(output_uri)
    if existing and not storage.exists(storage.join(output_uri, "report.json")):
        raise BadInputError("deidentify: OUTPUT is not empty and is not an earlier de-id output; "
                            "refusing to overwrite it")
    files = storage.list_files(input_uri)
    if not files:
        raise BadInputError("deidentify: the INPUT folder holds no files")
    return files


def _folder_file(uri: str, rel: str, keys: DeidKeys, cfg: DeidConfig, out_dir: str,
                 used: set[str]) -> dict:
    rec = {"input": keys.path_hash(rel)}
    suffix = Path(rel).suffix.lower()
    try:
        kind, out, result, ext = _process(storage.read_bytes(uri), suffix, keys, cfg)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the run
        if suffix not in CANDIDATE_SUFFIXES and isinstance(exc, FileRejected):
            rec.update(status="skipped", reason=str(exc))
        else:
            _quarantine(rec, exc)
        return rec
    if result is not None:
        name = f"dicom/{result.patient}/{result.sop_uid}{ext}"
    else:
        name = f"images/{rec['input'][:16]}{ext}"
    if name in used:  # the same SOP Instance twice: keep both, say so
        name = name[:-len(ext)] + f"-{rec['input'][:8]}{ext}"
        if result is not None:
            result.flags.append("duplicate_sop_instance")
    used.add(name)
    storage.write_bytes(storage.join(out_dir, *name.split("/")), out)
    _fill_record(rec, kind, result, name)
    return rec


def deidentify_folder(input_uri: str, output_uri: str, cfg: DeidConfig) -> dict:
    """Folder mode: de-identify every file under ``input_uri`` into ``output_uri``.

    Args:
        input_uri: folder (or s3 prefix) walked recursively.
        output_uri: where de-identified files, ``report.json``, ``audit.jsonl`` and ``_SUCCESS``
            go; it must be empty or an earlier output of this function (it is emptied first).
        cfg: the step config.

    Returns:
        The summary also stored in ``_SUCCESS``.

    Raises:
        BadInputError: missing/empty input, overlapping folders, or a foreign non-empty output.
        ConfigError: no secret (see :func:`load_keys`).
        ErrorBudgetExceeded: more than ``cfg.max_bad_fraction`` of candidate files failed.
    """
    from fracture_ops.cli_common import progress

    files = _check_folders(input_uri, output_uri)
    keys = load_keys(cfg)
    storage.reset_dir(output_uri)
    records: list[dict] = []
    used: set[str] = set()
    for uri in progress(files, desc="deidentify", total=len(files)):
        rel = (uri[len(input_uri.rstrip("/")):].lstrip("/") if storage.is_s3(input_uri)
               else os.path.relpath(uri, input_uri))
        records.append(_folder_file(uri, rel, keys, cfg, output_uri, used))
    return _finish(output_uri, records, cfg, keys, "folder", {"output_dir": output_uri})


# ---- reports ----

def build_report(records: list[dict], cfg: DeidConfig, keys: DeidKeys, mode: str) -> dict:
    """The PHI-free run report: counts, flags, quarantined/skipped inputs by path hash."""
    status = Counter(r["status"] for r in records)
    candidates = len(records) - status["skipped"]
    elements: Counter = Counter()
    for r in records:
        elements.update(r.get("counts", {}))
    flagged = [{"output": r["output"], "flags": r["flags"]} for r in records if r.get("flags")]
    codes = [c for c, _ in method_codes(_profile_options(cfg))]
    return {
        "step": STEP, "mode": mode,
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "method_codes": codes, "secret_fingerprint": keys.fingerprint,
        "dev_secret": not os.environ.get(SECRET_ENV),
        "counts": {"files": len(records), "deidentified": status["deidentified"],
                   "stripped": status["stripped"], "quarantined": status["quarantined"],
                   "skipped": status["skipped"], "flagged": len(flagged),
                   "flagged_burned_in": sum(any(f in BURNED_IN_FLAGS for f in x["flags"])
                                            for x in flagged)},
        "bad_fraction": round(status["quarantined"] / candidates, 6) if candidates else 0.0,
        "max_bad_fraction": cfg.max_bad_fraction,
        "elements": dict(sorted(elements.items())),
        "flag_counts": dict(sorted(Counter(f for x in flagged for f in x["flags"]).items())),
        "flagged": flagged,
        "quarantined": [{"input": r["input"], "reason": r["reason"]}
                        for r in records if r["status"] == "quarantined"],
        "skipped": [{"input": r["input"], "reason": r["reason"]}
                    for r in records if r["status"] == "skipped"],
        "notes": NOTES,
    }


def _finish(out_dir: str, records: list[dict], cfg: DeidConfig, keys: DeidKeys, mode: str,
            extra: dict) -> dict:
    report = build_report(records, cfg, keys, mode)
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    storage.write_text(storage.join(out_dir, "audit.jsonl"), lines)
    storage.write_json(storage.join(out_dir, "report.json"), report)
    write_resolved(cfg, out_dir)
    counts = report["counts"]
    log.info("deidentify: %d de-identified, %d stripped, %d quarantined, %d skipped, %d flagged",
             counts["deidentified"], counts["stripped"], counts["quarantined"],
             counts["skipped"], counts["flagged"])
    if counts["files"] == counts["skipped"]:
        raise BadInputError("deidentify: no DICOM, PNG or JPEG input found")
    if report["bad_fraction"] > cfg.max_bad_fraction:
        raise ErrorBudgetExceeded(f"deidentify: {counts['quarantined']} bad file(s), fraction "
                                  f"{report['bad_fraction']:.3f} > {cfg.max_bad_fraction}")
    summary = {**extra, "mode": mode, **{k: counts[k] for k in
               ("files", "deidentified", "stripped", "quarantined", "skipped", "flagged")}}
    storage.mark_success(out_dir, summary)
    return summary


# ---- CLI ----

def configure_parser(parser) -> None:
    """Arguments of ``fracture-ops deidentify``."""
    from fracture_ops import cli_common

    cli_common.add_common_args(parser)
    parser.add_argument("input", nargs="?", metavar="INPUT", help="folder mode: input folder")
    parser.add_argument("output", nargs="?", metavar="OUTPUT",
                        help="folder mode: output folder (empty or an earlier de-id output)")
    parser.add_argument("--manifest", metavar="URI", help="manifest mode: canonical manifest")
    parser.add_argument("--allow-dev-secret", action="store_true", default=None,
                        help=f"demos only: built-in secret when ${SECRET_ENV} is unset")


def __getattr__(name: str):
    # manifest mode lives in its own module (it imports this one); keep the old import path
    if name == "deidentify_manifest_step":
        from fracture_ops.data.deid_manifest import deidentify_manifest_step

        return deidentify_manifest_step
    raise AttributeError(name)


def run_cli(args) -> dict:
    """Run folder mode (INPUT OUTPUT) or manifest mode (--manifest or manifest_uri in config)."""
    from fracture_ops import cli_common

    cfg = cli_common.config_from_args(DeidConfig, args, manifest_uri=args.manifest,
                                      allow_dev_secret=args.allow_dev_secret)
    if args.input or args.output:
        if args.manifest:
            raise ConfigError("give either INPUT OUTPUT (folder mode) or --manifest, not both")
        if not (args.input and args.output):
            raise ConfigError("folder mode needs both INPUT and OUTPUT")
        return deidentify_folder(args.input, args.output, cfg)
    if cfg.manifest_uri:
        from fracture_ops.data.deid_manifest import deidentify_manifest_step

        return deidentify_manifest_step(cfg)
    raise ConfigError("nothing to do: give INPUT OUTPUT (folder mode) or --manifest URI")
