"""Data sources -> one canonical manifest (see :mod:`fracture_ops.data.manifest`).

Adapters, one per layout; each returns ``(manifest, boxes, notes)`` and never writes:

- ``csv``: a generic CSV manifest with the canonical column names (``image_uri`` may be relative
  to the CSV's folder); an optional ``boxes.csv`` beside it with :data:`BOX_COLUMNS`.
- ``folder``: ``<root>/<class>/**/<image>``; the class folder is the label. Patient ids come from
  a regex over the file name when given, else from each DICOM's header (PatientID, and
  StudyInstanceUID for the study); an image with neither is refused unless the caller says each
  image is its own patient (``one_image_per_patient``): guessing would let one patient's images
  land in both train and test.
- ``fracatlas``: ``dataset.csv`` + ``images/{Fractured,Non_fractured}`` + ``Annotations/YOLO``.
  FracAtlas has no patient ids: each image is its own group (said in the notes).
- ``grazpedwri``: GRAZPEDWRI-DX ``dataset.csv`` (UTF-8 with BOM) + ``data/images/**`` +
  ``data/labels/**`` YOLO boxes over 9 classes; patient id from the CSV or the file name.
- ``mura``: ``.../XR_<REGION>/patientNNNNN/studyN_{positive,negative}/imageN.png``.
  MURA labels abnormality (fractures, hardware, lesions...), not fracture: positives get the
  label ``abnormal`` so nobody mistakes them for fracture labels.

The ``ingest`` step runs an adapter and writes ``manifest.parquet``, ``boxes.parquet`` and
``report.json`` under ``<artifact_root>/runs/<run_id>/ingest/``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import ClassVar, Literal

import pandas as pd
from pydantic import Field

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.data.manifest import (
    BOX_COLUMNS,
    MANIFEST_COLUMNS,
    empty_boxes,
    manifest_hash,
    normalize_manifest,
)
from fracture_ops.errors import ManifestError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
GRAZ_CLASSES = ["boneanomaly", "bonelesion", "foreignbody", "fracture", "metal",
                "periostealreaction", "pronatorsign", "softtissue", "text"]
GRAZ_PROJECTIONS = {"1": "AP", "2": "LAT", "3": "OBL"}
Adapter = Callable[..., tuple[pd.DataFrame, pd.DataFrame, list[str]]]


def _read_csv(uri: str) -> pd.DataFrame:
    # utf-8-sig: GRAZPEDWRI-DX's dataset.csv starts with a byte-order mark
    return pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, encoding="utf-8-sig",
                       keep_default_na=False)


def _stem(uri: str) -> str:
    return PurePosixPath(str(uri).replace("\\", "/")).stem


def read_yolo_boxes(label_uri: str, image_uri: str, class_names: list[str], image_id: str) -> list[dict]:
    """Read one YOLO label file (``cls cx cy w h`` normalised) into pixel boxes.

    Raises:
        ManifestError: a malformed line (names the file and line number).
    """
    from fracture_ops.data.images import read_image_size

    text = storage.read_text(label_uri).strip()
    if not text:
        return []
    width, height = read_image_size(image_uri)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls = int(float(parts[0]))
            cx, cy, w, h = (float(p) for p in parts[1:5])
        except (ValueError, IndexError) as exc:
            raise ManifestError(f"{label_uri}:{n}: malformed YOLO line {line!r}") from exc
        if not 0 <= cls < len(class_names):
            raise ManifestError(f"{label_uri}:{n}: class index {cls} outside 0..{len(class_names) - 1}")
        rows.append({
            "image_id": image_id, "class_name": class_names[cls],
            "x_min": (cx - w / 2) * width, "y_min": (cy - h / 2) * height,
            "x_max": (cx + w / 2) * width, "y_max": (cy + h / 2) * height,
            "img_w": float(width), "img_h": float(height),
        })
    return rows


def _boxes_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=BOX_COLUMNS) if rows else empty_boxes()


# other names exported lists use for the canonical columns (compared lower-case, with spaces
# and hyphens as underscores); a column is mapped only when exactly one candidate is present
CSV_SYNONYMS: dict[str, tuple[str, ...]] = {
    "image_id": ("image", "image_name", "filename", "file_name", "id"),
    "image_uri": ("path", "image_path", "file", "filepath", "file_path", "uri", "image_file"),
    "patient_id": ("patient", "patientid", "patient_number", "subject", "subject_id"),
    "study_id": ("study", "studyid", "study_number", "exam", "exam_id"),
    "label": ("fracture", "fractured", "target", "class", "diagnosis"),
}
CSV_REQUIRED = ("image_id", "image_uri", "patient_id", "label")  # study_id is optional


def _key(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def map_csv_columns(df: pd.DataFrame, columns: dict[str, str] | None = None,
                    uri: str = "manifest") -> tuple[pd.DataFrame, list[str]]:
    """Rename a CSV's columns to the canonical ones.

    ``columns`` maps canonical name -> the CSV's column (``--col image_uri=path``); columns not
    mapped there are taken by their canonical name or, failing that, by one unambiguous
    synonym (:data:`CSV_SYNONYMS`). ``study_id`` may be missing: each patient's images then form
    one study. Returns the renamed frame and notes saying what was mapped.

    Raises:
        ConfigError: a mapping names an unknown canonical or CSV column, or a required column is
            missing; the message lists the columns found and the ones expected.
    """
    from fracture_ops.errors import ConfigError

    found = [str(c) for c in df.columns]
    expected = (f"expected {', '.join(CSV_REQUIRED)} (study_id optional; map yours with "
                "--col CANONICAL=YOUR_COLUMN)")
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in MANIFEST_COLUMNS]
    if unknown:
        raise ConfigError(f"{uri}: --col names unknown canonical column(s) {', '.join(unknown)}; "
                          f"{expected}")
    absent = [v for v in columns.values() if v not in found]
    if absent:
        raise ConfigError(f"{uri}: --col names column(s) {', '.join(absent)} not in the CSV; "
                          f"found {', '.join(found)}")
    rename = {src: canon for canon, src in columns.items()}
    notes = [f"column {src!r} used as {canon}" for canon, src in columns.items() if src != canon]
    by_key = {_key(c): c for c in found}
    for canon, synonyms in CSV_SYNONYMS.items():
        if canon in columns or canon in found:
            continue
        hits = [by_key[k] for k in (canon, *synonyms) if k in by_key and by_key[k] not in rename]
        if len(hits) == 1:
            rename[hits[0]] = canon
            notes.append(f"column {hits[0]!r} used as {canon}")
    out = df.rename(columns=rename)
    missing = [c for c in CSV_REQUIRED if c not in out.columns]
    if missing:
        raise ConfigError(f"{uri}: missing column(s) {', '.join(missing)}; found "
                          f"{', '.join(found) or 'none'}; {expected}")
    if "study_id" not in out.columns:
        out["study_id"] = out["patient_id"]
        notes.append("no study_id column: each patient's images form one study")
    return out, notes


def from_csv(uri: str, columns: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Generic CSV manifest: canonical column names, or mapped ones (:func:`map_csv_columns`);
    relative ``image_uri`` resolved to the CSV."""
    df = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, encoding="utf-8-sig")
    df, notes = map_csv_columns(df, columns, PurePosixPath(str(uri)).name)
    base = str(uri).rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)
    df["image_uri"] = [
        u if (storage.is_s3(u) or Path(u).is_absolute()) else storage.join(base, u)
        for u in df["image_uri"].astype(str)
    ]
    if "source" not in df.columns:
        df["source"] = "csv"
    boxes_uri = storage.join(base, "boxes.csv")
    boxes = empty_boxes()
    if storage.exists(boxes_uri):
        boxes = pd.read_csv(io.BytesIO(storage.read_bytes(boxes_uri)),
                            dtype={"image_id": str, "class_name": str})
    return df, boxes, ["generic CSV manifest", *notes]


def _group_id(text: str) -> str:
    """A patient id for an image with none of its own: the path with characters outside
    ``[A-Za-z0-9._-]`` replaced, and a long one shortened with a hash of the whole (ids must fit
    the manifest's 64-character rule)."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    if len(safe) <= 64:
        return safe
    return safe[:47] + "-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _header_ids(uri: str) -> tuple[str, str] | None:
    """(PatientID, StudyInstanceUID) of a DICOM file, or None when it is not DICOM or has no
    PatientID (the ids stay in the raw zone's manifest; de-identification keys them)."""
    if not str(uri).lower().endswith((".dcm", ".dicom")):
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(storage.read_bytes(uri)), stop_before_pixels=True,
                             specific_tags=["PatientID", "StudyInstanceUID"])
    except Exception:  # noqa: BLE001 - an unreadable file is validate's to quarantine
        return None
    patient = str(ds.get("PatientID") or "").strip()
    if not patient:
        return None
    return patient, str(ds.get("StudyInstanceUID") or "").strip() or patient


def from_folder(root: str, patient_regex: str | None = None,
                one_image_per_patient: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``<root>/<class>/**/<image>``: the first folder level is the label. Patient ids: the
    regex's over the file name, else the DICOM header's, else (only with
    ``one_image_per_patient``) each image its own.

    Raises:
        ManifestError: no images, an image outside a class folder, a name the regex misses.
        ConfigError: images without a patient id and no ``one_image_per_patient``.
    """
    from fracture_ops.errors import ConfigError

    files = storage.list_files(root, IMAGE_SUFFIXES)
    if not files:
        raise ManifestError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    pattern = re.compile(patient_regex) if patient_regex else None
    rows, notes, unknown, from_header = [], [], [], 0
    for uri in files:
        rel = (PurePosixPath(str(uri).removeprefix(str(root).rstrip("/") + "/")) if storage.is_s3(uri)
               else PurePosixPath(Path(uri).relative_to(Path(root)).as_posix()))
        if len(rel.parts) < 2:
            raise ManifestError(f"{uri}: expected <root>/<class>/<image>, found an image at the top level")
        label, image_id = rel.parts[0], "/".join(rel.with_suffix("").parts)
        patient = study = _group_id(image_id)
        if pattern:
            m = pattern.search(rel.name)
            if not m:
                raise ManifestError(f"{uri}: file name does not match patient_regex {patient_regex!r}")
            patient = study = m.group(1) if m.groups() else m.group(0)
        elif (ids := _header_ids(uri)) is not None:
            (patient, study), from_header = ids, from_header + 1
        elif not one_image_per_patient:
            unknown.append(f"image {len(rows) + 1} of {len(files)}, class folder {label!r}")
        rows.append({"image_id": image_id, "image_uri": uri, "patient_id": patient,
                     "study_id": study, "label": label, "source": "folder"})
    if unknown:
        raise ConfigError(
            # file names in exports often name the patient: the message counts, it does not name
            f"folder layout: {len(unknown)} of {len(files)} images have no patient id (not DICOM, "
            f"or no PatientID in the header; first: {unknown[0]}). Without one, one patient's "
            "images could land in both train and test. Give --patient-regex (a regex whose first "
            "group is the patient id in the file name), or --one-image-per-patient if each image "
            "really is a different patient")
    if from_header:
        notes.append(f"folder layout: patient and study ids of {from_header} DICOM images from "
                     "their headers")
    if not pattern and from_header < len(files):
        notes.append(f"folder layout: {len(files) - from_header} images without a patient id: "
                     "each is its own patient (one_image_per_patient)")
    return pd.DataFrame(rows), empty_boxes(), notes


def _fracatlas_view(row: pd.Series) -> str:
    views = [v for v, col in (("FRONTAL", "frontal"), ("LAT", "lateral"), ("OBL", "oblique"))
             if str(row.get(col, "0")) == "1"]
    return views[0] if len(views) == 1 else "OTHER"


def from_fracatlas(root: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """FracAtlas: dataset.csv + images/{Fractured,Non_fractured} + Annotations/YOLO (class 0)."""
    meta = _read_csv(storage.join(root, "dataset.csv"))
    files = {PurePosixPath(u.replace("\\", "/")).name: u
             for u in storage.list_files(storage.join(root, "images"), (".jpg", ".jpeg", ".png"))}
    if not files:
        raise ManifestError(f"no images under {storage.join(root, 'images')}")
    meta = meta[meta["image_id"].isin(files)]
    regions = ["hand", "leg", "hip", "shoulder", "mixed"]
    rows, box_rows = [], []
    for _, r in meta.iterrows():
        image_id = _stem(r["image_id"])
        uri = files[r["image_id"]]
        region = next((g for g in regions if str(r.get(g)) == "1"), "unknown")
        rows.append({
            "image_id": image_id, "image_uri": uri, "patient_id": image_id, "study_id": image_id,
            "label": "fracture" if str(r["fractured"]) == "1" else "normal",
            "view": _fracatlas_view(r), "laterality": "U", "body_region": region,
            "source": "fracatlas", "lbl_hardware": int(str(r.get("hardware", "0")) == "1"),
        })
        label_uri = storage.join(root, "Annotations", "YOLO", f"{image_id}.txt")
        if storage.exists(label_uri):
            box_rows += read_yolo_boxes(label_uri, uri, ["fracture"], image_id)
    notes = ["FracAtlas has no patient ids: each image is its own group (patient_id = image_id); "
             "images of one person may fall into different splits",
             f"{len(files) - len(rows)} image file(s) not in dataset.csv were ignored"]
    return pd.DataFrame(rows), _boxes_frame(box_rows), notes


def _graz_patient(row: pd.Series) -> str:
    pid = str(row.get("patient_id") or "").strip()
    if not pid or pid == "nan":
        pid = str(row["filestem"]).split("_", 1)[0]
    return f"GRAZ{int(pid):05d}" if pid.isdigit() else pid


def from_grazpedwri(root: str, require_images: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """GRAZPEDWRI-DX: dataset.csv + data/images/** PNGs + data/labels/** YOLO boxes.

    Args:
        root: folder holding ``dataset.csv`` and ``data/``.
        require_images: drop rows whose PNG is absent (default); with False, keep every CSV row
            with the URI the image would have (useful to split the metadata alone).
    """
    meta = _read_csv(storage.join(root, "dataset.csv"))
    if "filestem" not in meta.columns:
        raise ManifestError(f"{root}/dataset.csv lacks the 'filestem' column")
    images = {_stem(u): u for u in storage.list_files(storage.join(root, "data", "images"), (".png",))}
    labels = {_stem(u): u for u in storage.list_files(storage.join(root, "data", "labels"), (".txt",))}
    rows, box_rows, missing = [], [], 0
    for _, r in meta.iterrows():
        stem = str(r["filestem"])
        uri = images.get(stem)
        if uri is None:
            missing += 1
            if require_images:
                continue
            uri = storage.join(root, "data", "images", f"{stem}.png")
        patient = _graz_patient(r)
        fracture = str(r.get("fracture_visible", "")).strip() in ("1", "1.0")
        rows.append({
            "image_id": stem, "image_uri": uri, "patient_id": patient,
            "study_id": f"{patient}-S{str(r.get('study_number', '1')).strip() or '1'}",
            "label": "fracture" if fracture else "normal",
            "view": GRAZ_PROJECTIONS.get(str(r.get("projection", "")).strip(), "UNKNOWN"),
            "laterality": str(r.get("laterality", "U")).strip() or "U",
            "body_region": "wrist", "source": "grazpedwri",
        })
        if stem in labels and stem in images:
            box_rows += read_yolo_boxes(labels[stem], images[stem], GRAZ_CLASSES, stem)
    boxes = _boxes_frame(box_rows)
    df = pd.DataFrame(rows)
    for cls in GRAZ_CLASSES:
        present = set(boxes.loc[boxes["class_name"] == cls, "image_id"])
        df[f"lbl_{cls}"] = df["image_id"].isin(present).astype(int)
    notes = [f"{missing} of {len(meta)} dataset.csv rows have no image file"
             + (" and were dropped" if require_images else " (kept: require_images=False)"),
             "label = fracture_visible (1 -> fracture, blank -> normal); lbl_* from YOLO boxes"]
    return df, boxes, notes


MURA_PATH = re.compile(r"XR_(?P<region>[A-Z]+)/patient(?P<patient>\d+)/study(?P<study>\d+)_(?P<label>positive|negative)/")


def from_mura(root: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """MURA: ``XR_<REGION>/patientNNNNN/studyN_{positive,negative}/imageN.png``."""
    rows = []
    for uri in storage.list_files(root, (".png", ".jpg", ".jpeg")):
        norm = str(uri).replace("\\", "/")
        m = MURA_PATH.search(norm)
        if not m:
            raise ManifestError(f"{uri}: not a MURA path (XR_<REGION>/patientN/studyN_<positive|negative>/)")
        patient, study = f"MURA{m['patient']}", f"MURA{m['patient']}-S{m['study']}"
        rows.append({
            "image_id": f"{study}-{m['region'].lower()}-{_stem(norm)}", "image_uri": uri,
            "patient_id": patient, "study_id": f"{study}-{m['region'].lower()}",
            "label": "abnormal" if m["label"] == "positive" else "normal",
            "body_region": m["region"].lower(), "source": "mura",
        })
    if not rows:
        raise ManifestError(f"no MURA images under {root}")
    notes = ["MURA labels abnormality, not fracture: positives are labelled 'abnormal'"]
    return pd.DataFrame(rows), empty_boxes(), notes


ADAPTERS: dict[str, Adapter] = {"csv": from_csv, "folder": from_folder, "fracatlas": from_fracatlas,
                                "grazpedwri": from_grazpedwri, "mura": from_mura}
Layout = Literal["csv", "folder", "fracatlas", "grazpedwri", "mura"]


def load_source(uri: str, layout: Layout, **options) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Run the adapter for ``layout`` and normalise its manifest.

    Raises:
        ManifestError: unknown layout, or the source does not match the layout.
    """
    if layout not in ADAPTERS:
        raise ManifestError(f"unknown layout {layout!r}; choose one of {', '.join(ADAPTERS)}")
    if not storage.is_s3(uri) and not Path(uri).exists():
        raise ManifestError(f"data source {uri} does not exist")
    df, boxes, notes = ADAPTERS[layout](uri, **options)
    if df.empty:
        raise ManifestError(f"{layout} source {uri} yielded no images")
    return normalize_manifest(df), boxes.reset_index(drop=True), notes


class IngestConfig(StepConfig):
    """Config of the ``ingest`` step."""

    section: ClassVar[str] = "ingest"
    source_uri: str = Field("data/demo/synthetic/manifest.csv", description="data source: folder, "
                            "CSV file or s3:// URI of the raw data set")
    layout: Layout = Field("csv", description="layout of the data source")
    patient_regex: str | None = Field(None, description="folder layout: a regex over the file "
                                      "name whose first group is the patient id")
    one_image_per_patient: bool = Field(False, description="folder layout: images without a "
                                        "patient id (no regex, not DICOM or no PatientID) are "
                                        "each their own patient; without it they are refused")
    columns: dict[str, str] = Field(
        default_factory=dict, description="csv layout: canonical column -> the CSV's column "
        "(e.g. image_uri=path); unmapped columns are found by name or one unambiguous synonym")
    require_images: bool = True
    data_roots: list[str] = Field(
        default_factory=storage.data_roots,
        description="where sources and images may be read from (default $FRACTURE_OPS_DATA_ROOTS;"
        " empty: the source's own folder)")
    raw_retention_days: float = Field(7.0, gt=0, le=365, description="days the raw zone keeps "
                                      "this run's identifying tables before they are purged")


def source_roots(cfg: IngestConfig) -> list[str]:
    """The data roots images must resolve under: the configured ones, else the source's own
    folder (a CSV's or a layout file's folder, the folder itself for folder layouts)."""
    if cfg.data_roots:
        return list(cfg.data_roots)
    src = cfg.source_uri.rstrip("/")
    is_file = Path(src).suffix.lower() in (".csv", ".parquet", ".xlsx", ".json")
    if storage.is_s3(src):
        return [src.rsplit("/", 1)[0] if is_file and src.count("/") > 2 else src]
    return [os.path.realpath(Path(src).parent if is_file else src)]


def ingest_step(cfg: IngestConfig) -> dict:
    """Turn a data source into ``manifest.parquet`` + ``boxes.parquet`` + ``report.json``.

    The manifest holds the source's own ids and paths (real exports name files after patients),
    so everything identifying goes to the raw zone (``cfg.raw_dir("ingest")``, with an expiry
    date for its run folder; expired raw run folders are purged first). The dataset store gets
    only counts (``report.json``) and ``_SUCCESS``; nothing logged names a file or an id.

    Raises:
        ConfigError: the source is not a local path or s3:// URI under the data roots.
    """
    storage.check_data_uri(cfg.source_uri, "ingest: source", cfg.data_roots)
    options: dict = {}
    if cfg.layout == "folder" and cfg.patient_regex:
        options["patient_regex"] = cfg.patient_regex
    if cfg.layout == "folder" and cfg.one_image_per_patient:
        options["one_image_per_patient"] = True
    if cfg.layout == "grazpedwri":
        options["require_images"] = cfg.require_images
    if cfg.layout == "csv" and cfg.columns:
        options["columns"] = cfg.columns
    purged = storage.purge_expired(storage.join(cfg.raw_root, "runs"))
    if purged:
        log.info("ingest: %d expired raw-zone run folder(s) deleted", len(purged))
    # a rerun that fails leaves no earlier output behind for the steps after it to take
    raw, out = cfg.raw_dir("ingest"), cfg.output_dir("ingest")
    storage.reset_dir(raw)
    storage.reset_dir(out)
    df, boxes, notes = load_source(cfg.source_uri, cfg.layout, **options)
    storage.set_expiry(raw.rsplit("/", 1)[0] if storage.is_s3(raw) else str(Path(raw).parent),
                       cfg.raw_retention_days)
    public = {
        "layout": cfg.layout, "images": len(df), "patients": int(df["patient_id"].nunique()),
        "boxes": len(boxes), "labels": df["label"].value_counts().sort_index().to_dict(),
        "manifest_hash": manifest_hash(df), "notes": notes,
    }
    for note in notes:
        log.info("ingest: %s", note)
    storage.write_parquet(storage.join(raw, catalog.INGEST_MANIFEST.file), df)
    storage.write_parquet(storage.join(raw, catalog.INGEST_BOXES.file), boxes)
    storage.write_json(storage.join(raw, "report.json"),
                       {**public, "data_roots": source_roots(cfg)})
    write_resolved(cfg, raw)  # names the source: raw zone only
    summary = {"manifest_uri": storage.join(raw, catalog.INGEST_MANIFEST.file),
               "boxes_uri": storage.join(raw, catalog.INGEST_BOXES.file),
               "images": public["images"], "patients": public["patients"]}
    storage.mark_success(raw, summary)
    storage.write_json(storage.join(out, catalog.INGEST_REPORT.file), public)
    storage.mark_success(out, summary)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops ingest SOURCE --layout L``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    parser.add_argument("source", nargs="?", help="data source folder, CSV file or s3:// URI")
    add_field_flags(parser, IngestConfig, "layout", "one_image_per_patient")
    parser.add_argument("--patient-regex", help="folder layout: regex whose first group is the patient id")
    parser.add_argument("--col", action="append", metavar="CANONICAL=COLUMN", default=None,
                        help="csv layout: take a canonical column (image_id, image_uri, patient_id, "
                        "study_id, label, view, laterality, body_region) from the CSV's COLUMN; "
                        "repeatable. Without it, columns are found by name or a common synonym "
                        "(path, patient, image, ...); study_id may be absent")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the ingest step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args
    from fracture_ops.errors import ConfigError

    columns = None
    if args.col:
        pairs = [c.partition("=") for c in args.col]
        bad = [c for c, (_, eq, v) in zip(args.col, pairs) if not eq or not v]
        if bad:
            raise ConfigError(f"ingest: --col wants CANONICAL=COLUMN, got {', '.join(bad)}")
        columns = {k.strip(): v.strip() for k, _, v in pairs}
    cfg = config_from_args(IngestConfig, args, source_uri=args.source, layout=args.layout,
                           patient_regex=args.patient_regex, columns=columns)
    return ingest_step(cfg)
