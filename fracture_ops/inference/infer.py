"""The ``infer`` step: score new studies with the champion model into the prediction log.

``fracture-ops infer INCOMING [--date YYYY-MM-DD]`` walks INCOMING (a folder or ``s3://``
prefix) for ``.png``/``.jpg``/``.jpeg``/``.dcm`` files, resolves ``models:/fracture-classifier
@champion`` to its version, and writes one Parquet part per batch into
``<artifact_root>/prediction_log/date=<date>/`` (layout: :mod:`fracture_ops.model.prediction_log`).

Privacy: DICOM files are de-identified (PS3.15 Annex E, :mod:`fracture_ops.deid`) before
anything reads them; rows are keyed by ``image_id`` = a keyed hash (HMAC with the de-id secret)
of the file's URI, since real file names carry patient names. Nothing here logs a path.

Idempotence: ``batch_id`` hashes the sorted ``image_id`` of every input plus the model version,
so a rerun over the same files replaces ``part-<batch_id>.parquet``; a different input set on the
same day adds a part. Images already scored (or quarantined) by another batch of the day's
partition are not scored again (``image_id`` stays unique per partition). Two runs for the
same date must not run concurrently (Airflow: one active run per date).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.errors import BadInputError, ConfigError, ErrorBudgetExceeded
from fracture_ops.model import prediction_log as layout
from fracture_ops.registry.client import CHAMPION_URI, ModelRef, resolve_model
from fracture_ops.inference.score import (
    IMAGE_SUFFIXES,
    ScoreInput,
    ScoreResult,
    load_scorer,
    score_inputs,
)

log = logging.getLogger(__name__)
STEP = "infer"
DEFAULT_MODEL_URI = CHAMPION_URI
SUMMARY_QUARANTINE_LIMIT = 50  # the summary travels through XCom: list a few, the files list all


class ScoringConfig(StepConfig):
    """Options shared by the ``infer`` and ``reference`` steps."""

    model_uri: str = Field(DEFAULT_MODEL_URI,
                           description="models:/<name>@<alias> or models:/<name>/<version>")
    batch_size: int = Field(32, ge=1, le=4096, description="images per forward pass")
    workers: int = Field(2, ge=1, le=64, description="threads decoding images")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0,
                                    description="fail when more of the inputs are quarantined")
    allow_dev_secret: bool = Field(False, description="demos/tests only: built-in de-id secret "
                                   "when $FRACTURE_OPS_DEID_SECRET is unset")
    deid: dict[str, Any] = Field(default_factory=dict, description="DeidConfig options for DICOM "
                                 "inputs (e.g. blank_regions, shift_dates)")


def _today_utc() -> str:
    return datetime.now(UTC).date().isoformat()


class InferConfig(ScoringConfig):
    """Config of the ``infer`` step (YAML section ``infer``)."""

    section: ClassVar[str] = "infer"
    incoming_uri: str = Field("data/incoming", description="folder or s3:// prefix of new studies "
                              "(searched recursively)")
    date: str = Field("", validate_default=True,
                      description="partition date YYYY-MM-DD (Airflow: {{ ds }}); "
                                  "default: today UTC")
    cam_positives: bool = Field(False, description="write Grad-CAM overlays of positive images")
    prediction_log_uri: str = Field("", description="default <artifact_root>/prediction_log")

    @field_validator("date")
    @classmethod
    def _check_date(cls, value: str) -> str:
        if not value:
            return _today_utc()
        try:
            return datetime.strptime(str(value), "%Y-%m-%d").date().isoformat()
        except ValueError as exc:
            raise ValueError(f"date must be YYYY-MM-DD, got {value!r}") from exc

    def log_root(self) -> str:
        return self.prediction_log_uri or layout.prediction_log_root(self.artifact_root)


def deid_config(cfg: ScoringConfig):
    """The :class:`~fracture_ops.deid.config.DeidConfig` applied to DICOM inputs.

    Raises:
        ConfigError: ``cfg.deid`` holds an unknown or invalid option.
    """
    from pydantic import ValidationError

    from fracture_ops.deid.config import DeidConfig

    try:
        return DeidConfig(artifact_root=cfg.artifact_root, run_id=cfg.run_id,
                          allow_dev_secret=cfg.allow_dev_secret, **cfg.deid)
    except (ValidationError, TypeError) as exc:
        raise ConfigError(f"invalid deid options: {exc}") from exc


def input_identity(uri: str) -> str:
    """The string an input's ``image_id`` is derived from: its absolute path or S3 URI."""
    return uri if storage.is_s3(uri) else Path(uri).resolve().as_posix()


def list_inputs(incoming_uri: str, keys) -> list[ScoreInput]:
    """Every image file under ``incoming_uri``, with its keyed, PHI-free ``image_id``.

    Raises:
        BadInputError: a local ``incoming_uri`` that is not a folder.
    """
    if not storage.is_s3(incoming_uri) and not Path(incoming_uri).is_dir():
        raise BadInputError("infer: the incoming folder does not exist")
    uris = storage.list_files(incoming_uri, IMAGE_SUFFIXES)
    items = [ScoreInput(keys.image_id(input_identity(u)), u) for u in uris]
    return sorted(items, key=lambda i: i.image_id)


def batch_id_for(image_ids: list[str], ref: ModelRef) -> str:
    """Hash of the sorted input ids and the model version (16 hex digits)."""
    digest = hashlib.sha256(f"{ref.name}\x1f{ref.version}".encode())
    for image_id in sorted(image_ids):
        digest.update(b"\x1e" + image_id.encode())
    return digest.hexdigest()[:16]


def handled_elsewhere(partition: str, batch_id: str) -> tuple[set[str], set[str]]:
    """``image_id`` values the partition's other batches scored, and those they quarantined.

    Both are skipped: an image stays unique per partition, and a broken file left in a growing
    incoming folder is reported once, not again by (and against the budget of) every new batch.
    """
    scored: set[str] = set()
    quarantined: set[str] = set()
    for uri in storage.list_files(partition, (".parquet",)):
        name = uri.replace("\\", "/").rsplit("/", 1)[-1]
        if name in (f"{layout.PART_PREFIX}{batch_id}.parquet",
                    f"{layout.QUARANTINE_PREFIX}{batch_id}.parquet"):
            continue
        target = (scored if name.startswith(layout.PART_PREFIX)
                  else quarantined if name.startswith(layout.QUARANTINE_PREFIX) else None)
        if target is not None:
            frame = pd.read_parquet(io.BytesIO(storage.read_bytes(uri)), columns=["image_id"])
            target.update(frame["image_id"].astype(str))
    return scored, quarantined - scored


def finalize_rows(rows: pd.DataFrame, batch_id: str, date: str, ref: ModelRef) -> pd.DataFrame:
    """Add the id columns (batch, date, model) to scored rows."""
    out = rows.copy()
    out["batch_id"], out["scored_date"] = batch_id, date
    out["model_name"], out["model_version"] = ref.name, ref.version
    return out


def quarantine_frame(result: ScoreResult, batch_id: str) -> pd.DataFrame:
    """The quarantined inputs by ``image_id``, with their reasons (no paths)."""
    rows = [{"image_id": q.item.image_id, "batch_id": batch_id,
             "source_suffix": Path(q.item.uri).suffix.lower(), "reason": q.reason}
            for q in result.quarantined]
    return pd.DataFrame(rows, columns=layout.QUARANTINE_COLUMNS).astype(str)


def check_budget(bad: int, attempted: int, max_bad_fraction: float, what: str,
                 stopped_early: bool = False) -> None:
    """Raise when more than ``max_bad_fraction`` of the ``attempted`` inputs (``bad`` of them)
    were quarantined, or when scoring stopped early because of it.

    Raises:
        ErrorBudgetExceeded: the budget was exceeded.
    """
    if stopped_early or (attempted and bad / attempted > max_bad_fraction):
        raise ErrorBudgetExceeded(f"{what}: {bad} of {attempted} input(s) quarantined"
                                  f"{' (stopped early)' if stopped_early else ''}, more "
                                  f"than max_bad_fraction={max_bad_fraction}")


class _CamWriter:
    """Writes a Grad-CAM overlay (``cam/<image_id>.png``) for every positive image of a batch."""

    def __init__(self, model_pt: str, class_names: list[str], folder: str):
        from fracture_ops.model.gradcam import GradCamExplainer, load_classifier, overlay

        self._explainer_cls, self._overlay = GradCamExplainer, overlay
        self.loaded = load_classifier(model_pt)
        self.class_names, self.folder = class_names, folder
        self.explainers: dict[str, Any] = {}
        self.count = 0

    def __call__(self, batch, out: dict) -> None:
        from PIL import Image

        for i, loaded in enumerate(batch):
            positive = np.flatnonzero(out["decisions"][i])
            if not len(positive):
                continue
            name = self.class_names[int(positive[np.argmax(out["probs"][i, positive])])]
            if name not in self.explainers:
                self.explainers[name] = self._explainer_cls(self.loaded, name)
            cam = self.explainers[name].explain(loaded.image).cam
            buf = io.BytesIO()
            Image.fromarray(self._overlay(loaded.image, cam)).save(buf, format="PNG")
            storage.write_bytes(storage.join(self.folder, "cam", f"{loaded.item.image_id}.png"),
                                buf.getvalue())
            self.count += 1

    def close(self) -> None:
        for explainer in self.explainers.values():
            explainer.close()


def _cam_writer(cfg: InferConfig, scorer, out_dir: str) -> _CamWriter | None:
    if not cfg.cam_positives:
        return None
    try:
        return _CamWriter(scorer.model_pt, scorer.class_names, out_dir)
    except ImportError as exc:  # the explain extra (pytorch-grad-cam) is optional
        log.warning("cam_positives: Grad-CAM unavailable (%s); no overlays written", exc)
        return None


def batch_summary(cfg: InferConfig, b: Batch) -> dict:
    """The summary of a batch before scoring (rows and quarantine counts at zero)."""
    ids = {i.image_id for i in b.items}
    return {"step": STEP, "model_name": b.ref.name, "model_version": b.ref.version,
            "model_uri": b.ref.uri, "batch_id": b.batch_id, "date": cfg.date,
            "partition": b.partition, "part_uri": None, "inputs": len(b.items),
            "already_scored": len(ids & b.scored), "already_quarantined": len(ids & b.quarantined),
            "rows": 0,
            "quarantined": 0, "quarantine": [], "decode_warnings": 0, "cam_overlays": 0,
            "output_dir": cfg.output_dir(STEP)}


@dataclass
class Batch:
    """What one scoring batch of a date works on (see :func:`prepare_batch`)."""

    keys: Any
    deid: Any
    items: list[ScoreInput]
    ref: ModelRef
    batch_id: str
    partition: str
    scored: set[str]
    quarantined: set[str]
    todo: list[ScoreInput]


def prepare_batch(cfg: InferConfig) -> Batch:
    """List the incoming files, pin the model version, name the batch and leave out what the
    date's partition already holds (shared by ``infer`` and the sharded plan).

    Raises:
        ConfigError: no incoming_uri, a non-registry model_uri, no de-id secret, bad deid options.
        BadInputError: missing incoming folder, or no such registered model/alias.
    """
    from fracture_ops.deid.config import load_keys

    if not cfg.incoming_uri:
        raise ConfigError(f"{cfg.section}: incoming_uri is not set")
    storage.check_data_uri(cfg.incoming_uri, f"{cfg.section}: incoming_uri")
    dcfg = deid_config(cfg)
    keys = load_keys(dcfg)
    items = list_inputs(cfg.incoming_uri, keys)
    ref = resolve_model(cfg.model_uri)
    batch_id = batch_id_for([i.image_id for i in items], ref)
    partition = layout.partition_uri(cfg.log_root(), cfg.date)
    scored, bad = handled_elsewhere(partition, batch_id)
    todo = [i for i in items if i.image_id not in scored and i.image_id not in bad]
    return Batch(keys, dcfg, items, ref, batch_id, partition, scored, bad, todo)


def infer_step(cfg: InferConfig) -> dict:
    """Score every image under ``cfg.incoming_uri`` into the day's prediction-log partition.

    Returns:
        The summary (also in ``_SUCCESS`` of the run folder and ``_batch-<batch_id>.json``):
        ``rows``, ``quarantined``, ``partition``, ``part_uri``, ``model_version``, ``batch_id``...

    Raises:
        ConfigError: no incoming_uri, a non-registry model_uri, no de-id secret, bad deid options.
        BadInputError: missing incoming folder, or no such registered model/alias.
        ErrorBudgetExceeded: more than ``max_bad_fraction`` of the inputs quarantined (the
            partition is then left unchanged; the run folder holds ``quarantine.json``).
    """
    b = prepare_batch(cfg)
    out_dir = cfg.output_dir(STEP)
    storage.reset_dir(out_dir)
    write_resolved(cfg, out_dir)
    summary = batch_summary(cfg, b)
    if not b.todo:
        log.warning("infer: nothing to score (%d input(s), %d already handled in the partition)",
                    len(b.items), len(b.items))
        storage.mark_success(out_dir, summary)
        return summary
    result, class_names, stats = score_batch(cfg, b.todo, b.ref, b.keys, b.deid, out_dir)
    quarantine = quarantine_frame(result, b.batch_id)
    storage.write_json(storage.join(out_dir, "quarantine.json"), quarantine.to_dict("records"))
    check_budget(len(result.quarantined), len(b.todo), cfg.max_bad_fraction, STEP,
                 result.stopped_early)
    summary.update(stats)
    write_batch(b.partition, b.batch_id, finalize_rows(result.rows, b.batch_id, cfg.date, b.ref),
                quarantine, class_names, summary)
    storage.mark_success(out_dir, summary)
    log.info("infer: %d row(s), %d quarantined, model %s v%s, batch %s", summary["rows"],
             summary["quarantined"], b.ref.name, b.ref.version, b.batch_id)
    return summary


def score_batch(cfg: InferConfig, todo: list[ScoreInput], ref: ModelRef, keys, dcfg,
                 out_dir: str) -> tuple[ScoreResult, list[str], dict]:
    """Load the model and score ``todo`` (with CAM overlays when asked); returns the result,
    the class names and run statistics for the summary."""
    scorer = load_scorer(ref, cfg.device)
    cam = _cam_writer(cfg, scorer, out_dir)
    t0 = time.perf_counter()
    try:
        result = score_inputs(todo, scorer, keys, dcfg, batch_size=cfg.batch_size,
                              workers=cfg.workers, max_bad=int(cfg.max_bad_fraction * len(todo)),
                              desc="infer", on_batch=cam)
    finally:
        if cam is not None:
            cam.close()
    seconds = time.perf_counter() - t0
    stats = {"decode_warnings": result.warnings, "cam_overlays": cam.count if cam else 0,
             "seconds": round(seconds, 3), "images_per_s": round(len(todo) / max(seconds, 1e-9), 2)}
    return result, scorer.class_names, stats


def write_batch(partition: str, batch_id: str, rows: pd.DataFrame, quarantine: pd.DataFrame,
                 class_names: list[str], summary: dict) -> None:
    """Write the part (replacing an earlier run's), its quarantine table and its summary."""
    summary.update(part_uri=layout.write_table(layout.part_uri(partition, batch_id), rows,
                                               class_names),
                   rows=len(rows), quarantined=len(quarantine),
                   quarantine=quarantine[["image_id", "reason"]]
                   .head(SUMMARY_QUARANTINE_LIMIT).to_dict("records"),
                   quarantine_uri=layout.quarantine_uri(partition, batch_id))
    storage.write_parquet(summary["quarantine_uri"], quarantine)
    storage.write_json(layout.batch_summary_uri(partition, batch_id), summary)


def add_scoring_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``infer`` and ``reference``."""
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("--model-uri", help=f"registry URI (default {DEFAULT_MODEL_URI})")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default 32)")
    parser.add_argument("--max-bad-fraction", type=float,
                        help="error budget: largest quarantined share of the inputs (default 0.1)")
    parser.add_argument("--allow-dev-secret", action="store_true", default=None,
                        help="demos only: built-in de-id secret when "
                             "$FRACTURE_OPS_DEID_SECRET is unset")
    add_common_args(parser)


def scoring_flags(args: argparse.Namespace) -> dict:
    """Explicit CLI flags of :func:`add_scoring_args` as config fields."""
    return {"model_uri": args.model_uri, "batch_size": args.batch_size,
            "max_bad_fraction": args.max_bad_fraction, "allow_dev_secret": args.allow_dev_secret}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops infer INCOMING [--date D] [--model-uri U] [--cam-positives]``."""
    parser.add_argument("incoming", nargs="?", metavar="INCOMING",
                        help="folder or s3:// prefix of new studies (or incoming_uri in config)")
    parser.add_argument("--date", help="partition date YYYY-MM-DD (default: today UTC)")
    parser.add_argument("--cam-positives", action="store_true", default=None,
                        help="write Grad-CAM overlays of positive images into the run folder")
    add_scoring_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the infer step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(InferConfig, args, incoming_uri=args.incoming, date=args.date,
                           cam_positives=args.cam_positives, **scoring_flags(args))
    return infer_step(cfg)
