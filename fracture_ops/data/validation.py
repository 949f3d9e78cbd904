"""The ``validate`` step: check a manifest and its images, quarantine bad rows with a reason.

Two kinds of checks:

- **Table checks** (Great Expectations 1.x suite on the manifest DataFrame, ephemeral context):
  schema and types, non-null and well-formed ids, unique image ids, label/view/laterality domains
  (row level: failing rows are found through GX's ``unexpected_index_list``), and class prevalence
  within bounds (table level: reported, and failing the step unless ``fail_on_table_checks`` is off).
- **Image checks** (:func:`check_images`, a thread pool over :func:`~fracture_ops.data.images.read_image`):
  the file exists and decodes, its size and bit depth are within bounds, it is not blank, and its
  pixels are not shared with another patient's image.

Policies, stated once:

- A row may fail several checks; ``reason`` in ``quarantine.parquet`` lists them all (``;``-joined,
  in :data:`REASONS` order) and ``detail`` says why in words. Rows sharing an ``image_id`` are all
  quarantined: nothing tells which one is right.
- Exact pixel duplicates (SHA-256 of the decoded 8-bit image) within one patient are fine (repeat
  exports). Across patients the image's identity is in doubt (which patient is it?) and it would
  leak between splits: by default (``cross_patient_duplicates="quarantine_all"``) every copy is
  quarantined with the same reason, the detail naming the whole group, for a person to review.
  ``"keep_first"`` keeps the first copy (by ``image_id``, among copies with no other failure) when
  all copies carry the same label; when the labels differ every copy is quarantined anyway.
- Truncated JPEGs follow :mod:`fracture_ops.data.images`: nearly complete ones pass with a
  ``truncated: ...`` warning listed in the summary and report; the others are quarantined as
  ``truncated_image``.
- Outputs never depend on the clock; ``_SUCCESS`` is written last and only when the step passes.
  Past the error budget the reports are written first, then :class:`ErrorBudgetExceeded` is raised.
- Logs and reports name rows by ``image_id`` only (file names may still carry PHI before the
  ``deidentify`` step); ``quarantine.parquet`` keeps the full rows for the data owner.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.data import images
from fracture_ops.data.image_checks import ImageResult, RowFailures, check_images
from fracture_ops.data.manifest import (
    BINARY_LABELS,
    BOX_COLUMNS,
    LATERALITIES,
    MANIFEST_COLUMNS,
    MULTILABEL_PREFIX,
    REQUIRED_COLUMNS,
    VIEWS,
    normalize_manifest,
)
from fracture_ops.data.validation_report import render_html, summarise
from fracture_ops.errors import ErrorBudgetExceeded, ManifestError

log = logging.getLogger(__name__)

__all__ = [  # check_images and its result types live in image_checks; they are part of this API
    "ImageResult", "RowFailures", "TableResult", "ValidateConfig", "build_expectation_suite",
    "check_boxes", "check_images", "configure_parser", "run_cli", "split_clean_quarantine",
    "validate_manifest_table", "validate_step",
]

REASONS = (  # order of reasons within a row's ``reason`` string
    "missing_image_id", "duplicate_image_id", "missing_image_uri", "missing_patient_id",
    "malformed_patient_id", "missing_label", "unknown_label", "unknown_view",
    "unknown_laterality", "bad_type", "bad_multilabel", "outside_data_roots",
    "missing_file", "decode_error", "truncated_image", "image_too_small", "image_too_large",
    "bad_bit_depth", "blank_image", "duplicate_across_patients",
)


class ValidateConfig(StepConfig):
    """Configuration of the ``validate`` step (YAML section ``validate``)."""

    section: ClassVar[str] = "validate"

    manifest_uri: str = Field("", description="manifest to validate (Parquet, or CSV read as "
                              "strings); empty: this run's ingest manifest in the raw zone")
    boxes_uri: str | None = Field(None, description="optional box side table (BOX_COLUMNS)")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="error budget: fail when a "
                                    "larger share of the rows is quarantined")
    allowed_labels: list[str] | None = Field(
        list(BINARY_LABELS), description="label domain; null accepts any label (multi-class)")
    allowed_views: list[str] = Field(list(VIEWS))
    allowed_lateralities: list[str] = Field(list(LATERALITIES))
    min_prevalence: float = Field(0.01, ge=0.0, le=1.0, description="min fraction per label")
    max_prevalence: float = Field(0.99, ge=0.0, le=1.0, description="max fraction per label")
    patient_id_regex: str = r"^[A-Za-z0-9._-]{1,64}$"
    min_image_size: int = Field(32, ge=1, description="min width and height in pixels")
    max_image_size: int = Field(20000, ge=1, description="max width and height in pixels")
    allowed_bit_depths: list[int] = Field([8, 10, 12, 14, 16])
    blank_std_threshold: float = Field(1e-3, ge=0.0, description="pixel std below this = blank")
    max_truncated_fraction: float = Field(images.DEFAULT_MAX_MISSING_FRACTION, ge=0.0, le=1.0)
    cross_patient_duplicates: Literal["keep_first", "quarantine_all"] = Field(
        "quarantine_all", description="identical pixels under different patients: quarantine "
        "every copy for review, or keep the first when all copies share a label")
    fail_on_table_checks: bool = True
    check_images: bool = True
    workers: int = Field(2, ge=1, le=64, description="threads for the image checks")
    data_roots: list[str] = Field(
        default_factory=storage.data_roots,
        description="image_uri must resolve under one of these (default $FRACTURE_OPS_DATA_ROOTS,"
        " else the roots the ingest step recorded beside the manifest); others are quarantined "
        "unread")

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_prevalence > self.max_prevalence:
            raise ValueError("min_prevalence must not exceed max_prevalence")
        if self.min_image_size > self.max_image_size:
            raise ValueError("min_image_size must not exceed max_image_size")
        return self


@dataclass
class TableResult:
    """Outcome of the GX suite: row failures plus one summary per expectation."""

    failures: RowFailures
    checks: list[dict]


# --------------------------------------------------------------------------- table checks (GX)

def build_expectation_suite(cfg: ValidateConfig, labels: Sequence[str] | None = None,
                            multilabel_columns: Sequence[str] = ()):
    """Build the GX suite for a manifest.

    Each expectation's ``meta`` says its ``level`` (``row``: failing rows are quarantined with
    ``meta["reason"]``; ``table``: reported) so results can be mapped back without guessing.

    Args:
        cfg: the step config.
        labels: labels whose prevalence is bounded (default: ``cfg.allowed_labels``).
        multilabel_columns: ``lbl_*`` columns present, each checked to hold 0/1.

    Returns:
        a ``great_expectations.ExpectationSuite``.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    row = lambda reason: {"level": "row", "reason": reason}
    table = {"level": "table"}
    exp = [gxe.ExpectColumnToExist(column=c, meta=table) for c in REQUIRED_COLUMNS]
    exp += [gxe.ExpectColumnValuesToBeOfType(column=c, type_="str", meta=row("bad_type"))
            for c in MANIFEST_COLUMNS]
    for col, reason in (("image_id", "missing_image_id"), ("image_uri", "missing_image_uri"),
                        ("patient_id", "missing_patient_id"), ("label", "missing_label")):
        exp.append(gxe.ExpectColumnValuesToNotBeNull(column=col, meta=row(reason)))
    exp += [
        gxe.ExpectColumnValuesToBeUnique(column="image_id", meta=row("duplicate_image_id")),
        gxe.ExpectColumnValuesToMatchRegex(column="patient_id", regex=cfg.patient_id_regex,
                                           meta=row("malformed_patient_id")),
        gxe.ExpectColumnValuesToBeInSet(column="view", value_set=list(cfg.allowed_views),
                                        meta=row("unknown_view")),
        gxe.ExpectColumnValuesToBeInSet(column="laterality", meta=row("unknown_laterality"),
                                        value_set=list(cfg.allowed_lateralities)),
    ]
    if cfg.allowed_labels is not None:
        exp.append(gxe.ExpectColumnValuesToBeInSet(column="label", meta=row("unknown_label"),
                                                   value_set=list(cfg.allowed_labels)))
    for label in labels if labels is not None else (cfg.allowed_labels or []):
        # prevalence(label) >= min  <=>  >= min of the labelled rows are in {label}
        exp.append(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[label],
                                                   mostly=cfg.min_prevalence, meta=table))
        # prevalence(label) <= max  <=>  >= 1 - max of the labelled rows are not in {label}
        exp.append(gxe.ExpectColumnValuesToNotBeInSet(column="label", value_set=[label],
                                                      mostly=round(1 - cfg.max_prevalence, 12),
                                                      meta=table))
    exp += [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[0, 1], meta=row("bad_multilabel"))
            for c in multilabel_columns]
    # the constructor, unlike add_expectation, needs no active data context
    return gx.ExpectationSuite(name="fracture_ops_manifest", expectations=exp)


def _run_suite(df: pd.DataFrame, suite):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network calls from a pipeline step
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # keep logs readable
    asset = context.data_sources.add_pandas("manifest").add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": df})
    return batch.validate(suite, result_format={"result_format": "COMPLETE"})


def validate_manifest_table(df: pd.DataFrame, cfg: ValidateConfig) -> TableResult:
    """Run the GX suite over a manifest and map failing values back to rows.

    Args:
        df: the manifest (its positional order defines the row keys of the result).
        cfg: the step config.

    Returns:
        :class:`TableResult` with row-level failures and one dict per expectation.

    Raises:
        ManifestError: a required column is missing (no row can be judged then).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest lacks required column(s): {', '.join(missing)}")
    data = df.reset_index(drop=True)
    for col in MANIFEST_COLUMNS:  # optional columns absent: nothing to check, not a failure
        if col not in data.columns:
            data[col] = None
    labels = cfg.allowed_labels
    if labels is None:
        labels = sorted(str(v) for v in data["label"].dropna().unique())
    multi = [c for c in data.columns if c.startswith(MULTILABEL_PREFIX)]
    result = _run_suite(data, build_expectation_suite(cfg, labels, multi))
    failures, checks = RowFailures(), []
    for res in result.results:
        conf, meta, info = res.expectation_config, res.expectation_config.meta or {}, res.result
        checks.append({
            "expectation": conf.type, "column": conf.kwargs.get("column"),
            "value_set": conf.kwargs.get("value_set"), "mostly": conf.kwargs.get("mostly"),
            "level": meta.get("level"), "success": bool(res.success),
            "unexpected_count": info.get("unexpected_count"),
            "unexpected_percent": info.get("unexpected_percent"),
            "error": (res.exception_info or {}).get("exception_message"),
        })
        if meta.get("level") == "row" and not res.success:
            for idx in info.get("unexpected_index_list") or []:
                failures.add(int(idx), meta["reason"], f"{conf.kwargs.get('column')} "
                             f"{meta['reason'].replace('_', ' ')}")
    checks.sort(key=lambda c: (c["level"] or "", c["expectation"], str(c["column"]),
                               str(c["value_set"])))
    return TableResult(failures, checks)


# --------------------------------------------------------------------------- step

def _read_table(uri: str) -> pd.DataFrame:
    try:
        if uri.lower().endswith(".csv"):
            return pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str)
        return storage.read_parquet(uri)
    except FileNotFoundError as exc:
        raise ManifestError(f"table not found: {uri}") from exc
    except (ValueError, OSError) as exc:
        raise ManifestError(f"cannot read table {uri}: {exc}") from exc


def split_clean_quarantine(df: pd.DataFrame, failures: RowFailures
                           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows by failures; quarantine gets ``reason`` and ``detail`` columns.

    Every row lands in exactly one of the two tables (clean + quarantine = input).
    """
    data = df.reset_index(drop=True)
    bad = sorted(failures.reasons)
    order = {r: k for k, r in enumerate(REASONS)}
    quarantine = data.iloc[bad].copy()
    quarantine["reason"] = [";".join(sorted(failures.reasons[i], key=lambda r: order.get(r, 99)))
                            for i in bad]
    quarantine["detail"] = ["; ".join(failures.details.get(i, [])) for i in bad]
    clean = data.drop(index=bad)
    return clean.reset_index(drop=True), quarantine.reset_index(drop=True)


def check_boxes(boxes: pd.DataFrame, manifest: pd.DataFrame, clean_ids: set[str]
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep boxes of clean images with sane coordinates; return ``(clean, quarantined)``.

    Raises:
        ManifestError: the box table lacks a column of :data:`BOX_COLUMNS`.
    """
    missing = [c for c in BOX_COLUMNS if c not in boxes.columns]
    if missing:
        raise ManifestError(f"box table lacks column(s): {', '.join(missing)}")
    b = boxes.reset_index(drop=True)
    xy = b[["x_min", "y_min", "x_max", "y_max", "img_w", "img_h"]].apply(pd.to_numeric,
                                                                           errors="coerce")
    sane = ((xy.x_min >= 0) & (xy.y_min >= 0) & (xy.x_min < xy.x_max) & (xy.y_min < xy.y_max)
            & (xy.x_max <= xy.img_w) & (xy.y_max <= xy.img_h))
    known = b["image_id"].isin(set(manifest["image_id"].dropna()))
    reason = np.select([~known, ~sane, ~b["image_id"].isin(clean_ids)],
                       ["unknown_image", "invalid_box", "image_quarantined"], default="")
    bad = reason != ""
    return (b[~bad].reset_index(drop=True),
            b[bad].assign(reason=reason[bad]).reset_index(drop=True))


def image_roots(cfg: ValidateConfig) -> list[str]:
    """Where images may be read from: the configured data roots, else the ones the ingest step
    recorded in the ``report.json`` beside the manifest (the source's own folder), else none
    (only the scheme and ``..`` checks of :func:`fracture_ops.storage.uri_problem` apply)."""
    if cfg.data_roots:
        return list(cfg.data_roots)
    uri = cfg.manifest_uri
    parent = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)
    report = storage.join(parent, "report.json")
    if storage.exists(report):
        roots = storage.read_json(report).get("data_roots") or []
        return [str(r) for r in roots]
    return []


def check_image_roots(df: pd.DataFrame, roots: list[str], failures: RowFailures) -> set[int]:
    """Quarantine rows whose ``image_uri`` is not a local path or s3:// URI under ``roots``
    (absolute paths elsewhere, ``..`` climbing out, another bucket, other schemes); those files
    are never opened. Returns their row positions."""
    bad = set()
    for i, uri in enumerate(df["image_uri"].tolist()):
        if not isinstance(uri, str) or not uri:
            continue
        problem = storage.image_uri_problem(uri, roots)
        if problem:
            failures.add(i, "outside_data_roots", f"image_uri {problem}")
            bad.add(i)
    return bad


def validate_step(cfg: ValidateConfig) -> dict:
    """Validate a manifest and its images; write clean/quarantine tables and reports.

    Writes under ``cfg.raw_dir("validate")`` (the raw zone: these name the source's ids and
    paths): ``summary.json``, ``report.html``, ``quarantine.parquet``, ``manifest.clean.parquet``,
    ``image_checks.parquet`` (when images are checked), ``boxes.clean.parquet``/
    ``boxes.quarantine.parquet`` (with ``boxes_uri``), ``config.resolved.yaml`` and, last and only
    on success, ``_SUCCESS``. The dataset store (``cfg.output_dir("validate")``) gets
    ``summary.json`` and ``report.html`` naming rows by number only, and ``_SUCCESS``.

    Returns:
        a small JSON-able summary (counts, verdict, output URIs).

    Raises:
        ManifestError: unreadable/empty manifest, missing columns, or failed table checks.
        ErrorBudgetExceeded: more than ``max_bad_fraction`` of the rows were quarantined.
    """
    if not cfg.manifest_uri:  # a manual chain: this run's finished ingest (and its boxes)
        manifest = cfg.run_input("validate")
        boxes = storage.join(manifest.rsplit("/", 1)[0], catalog.INGEST_BOXES.file)
        cfg = cfg.model_copy(update={
            "manifest_uri": manifest,
            "boxes_uri": cfg.boxes_uri or (boxes if storage.exists(boxes) else None)})
        log.info("validate: this run's ingest manifest %s", cfg.manifest_uri)
    out, public = cfg.raw_dir("validate"), cfg.output_dir("validate")
    df = normalize_manifest(_read_table(cfg.manifest_uri))
    if df.empty:
        raise ManifestError(f"manifest {cfg.manifest_uri} has no rows")
    table = validate_manifest_table(df, cfg)
    failures, warnings, facts = table.failures, {}, None
    outside = check_image_roots(df, image_roots(cfg), failures)
    if cfg.check_images:
        imgs = check_images(df, cfg, already_bad=set(failures.reasons), skip=outside)
        failures.merge(imgs.failures)
        warnings, facts = imgs.warnings, imgs.facts
    bad_rows = sorted(failures.reasons)
    clean, quarantine = split_clean_quarantine(df, failures)
    summary = summarise(cfg, df, clean, quarantine, table.checks, warnings)
    storage.reset_dir(out)
    storage.reset_dir(public)
    files = _write_outputs(cfg, out, df, clean, quarantine, facts, summary)
    files["report_uri"] = _write_public(public, summary, bad_rows, quarantine, warnings)
    for row, reason in zip(bad_rows, quarantine["reason"]):
        log.warning("quarantined row %d of the manifest: %s", row, reason)
    result = {k: summary[k] for k in ("rows", "clean", "quarantined", "bad_fraction", "verdict")}
    result.update(files, warnings=len(summary["warnings"]))
    if summary["verdict"] == "error_budget_exceeded":
        raise ErrorBudgetExceeded(
            f"{summary['quarantined']} of {summary['rows']} rows quarantined "
            f"({summary['bad_fraction']:.1%} > budget {cfg.max_bad_fraction:.1%}); "
            f"see {files['report_uri']}")
    if summary["verdict"] == "table_checks_failed":
        raise ManifestError(f"manifest table checks failed: {', '.join(summary['failed_checks'])}; "
                            f"see {files['report_uri']}")
    storage.mark_success(out, result)
    storage.mark_success(public, result)
    return result


def _write_public(folder: str, summary: dict, bad_rows: list[int], quarantine: pd.DataFrame,
                  warnings: dict[int, list[str]]) -> str:
    """The dataset store's copy of the report: counts, checks, and quarantined rows and warnings
    by their row number in the raw-zone manifest; no id, path or detail text (details may quote
    values). Returns the report's URI."""
    view = dict(summary, warnings=[{"row": i, "warning": w} for i in sorted(warnings)
                                   for w in warnings[i]])
    storage.write_json(storage.join(folder, "summary.json"), view)
    table = pd.DataFrame({"row": bad_rows, "reason": quarantine["reason"].tolist()})
    return storage.write_text(storage.join(folder, "report.html"), render_html(view, table))


def _write_outputs(cfg, out, df, clean, quarantine, facts, summary) -> dict:
    j = lambda name: storage.join(out, name)
    if cfg.boxes_uri:
        boxes_clean, boxes_bad = check_boxes(_read_table(cfg.boxes_uri), df,
                                             set(clean["image_id"]))
        storage.write_parquet(j(catalog.CLEAN_BOXES.file), boxes_clean)
        storage.write_parquet(j("boxes.quarantine.parquet"), boxes_bad)
        summary["boxes"] = {"clean": len(boxes_clean), "quarantined": len(boxes_bad),
                            "reasons": dict(Counter(boxes_bad["reason"]))}
    storage.write_parquet(j(catalog.CLEAN_MANIFEST.file), clean)
    storage.write_parquet(j("quarantine.parquet"), quarantine)
    if facts is not None:
        storage.write_parquet(j("image_checks.parquet"), facts)
    storage.write_json(j(catalog.VALIDATE_SUMMARY.file), summary)
    storage.write_text(j(catalog.VALIDATE_REPORT.file), render_html(summary, quarantine))
    write_resolved(cfg, out)
    return {"clean_manifest_uri": j(catalog.CLEAN_MANIFEST.file),
            "quarantine_uri": j("quarantine.parquet"), "summary_uri": j(catalog.VALIDATE_SUMMARY.file),
            "report_uri": j(catalog.VALIDATE_REPORT.file)}


# --------------------------------------------------------------------------- CLI

def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fracture-ops validate``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    parser.add_argument("manifest", nargs="?", help="manifest URI (Parquet or CSV)")
    parser.add_argument("--manifest", dest="manifest_opt", metavar="URI",
                        help="manifest URI (alternative to the positional argument)")
    parser.add_argument("--boxes", metavar="URI", help="box side table to check alongside")
    add_field_flags(parser, ValidateConfig, "max_bad_fraction")
    parser.add_argument("--workers", type=int, help="threads for image checks (default 2)")
    parser.add_argument("--no-images", action="store_true", help="table checks only")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the step from parsed CLI arguments; returns its summary."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(
        ValidateConfig, args, manifest_uri=args.manifest_opt or args.manifest,
        boxes_uri=args.boxes, max_bad_fraction=args.max_bad_fraction, workers=args.workers,
        check_images=False if args.no_images else None)
    return validate_step(cfg)
