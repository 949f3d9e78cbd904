"""Where the prediction log and the reference tables live, and the columns they hold.

This module is the shared contract between :mod:`fracture_ops.inference` (the writer) and
:mod:`fracture_ops.monitoring` (the reader). It has no heavy imports.

Prediction log: ``<artifact_root>/prediction_log/date=YYYY-MM-DD/part-<batch_id>.parquet``, one
file per scored batch (a Hive-style partition, so ``pyarrow.dataset`` and Spark read it as a
table with a ``date`` column). Side files of a batch start with ``_`` (``_quarantine-<batch_id>
.parquet``, ``_batch-<batch_id>.json``): dataset readers skip files starting with ``_`` or ``.``
by default, so they never mix with prediction rows.

Reference table: ``<artifact_root>/reference/<model_name>/v<version>/reference.parquet`` plus
``_SUCCESS``: the champion's validation split scored by the same code, labels included.
"""

from __future__ import annotations

import re

from fracture_ops import storage

PREDICTION_LOG = "prediction_log"
REFERENCE = "reference"
REFERENCE_FILE = "reference.parquet"
PART_PREFIX = "part-"
QUARANTINE_PREFIX = "_quarantine-"
BATCH_PREFIX = "_batch-"

ID_COLUMNS = ["image_id", "batch_id", "scored_date", "model_name", "model_version"]
FLOAT_FEATURES = ["feat_mean", "feat_std", "feat_p01", "feat_p99", "feat_aspect",
                  "feat_emb_mean", "feat_emb_std", "feat_emb_norm"]
INT_FEATURES = ["feat_height", "feat_width", "feat_bit_depth"]
NUMERIC_FEATURES = ["feat_mean", "feat_std", "feat_p01", "feat_p99", "feat_height", "feat_width",
                    "feat_aspect", "feat_bit_depth", "feat_emb_mean", "feat_emb_std",
                    "feat_emb_norm"]
CATEGORICAL_FEATURES = ["view", "laterality", "body_region", "source_format"]
LABEL = "label"
PROB_PREFIX, DECISION_PREFIX, FEATURE_PREFIX = "prob_", "decision_", "feat_"
QUARANTINE_COLUMNS = ["image_id", "batch_id", "source_suffix", "reason"]

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def prediction_log_root(artifact_root: str) -> str:
    """``<artifact_root>/prediction_log``."""
    return storage.join(artifact_root, PREDICTION_LOG)


PARTITION_RE = re.compile(r"date=(\d{4}-\d{2}-\d{2})")


def partition_uri(log_root: str, date: str) -> str:
    """The folder of one day's partition: ``<log_root>/date=YYYY-MM-DD``.

    Raises:
        ValueError: ``date`` is not ``YYYY-MM-DD``.
    """
    if not _DATE.match(date):
        raise ValueError(f"partition date must be YYYY-MM-DD, got {date!r}")
    return storage.join(log_root, f"date={date}")


def part_uri(partition: str, batch_id: str) -> str:
    """``<partition>/part-<batch_id>.parquet``."""
    return storage.join(partition, f"{PART_PREFIX}{batch_id}.parquet")


def quarantine_uri(partition: str, batch_id: str) -> str:
    """``<partition>/_quarantine-<batch_id>.parquet`` (skipped by dataset readers)."""
    return storage.join(partition, f"{QUARANTINE_PREFIX}{batch_id}.parquet")


def batch_summary_uri(partition: str, batch_id: str) -> str:
    """``<partition>/_batch-<batch_id>.json``: the batch's summary (skipped by dataset readers)."""
    return storage.join(partition, f"{BATCH_PREFIX}{batch_id}.json")


def list_parts(partition: str) -> list[str]:
    """The prediction part files of one partition, sorted."""
    return [u for u in storage.list_files(partition, (".parquet",))
            if u.replace("\\", "/").rsplit("/", 1)[-1].startswith(PART_PREFIX)]


def reference_dir(artifact_root: str, model_name: str, version: str) -> str:
    """``<artifact_root>/reference/<model_name>/v<version>``."""
    return storage.join(artifact_root, REFERENCE, model_name, f"v{version}")


def class_columns(class_names: list[str]) -> list[str]:
    """``prob_<c>``, ``decision_<c>`` for every class, in class order."""
    out: list[str] = []
    for c in class_names:
        out += [f"{PROB_PREFIX}{c}", f"{DECISION_PREFIX}{c}"]
    return out


def log_columns(class_names: list[str]) -> list[str]:
    """Every column of a prediction-log part or a reference table, in file order."""
    return (ID_COLUMNS + class_columns(class_names) + NUMERIC_FEATURES + CATEGORICAL_FEATURES
            + [LABEL])


def arrow_schema(class_names: list[str]):
    """The pyarrow schema every part and reference file is written with.

    A fixed schema keeps parts of different days readable as one dataset (e.g. ``label`` stays a
    string column even when every value is still null).
    """
    import pyarrow as pa

    fields = [(c, pa.string()) for c in ID_COLUMNS]
    for c in class_names:
        fields += [(f"prob_{c}", pa.float64()), (f"decision_{c}", pa.int64())]
    fields += [(c, pa.int64() if c in INT_FEATURES else pa.float64()) for c in NUMERIC_FEATURES]
    fields += [(c, pa.string()) for c in CATEGORICAL_FEATURES + [LABEL]]
    return pa.schema(fields)


def write_table(uri: str, df, class_names: list[str]) -> str:
    """Write ``df`` (columns of :func:`log_columns`) with :func:`arrow_schema`, atomically."""
    import io

    buf = io.BytesIO()
    df[log_columns(class_names)].to_parquet(buf, index=False, schema=arrow_schema(class_names))
    return storage.write_bytes(uri, buf.getvalue())
