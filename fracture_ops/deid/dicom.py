"""One DICOM file through de-identification: header profile, configured regions, burned-in text.

:func:`deidentify_dicom_bytes` reads a file's bytes, collects the header values to hunt for in the
pixels (names, ids, dates, institution, accession) before the header profile removes them, scrubs
burned-in text (:mod:`fracture_ops.deid.pixels`; every frame; compressed transfer syntaxes are
decoded and written back as Explicit VR Little Endian when something is blanked, and left
compressed, byte for byte, when nothing is), applies the PS3.15 Annex E profile
(:mod:`fracture_ops.deid.profile`: overlays (60xx) and the Icon Image Sequence go there) and
marks ``BurnedInAnnotation = NO`` only when the verification read found nothing left. A file
whose text could not be removed raises :class:`PixelTextRemains` (callers quarantine it).

Burned-in flags: a file is still flagged for the report when Burned In Annotation (0028,0301) is
absent or YES, or its Modality/Manufacturer is on a watch list; headers that say NO while text is
burned in (seen in real exports) are scrubbed like every other file.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np

from fracture_ops.data.images import dcmread_bytes
from fracture_ops.deid.config import (
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    BlankRegion,
    DeidConfig,
)
from fracture_ops.errors import FileRejected
from fracture_ops.deid.profile import DeidKeys, ProfileOptions, ProfileResult, apply_profile
from fracture_ops.deid.scrub import PixelTextRemains, scrub_array, scrub_report  # noqa: F401

_PHI_NAMES = ("PatientName", "OtherPatientNames", "PatientMotherBirthName",
              "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
              "NameOfPhysiciansReadingStudy", "RequestingPhysician")
_PHI_IDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID",
            "RequestedProcedureID", "DeviceSerialNumber", "StationName")
_PHI_DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
_PHI_TEXTS = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
              "PatientAddress")


def _values(ds, keywords: tuple[str, ...]) -> list[str]:
    """Every value of these attributes as text (multi-valued ones item by item)."""
    from pydicom.multival import MultiValue

    out = []
    for keyword in keywords:
        try:
            v = ds.get(keyword)
        except Exception:  # noqa: BLE001 - an undecodable value cannot be matched anyway
            continue
        if v is not None and v != "":
            out.extend(str(x) for x in (v if isinstance(v, (list, tuple, MultiValue)) else [v]))
    return out


def header_phi_values(ds, extra_ids: list[str] = ()) -> dict[str, list[str]]:
    """The header values that must never show in the pixels, by kind (names/ids/dates/texts)."""
    return {"names": _values(ds, _PHI_NAMES),
            "ids": _values(ds, _PHI_IDS) + [str(x) for x in extra_ids],
            "dates": _values(ds, _PHI_DATES), "texts": _values(ds, _PHI_TEXTS)}


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


def _decoded_frames(ds) -> np.ndarray:
    """Stored values as (frames, rows, cols[, samples]), decoding compressed syntaxes."""
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames == 1:
        arr = arr[None]
    if spp == 1 and arr.ndim == 4:
        arr = arr[..., 0]
    return np.array(arr, copy=True)


def scrub_dicom_pixels(ds, cfg: DeidConfig, phi: dict[str, list[str]]) -> dict:
    """Scrub burned-in text from every frame of ``ds`` in place; return the audit entry.

    Nothing is rewritten when nothing is blanked (compressed pixel data stays as it was). When
    something is, compressed data is decoded first and written back uncompressed (Explicit VR
    Little Endian); every pixel outside the blanked boxes keeps its stored value.

    Raises:
        PixelTextRemains: text remains after the last round (see :func:`scrub_array`).
        FileRejected: pixel data that cannot be decoded or edited.
    """
    try:
        frames = _decoded_frames(ds)
    except Exception as exc:  # noqa: BLE001 - a decoder error quarantines the file
        raise FileRejected(f"pixel data does not decode: {type(exc).__name__}") from exc
    result = scrub_array(frames, cfg.pixels, phi)
    if result.regions:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()  # Explicit VR Little Endian; YBR colour becomes RGB
        native, nbytes = _pixel_array(ds)
        fill = native.min()
        planar = native.ndim == 4 and int(ds.get("PlanarConfiguration", 0) or 0) == 1
        for i, frame in enumerate(result.frames):
            for x0, y0, x1, y1 in frame.blanked:
                if planar:
                    native[i, :, y0:y1, x0:x1] = fill
                else:
                    native[i, y0:y1, x0:x1] = fill
        ds.PixelData = native.tobytes() + bytes(ds.PixelData[nbytes:])
    return scrub_report(result, cfg.pixels)


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
    keep = frozenset(int(t, 16) for t in cfg.keep_unknown_tags)
    return ProfileOptions(shift_dates=cfg.shift_dates,
                          retain_patient_characteristics=cfg.retain_patient_characteristics,
                          safe_private=safe, pixels_cleaned=pixels_cleaned, keep_unknown=keep)


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
    ds = dcmread_bytes(data)  # with or without the 128-byte preamble
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
    pixels = None
    if cfg.pixels.enabled and "PixelData" in ds:
        extra = [patient_key] if patient_key else []
        pixels = scrub_dicom_pixels(ds, cfg, header_phi_values(ds, extra))
    result = apply_profile(ds, keys, _profile_options(cfg, blanked > 0 or pixels is not None),
                           patient_key)
    if pixels is not None:
        ds.BurnedInAnnotation = "NO"  # only here: the verification read found nothing left
        result.pixels = pixels
        result.counts["text_regions_blanked"] = pixels["regions"]
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


