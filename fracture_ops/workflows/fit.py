"""The ``fit`` step (the training DAG's ``train`` task): the train/val path for a large data set,
cross-validation and a refit for a small one.

A small data set (fewer training-pool images than ``cv_below_images``, and enough patients of
each outcome to fill every fold; else the train/val path, with a warning) loses too much to a
held-out validation slice: the slice is small, so the epoch picked on it and the thresholds tuned
on it are noise, and its images never train the model. There ``fit`` runs the ``cv`` step, then
``train --refit`` on every training patient with the folds' schedule (same epochs: the
out-of-fold logits then describe the refitted model; ``cv.json`` recommends an epoch count for
the next run), and writes
the train folder the later steps expect, with one difference they need not know about: its
``val`` rows are the folds' out-of-fold predictions (each image predicted by a model that never
saw its patient), so ``calibrate`` and ``tune-thresholds`` fit on every training patient instead
of a slice, and never on a test row. ``model_info.json`` says which path ran (``fit_path``).

A large data set takes the ``train`` step as it is (best epoch on validation, early stopping).
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar, Literal

import pandas as pd
from pydantic import Field

from fracture_ops import storage
from fracture_ops.errors import ConfigError
from fracture_ops.model.outputs import MODEL_INFO_FILE, PREDICTIONS_FILE, write_predictions
from fracture_ops.training.train import RECIPE_FLAGS, TrainConfig, train_step
from fracture_ops.workflows.cv import CVConfig, cv_step, training_pool

log = logging.getLogger(__name__)
STEP = "fit"


class FitConfig(CVConfig):
    """Config of the ``fit`` step: the ``train`` and ``cv`` fields plus the switch between them."""

    section: ClassVar[str] = STEP
    weights: Literal["best", "last"] = Field(
        "best", description="weights of the train/val path: best (early stopping on validation "
        "AUROC) or last")
    cv_below_images: int = Field(1000, ge=0, le=1_000_000, description="cross-validate, then "
                                 "refit on every training patient, when the training pool "
                                 "(train + val) holds fewer images than this; 0: never")


def _why_not_cv(pool: pd.DataFrame, cfg: FitConfig) -> str:
    """Why the train/val path is taken ("" when cross-validation is): a large data set, or too
    few patients with (or without) the positive label to give every fold both outcomes."""
    from fracture_ops.workflows.cv import outcome_strata

    if len(pool) >= cfg.cv_below_images:
        return f"{len(pool)} training images >= cv_below_images={cfg.cv_below_images}"
    strata = pd.Series(outcome_strata(pool, cfg), index=pool.index).astype(str)
    per_class = pool.assign(_s=strata).groupby("_s")["patient_id"].nunique()
    if len(per_class) < 2 or int(per_class.min()) < cfg.folds:
        log.warning("fit: a small data set, but %s patients per outcome cannot give %d folds "
                    "both outcomes: falling back to the train/val path",
                    per_class.to_dict(), cfg.folds)
        return f"too few patients per outcome for {cfg.folds} folds: {per_class.to_dict()}"
    return ""


def _train_fields(cfg: FitConfig) -> dict:
    return cfg.model_dump(exclude={"folds", "n_bootstrap", "cv_below_images"})


def fit_step(cfg: FitConfig) -> dict:
    """Train on ``cfg.split_uri`` by the path its size calls for; the train folder either way.

    Raises:
        ConfigError: no ``split_uri``.
        ManifestError: as ``train`` and ``cv``.
    """
    cfg = cfg.with_split()
    if not storage.exists(cfg.split_uri):
        raise ConfigError(f"fit: no split table at {cfg.split_uri}")
    pool = training_pool(storage.read_parquet(cfg.split_uri))
    reason = _why_not_cv(pool, cfg)
    if reason:
        log.info("fit: the train/val path (%s)", reason)
        summary = train_step(TrainConfig(**_train_fields(cfg)))
        if "rank" in summary:  # a torchrun process other than rank 0: rank 0 records the path
            return summary
        return _record_path(summary, "train", {"fit_reason": reason})
    log.info("fit: %d training images < %d: %d-fold cross-validation, then a refit on all of them",
             len(pool), cfg.cv_below_images, cfg.folds)
    cv = cv_step(CVConfig(**cfg.model_dump(exclude={"cv_below_images", "weights"})))
    # the refit runs the folds' schedule (same epochs), so the out-of-fold logits that calibration
    # and thresholds fit on describe it; cv.json's recommended epochs are for the next run
    refit = train_step(TrainConfig(**{**_train_fields(cfg), "refit": True}))
    out = refit["train_dir"]
    storage.unmark_success(out)  # not final until its val rows are the out-of-fold predictions
    info = storage.read_json(storage.join(out, MODEL_INFO_FILE))
    test_rows = storage.read_parquet(storage.join(out, PREDICTIONS_FILE))
    oof = storage.read_parquet(storage.join(cv["oof_uri"], PREDICTIONS_FILE))
    # val rows: the out-of-fold predictions (calibration and thresholds fit on them); test rows:
    # the refit model's
    write_predictions(out, pd.concat([oof, test_rows], ignore_index=True), info["task"],
                      info["class_names"])
    extra = {"cv_uri": storage.join(cfg.output_dir("cv"), "cv.json"),
             "cv_auroc_pooled": cv["pooled"]["auroc"], "cv_auroc_ci95": cv["pooled"]["ci95"],
             "val_rows": "out-of-fold predictions of the cv folds"}
    storage.write_json(storage.join(out, MODEL_INFO_FILE), {**info, "fit_path": "cv+refit", **extra})
    return _record_path(refit, "cv+refit", extra)


def _record_path(summary: dict, path: str, extra: dict) -> dict:
    out = summary["train_dir"]
    if path == "train":
        storage.unmark_success(out)
        info = storage.read_json(storage.join(out, MODEL_INFO_FILE))
        storage.write_json(storage.join(out, MODEL_INFO_FILE), {**info, "fit_path": path, **extra})
    summary = {**summary, "fit_path": path, **extra}
    storage.mark_success(out, summary)  # again, last: the folder is final only now
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops fit SPLIT [--cv-below-images N] --backbone B --epochs E ...``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    parser.add_argument("split", nargs="?", help="split.parquet from the split step")
    add_field_flags(parser, FitConfig, "cv_below_images", "folds", "backbone", "image_size",
                    "epochs", "batch_size", "lr", "loss", "seed", "pretrained_path", "device",
                    "boxes_uri",
                    *RECIPE_FLAGS)
    from fracture_ops.training.distributed import add_launch_flag

    add_launch_flag(parser)
    add_common_args(parser)


def takes_cv_path(args: argparse.Namespace) -> bool:
    """Whether ``fit`` with these arguments cross-validates (a small data set): the launcher
    then runs it as one process whatever ``--nproc-per-node`` asks (folds are separate, short
    runs; several GPUs serve the large-data path). False when the config or split cannot be
    read: the step itself then reports why."""
    from fracture_ops.cli_common import config_from_args
    from fracture_ops.errors import FractureOpsError

    try:
        cfg = config_from_args(FitConfig, args, split_uri=args.split).with_split()
        return storage.exists(cfg.split_uri) and not _why_not_cv(
            training_pool(storage.read_parquet(cfg.split_uri)), cfg)
    except (FractureOpsError, OSError, ValueError, KeyError):
        return False


def run_cli(args: argparse.Namespace) -> dict:
    """Run the fit step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    return fit_step(config_from_args(FitConfig, args, split_uri=args.split))
