"""The canonical manifest: one row per image, the table every step reads and writes.

Columns (all strings unless noted):

- ``image_id``: unique id of the image within the manifest.
- ``image_uri``: local path or ``s3://`` URI of the image file.
- ``patient_id``: the grouping unit of every split and bootstrap. Where a source has no patient
  ids (FracAtlas), each image is its own group and the adapter says so in its report.
- ``study_id``: study (exam) the image belongs to.
- ``label``: the target: ``fracture`` / ``normal`` for the binary task, or a class/region name.
- ``view``: one of :data:`VIEWS`; ``laterality``: one of :data:`LATERALITIES`.
- ``body_region``: e.g. ``hand``, ``leg``, ``wrist``, ``unknown``.
- ``source``: adapter name (``fracatlas``, ``grazpedwri``, ``mura``, ``csv``, ``folder``, ``synthetic``).
- optional multi-label columns named ``lbl_<name>`` holding 0/1 integers.

Boxes live in a side table (:data:`BOX_COLUMNS`), pixel coordinates in the original image.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from fracture_ops.errors import ManifestError

REQUIRED_COLUMNS = ["image_id", "image_uri", "patient_id", "study_id", "label"]
OPTIONAL_COLUMNS = ["view", "laterality", "body_region", "source"]
MANIFEST_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
MULTILABEL_PREFIX = "lbl_"

BOX_COLUMNS = ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max", "img_w", "img_h"]

BINARY_LABELS = ("normal", "fracture")
VIEWS = ("AP", "PA", "LAT", "OBL", "FRONTAL", "OTHER", "UNKNOWN")
LATERALITIES = ("L", "R", "B", "U")  # left, right, both, unknown


def normalize_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Return a manifest with the canonical columns, dtypes and order.

    Missing optional columns are filled (``UNKNOWN``/``U``/``unknown``); extra columns are kept
    after the canonical ones. Rows are sorted by ``image_id`` so reruns produce identical files.

    Raises:
        ManifestError: a required column is missing.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest lacks required column(s): {', '.join(missing)}")
    out = df.copy()
    defaults = {"view": "UNKNOWN", "laterality": "U", "body_region": "unknown", "source": "unknown"}
    for col, default in defaults.items():
        if col not in out.columns:
            out[col] = default
        out[col] = out[col].fillna(default)
    for col in MANIFEST_COLUMNS:
        # keep real missing values missing (validation reports them) but make the rest strings
        out[col] = out[col].map(lambda v: v if pd.isna(v) else str(v)).astype("object")
    for col in [c for c in out.columns if c.startswith(MULTILABEL_PREFIX)]:
        out[col] = out[col].fillna(0).astype("int64")
    extra = [c for c in out.columns if c not in MANIFEST_COLUMNS]
    out = out[MANIFEST_COLUMNS + extra]
    return out.sort_values("image_id", kind="stable").reset_index(drop=True)


def empty_boxes() -> pd.DataFrame:
    """An empty box table with the canonical columns."""
    return pd.DataFrame({c: pd.Series(dtype="float64" if c not in ("image_id", "class_name") else "object")
                         for c in BOX_COLUMNS})


def table_hash(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A stable SHA-256 (first 16 hex digits) of a table's content, independent of row order."""
    cols = columns or list(df.columns)
    frame = df[cols].astype(str).sort_values(cols, kind="stable")
    digest = hashlib.sha256()
    digest.update("\x1f".join(cols).encode())
    for row in frame.itertuples(index=False):
        digest.update("\x1f".join(row).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def manifest_hash(df: pd.DataFrame) -> str:
    """Hash of the manifest columns that define the data set (used as an MLflow tag)."""
    return table_hash(df, [c for c in MANIFEST_COLUMNS if c in df.columns])
