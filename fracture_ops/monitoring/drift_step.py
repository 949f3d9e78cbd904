"""The ``drift`` step: an Evidently drift report of one prediction-log window vs the reference.

Reads the prediction log's partitions ``<artifact_root>/prediction_log/date=YYYY-MM-DD/*.parquet``
of the window (``window_days`` days up to and including ``date``), keeps the rows of one model
version (``model_version``, default the version most common in the window), and compares them with
that version's reference table ``<artifact_root>/reference/<model_name>/v<version>/reference.parquet``
(see :mod:`fracture_ops.monitoring.drift`).

Writes, per report date, ``<artifact_root>/monitoring/drift/<date>/``: ``report.html`` (Evidently's
report behind a "Drift detected"/"No drift detected" banner; self-contained), ``summary.json``,
``config.resolved.yaml`` and ``_SUCCESS`` last; then rebuilds the index page
``<artifact_root>/monitoring/drift/index.html``. Logs one MLflow run per date to the experiment
``fracture-drift`` (run name ``drift-<date>``, tag ``report_date``); rerunning a date overwrites
that date's folder and reuses its run. A window with fewer than ``min_rows`` rows gives a report
that says so (``status: insufficient_data``), not a failure: a quiet day is not an error.

The returned summary carries ``drift_detected`` so the DAG can mark the run and emit an asset event.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import time
from pathlib import Path
from typing import ClassVar

import pandas as pd
from pydantic import Field, field_validator

from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.errors import BadInputError
from fracture_ops.registry.client import CLASSIFIER
from fracture_ops.model import prediction_log as layout
from fracture_ops.monitoring import index as pages
from fracture_ops.monitoring.drift import DriftOutcome, DriftSettings, analyse_drift, has_label

log = logging.getLogger(__name__)

STEP = "drift"
EXPERIMENT = "fracture-drift"
PARTITION_RE = layout.PARTITION_RE


class DriftConfig(StepConfig, DriftSettings):
    """Config of the ``drift`` step (YAML section ``drift``); thresholds: see ``DriftSettings``."""

    section: ClassVar[str] = STEP
    date: str | None = None  # report date YYYY-MM-DD; None = the newest partition in the log
    window_days: int = Field(1, ge=1, le=366, description="days of the prediction log, up to and "
                             "including the report date, compared with the reference")
    model_name: str = CLASSIFIER
    model_version: str | None = None  # None = the version most common in the window
    min_rows: int = Field(30, ge=1)
    prediction_log_uri: str = ""  # default <artifact_root>/prediction_log
    reference_uri: str = ""  # default <artifact_root>/reference/<model_name>/v<version>/reference.parquet
    log_mlflow: bool = True

    @field_validator("date", mode="before")
    @classmethod
    def _iso_date(cls, value):
        if isinstance(value, dt.date):  # YAML reads `date: 2026-11-05` (and --set date=..) as a date
            return value.isoformat()[:10]
        if value is not None:
            dt.date.fromisoformat(str(value))  # ValueError -> a ConfigError naming the field
        return value

    @field_validator("model_version", mode="before")
    @classmethod
    def _version_text(cls, value):
        return None if value is None else str(value).lstrip("v")


def drift_root(cfg: DriftConfig) -> str:
    """``<artifact_root>/monitoring/drift``: the date folders and the index page."""
    return storage.join(cfg.artifact_root, "monitoring", "drift")


def _log_root(cfg: DriftConfig) -> str:
    return cfg.prediction_log_uri or layout.prediction_log_root(cfg.artifact_root)


def partition_dates(log_root: str) -> list[str]:
    """Dates of the prediction log's partitions that hold Parquet files, oldest first."""
    found = {m.group(1) for uri in storage.list_files(log_root, (".parquet",))
             if (m := PARTITION_RE.search(uri))}
    return sorted(found)


def window_dates(end: str, days: int) -> list[str]:
    """The ``days`` dates up to and including ``end``, oldest first."""
    last = dt.date.fromisoformat(end)
    return [(last - dt.timedelta(days=k)).isoformat() for k in range(days - 1, -1, -1)]


def read_window(log_root: str, dates: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate the partitions of ``dates``.

    Returns:
        ``(rows, partition files read)``; no rows (an empty frame) when none exist.
    """
    # the part files only: quarantine lists and batch summaries beside them are not rows
    files = [u for d in dates for u in layout.list_parts(layout.partition_uri(log_root, d))]
    frames = [storage.read_parquet(u) for u in files]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), files


def select_model_rows(window: pd.DataFrame, model_name: str,
                      version: str | None) -> tuple[pd.DataFrame, str | None, list[str]]:
    """Rows of one model version; the version defaults to the window's most common one.

    Returns:
        ``(rows, version, notes)``; ties go to the highest version number.
    """
    notes: list[str] = []
    if window.empty:
        return window, version, notes
    if "model_name" in window.columns:
        other = window["model_name"].astype(str) != model_name
        if other.any():
            notes.append(f"{int(other.sum())} rows of other models left out")
        window = window[~other]
    if "model_version" not in window.columns:
        return window, version, notes
    versions = window["model_version"].astype(str).str.lstrip("v")
    if version is None and len(versions):
        counts = versions.value_counts()
        top = counts[counts == counts.max()].index
        version = max(top, key=lambda v: (int(v) if v.isdigit() else -1, v))
    keep = versions == version
    if (~keep).any():
        notes.append(f"{int((~keep).sum())} rows of other versions of {model_name} left out")
    return window[keep].reset_index(drop=True), version, notes


def reference_location(cfg: DriftConfig, version: str) -> str:
    """The reference table of ``version`` (the contract's path unless ``reference_uri`` is set)."""
    if cfg.reference_uri:
        return cfg.reference_uri
    return storage.join(layout.reference_dir(cfg.artifact_root, cfg.model_name, version),
                        layout.REFERENCE_FILE)


def read_reference(uri: str) -> pd.DataFrame:
    """Read a finished reference table.

    Raises:
        BadInputError: the table or its ``_SUCCESS`` marker is missing, or it has no rows.
    """
    folder = uri.rstrip("/").rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)
    if not storage.exists(uri) or not storage.is_complete(folder):
        raise BadInputError(f"drift: no finished reference table at {uri} (build it by scoring "
                            "the model version's validation split)")
    table = storage.read_parquet(uri)
    if table.empty:
        raise BadInputError(f"drift: the reference table {uri} has no rows")
    return table


def _thresholds(cfg: DriftConfig) -> dict:
    return {k: getattr(cfg, k) for k in (
        "drift_share_threshold", "num_stattest", "cat_stattest", "stattest_threshold",
        "per_column_stattest", "per_column_threshold", "critical_features", "min_rows")}


def build_summary(cfg: DriftConfig, date: str, dates: list[str], rows: dict, version,
                  ref_uri: str | None, outcome: DriftOutcome | None, notes: list[str]) -> dict:
    """The ``summary.json`` document of one report date."""
    summary = {
        "report_date": date, "window": {"start": dates[0], "end": dates[-1], "days": len(dates)},
        "model_name": cfg.model_name, "model_version": version, "reference_uri": ref_uri,
        "rows": rows, "thresholds": _thresholds(cfg), "status": "insufficient_data",
        "drift_detected": False, "reasons": [], "drift_share": None, "drifted_features": [],
        "features": {}, "prediction_drift": {"columns": {}, "drifted": [], "decision_rate": {}},
        "performance": {"status": "skipped", "note": "not enough rows"}, "notes": list(notes)}
    if outcome is None:
        return summary
    drifted = sorted((c for c, r in outcome.features.items() if r["drifted"]))
    summary.update({
        "status": "ok", "drift_detected": outcome.drift_detected, "reasons": outcome.reasons,
        "drift_share": outcome.drift_share, "n_drifted_features": outcome.n_drifted,
        "n_features": len(outcome.features), "features": outcome.features,
        "drifted_features": [{"column": c, **{k: outcome.features[c][k] for k in
                                              ("score", "method", "threshold")}} for c in drifted],
        "prediction_drift": {"columns": outcome.predictions,
                             "drifted": sorted(c for c, r in outcome.predictions.items() if r["drifted"]),
                             "decision_rate": outcome.decision_rate},
        "performance": outcome.performance, "notes": list(notes) + outcome.notes})
    return summary


def _evidently_html(outcome: DriftOutcome) -> str:
    """One Evidently page from the drift snapshot and, when present, the quality snapshot."""
    from evidently.core.metric_types import metric_tests_widget
    from evidently.core.report import Snapshot, metric_tests_stats
    from evidently.legacy.renderers.html_widgets import header_text

    merged = outcome.snapshots[0].dump_dict()
    tests = list(outcome.snapshots[0].tests_results)
    for extra in outcome.snapshots[1:]:
        part = extra.dump_dict()
        merged["widgets"] += [header_text(label="Model quality on labelled rows").dict(),
                              *part["widgets"]]
        merged["metric_results"].update(part["metric_results"])
        merged["top_level_metrics"] += part["top_level_metrics"]
        tests += list(extra.tests_results)
    if tests:  # one test table for both snapshots, not one each
        merged["tests_widgets"] = [metric_tests_stats(tests).dict(), metric_tests_widget(tests).dict()]
    return Snapshot.load_dict(merged).get_html_str(as_iframe=False)


def render_report(summary: dict, outcome: DriftOutcome | None) -> str:
    """The date's self-contained report page: banner first, then Evidently's panels."""
    title = f"Drift report {summary['report_date']}"
    if outcome is None:
        return pages.standalone_page(summary, title)
    page = pages.insert_banner(_evidently_html(outcome), pages.report_banner(summary), title)
    page, replaced = pages.make_self_contained(page)
    log.debug("drift: %d remote references neutralised in the report", replaced)
    return page


def _metric_key(text: str) -> str:
    return re.sub(r"[^\w\-./ ]", "_", text)


def _mlflow_metrics(summary: dict) -> dict[str, float]:
    rows = summary["rows"]
    out = {"drift_detected": float(summary["drift_detected"]),
           "rows_window": rows["window"], "rows_reference": rows.get("reference") or 0,
           "rows_window_labelled": rows["window_labelled"]}
    if summary["status"] != "ok":
        return out
    out.update({"drift_share": summary["drift_share"],
                "n_drifted_features": summary["n_drifted_features"]})
    out.update({_metric_key(f"drift_score/{c}"): r["score"] for c, r in summary["features"].items()})
    pred = summary["prediction_drift"]
    out.update({_metric_key(f"prediction_drift_score/{c}"): r["score"]
                for c, r in pred["columns"].items()})
    out.update({_metric_key(f"decision_rate/{c}"): r["window"] for c, r in pred["decision_rate"].items()})
    perf = summary["performance"]
    if perf.get("status") == "ok":
        for side in ("window", "reference"):
            out.update({f"quality_{side}/{k}": v for k, v in perf[side].items() if v is not None})
    return {k: float(v) for k, v in out.items() if v is not None and v == v}


def log_to_mlflow(summary: dict, files: list[str]) -> str:
    """Log one date's report to ``fracture-drift``, reusing the run tagged with that date.

    Returns:
        The MLflow run id.
    """
    from fracture_ops.tracking import setup

    mlflow = setup(EXPERIMENT)
    date = summary["report_date"]
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    found = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.report_date = '{date}'",
                               output_format="list", order_by=["attributes.start_time ASC"])
    run_id = found[0].info.run_id if found else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"drift-{date}") as run:
        mlflow.set_tags({"report_date": date, "model_name": summary["model_name"],
                         "model_version": str(summary["model_version"]), "status": summary["status"],
                         "drift_detected": str(summary["drift_detected"]).lower(),
                         "window": f"{summary['window']['start']}..{summary['window']['end']}",
                         # thresholds as tags, not params: params are immutable and a rerun
                         # with other thresholds must be able to overwrite them
                         **{f"threshold.{k}": str(v)[:500] for k, v in summary["thresholds"].items()}})
        mlflow.log_metrics(_mlflow_metrics(summary))
        for uri in files:
            with storage.local_path(uri) as path:
                mlflow.log_artifact(str(path), artifact_path="drift")
        return run.info.run_id


def _report_date(cfg: DriftConfig, log_root: str) -> str:
    if cfg.date:
        return cfg.date
    dates = partition_dates(log_root)
    if not dates:
        raise BadInputError(f"drift: no prediction-log partitions under {log_root}; give a date")
    return dates[-1]


def _analyse(cfg: DriftConfig, rows: pd.DataFrame, version: str | None, notes: list[str]):
    """Reference rows, its URI and the outcome; no outcome when the window is too small."""
    if len(rows) < cfg.min_rows or version is None:
        notes.append(f"the window holds {len(rows)} rows of the model, fewer than min_rows="
                     f"{cfg.min_rows}: no drift analysis")
        return None, None, None
    ref_uri = reference_location(cfg, version)
    reference = read_reference(ref_uri)
    return reference, ref_uri, analyse_drift(reference, rows, cfg)


def drift_step(cfg: DriftConfig) -> dict:
    """Write the drift report of one date, rebuild the index, log to MLflow.

    Returns:
        Summary for XCom: ``report_date``, ``drift_detected``, ``reasons``, ``drift_share``,
        ``drifted_features`` (names), ``status``, ``model_version``, row count, the URIs and the
        MLflow run id.

    Raises:
        BadInputError: no partitions and no date, or the version's reference table is missing.
        ConfigError: an unknown statistical test.
    """
    started = time.perf_counter()
    log_root = _log_root(cfg)
    date = _report_date(cfg, log_root)
    dates = window_dates(date, cfg.window_days)
    window, files = read_window(log_root, dates)
    rows, version, notes = select_model_rows(window, cfg.model_name, cfg.model_version)
    reference, ref_uri, outcome = _analyse(cfg, rows, version, notes)
    counts = {"window": int(len(rows)), "window_all_models": int(len(window)),
              "partition_files": len(files), "window_labelled": int(has_label(rows).sum()),
              "reference": None if reference is None else int(len(reference))}
    summary = build_summary(cfg, date, dates, counts, version, ref_uri, outcome, notes)
    out = storage.join(drift_root(cfg), date)
    storage.reset_dir(out)
    report_uri = storage.write_text(storage.join(out, pages.REPORT), render_report(summary, outcome))
    summary_uri = storage.write_json(storage.join(out, pages.SUMMARY), summary)
    write_resolved(cfg, out)
    run_id = log_to_mlflow(summary, [report_uri, summary_uri]) if cfg.log_mlflow else None
    result = {"report_date": date, "status": summary["status"],
              "drift_detected": summary["drift_detected"], "reasons": summary["reasons"],
              "drift_share": summary["drift_share"],
              "drifted_features": [d["column"] for d in summary["drifted_features"]],
              "prediction_drift": summary["prediction_drift"]["drifted"],
              "model_version": version, "rows_window": counts["window"],
              "report_uri": report_uri, "summary_uri": summary_uri, "mlflow_run_id": run_id}
    storage.mark_success(out, result)
    result["index_uri"] = pages.write_index(drift_root(cfg))
    log.info("drift %s: %s (share %s, %d rows, %.1f s)", date,
             "DRIFT" if result["drift_detected"] else summary["status"], summary["drift_share"],
             counts["window"], time.perf_counter() - started)
    return result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops drift [--date 2026-11-05 --window-days 1 --model-version 3]``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    parser.add_argument("--date", help="report date YYYY-MM-DD (default: newest log partition)")
    parser.add_argument("--newest", action="store_true",
                        help="report on the newest log partition (the default without --date)")
    parser.add_argument("--model-name", help=f"registered model (default {CLASSIFIER})")
    parser.add_argument("--model-version", help="version to compare (default: most common in window)")
    parser.add_argument("--no-mlflow", dest="log_mlflow", action="store_false", default=None,
                        help="do not log to the fracture-drift MLflow experiment")
    add_field_flags(parser, DriftConfig, "window_days", "drift_share_threshold")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the drift step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(DriftConfig, args, date=args.date, model_name=args.model_name,
                           model_version=args.model_version, log_mlflow=args.log_mlflow)
    return drift_step(cfg)
