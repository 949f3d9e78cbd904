"""The ``cv`` step: patient-grouped, label-stratified K-fold cross-validation over the training
patients, with the ``train`` step's own code, and pooled out-of-fold AUROC with patient-bootstrap
intervals.

Why: on a small data set the validation slice of one split (a few dozen images) picks the epoch
and the thresholds by noise, and takes images away from training. Cross-validation uses every
training patient for both, and tells the user what to expect and how long to train.

Per fold ``k`` the training pool (every row of the split that is not ``test``; the test rows stay
untouched) is divided so that fold ``k``'s patients are the validation rows and the others the
training rows; ``train`` runs on that (``weights=last`` by default: every epoch runs, nothing is
chosen on the held-out fold, so its predictions are honest out-of-fold predictions). Outputs under
``<artifact_root>/runs/<run_id>/cv/``:

- ``splits/fold-<k>.parquet``, ``fold-<k>/`` (each fold's train folder: weights, predictions,
  history);
- ``oof/predictions.parquet`` + ``model_info.json``: every training-pool image's out-of-fold logit,
  in the predictions contract (``split = val``, plus ``fold``), so calibration and thresholds can be
  fitted on them;
- ``cv.json``: per-fold and pooled AUROC with patient-bootstrap intervals, the mean validation
  AUROC per epoch across folds and the epoch count it recommends; ``_SUCCESS`` last.

MLflow: a parent run ``cv-<run_id>`` holding the pooled figures, with one child run per fold.
A rerun reuses the folds that finished with the same configuration (a killed run resumes).
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import write_resolved
from fracture_ops.errors import ConfigError, ManifestError
from fracture_ops.model.outputs import (
    label_columns,
    logit_columns,
    probabilities,
    targets,
    write_predictions,
)
from fracture_ops.training.train import RECIPE_FLAGS, TrainConfig, resume_key, train_step

log = logging.getLogger(__name__)
STEP = "cv"


class CVConfig(TrainConfig):
    """Config of the ``cv`` step: the ``train`` step's fields plus the folds."""

    section: ClassVar[str] = STEP
    folds: int = Field(5, ge=2, le=20, description="number of cross-validation folds")
    weights: Literal["best", "last"] = Field(
        "last", description="weights each fold keeps: last (no choice made on the held-out fold; "
        "honest out-of-fold predictions) or best (picks an epoch on the held-out fold: optimistic)")
    n_bootstrap: int = Field(1000, ge=100, le=100_000, description="patient-bootstrap resamples")


def training_pool(table: pd.DataFrame) -> pd.DataFrame:
    """The rows cross-validation may use: every row of a split table that is not ``test``, or
    every row of a manifest without a split column."""
    if "split" in table.columns:
        table = table[table["split"].astype(str) != "test"]
    return table.reset_index(drop=True)


def assign_folds(pool: pd.DataFrame, strata: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number (0..folds-1) of each row: patients whole in one fold, folds stratified by
    ``strata`` (scikit-learn's ``StratifiedGroupKFold``).

    Raises:
        ManifestError: fewer patients than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    groups = pool["patient_id"].astype(str).to_numpy()
    if len(np.unique(groups)) < folds:
        raise ManifestError(f"cv: {len(np.unique(groups))} patients cannot fill {folds} folds")
    out = np.full(len(pool), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(pool)), strata, groups)):
        out[held] = k
    return out


def outcome_strata(pool: pd.DataFrame, cfg: CVConfig) -> np.ndarray:
    if cfg.task == "multilabel":
        cols = [f"lbl_{c}" for c in cfg.class_names if f"lbl_{c}" in pool.columns]
        return pool[cols[0]].to_numpy() if cols else np.zeros(len(pool))
    labels = pool[cfg.label_column].astype(str)
    return (labels == cfg.class_names[0]).to_numpy(int) if cfg.task == "binary" else labels.to_numpy()


def _fold_config(cfg: CVConfig, k: int, split_uri: str, parent: str) -> TrainConfig:
    fields = cfg.model_dump(exclude={"section", "folds", "n_bootstrap"})
    fields.update(split_uri=split_uri, step_folder=f"{STEP}/fold-{k + 1}", mlflow_parent_run_id=parent)
    return TrainConfig(**fields)


def _fold_done(fold_cfg: TrainConfig, fold_table: pd.DataFrame) -> bool:
    """A fold trained with this configuration on exactly this fold's rows (the split file's path
    is the same for every run: its content is compared, by the train step's split hash)."""
    from fracture_ops.data.manifest import manifest_hash, table_hash

    out = fold_cfg.output_dir(fold_cfg.step_folder)
    key, info_uri = storage.join(out, "resume_key.txt"), storage.join(out, catalog.MODEL_INFO.file)
    if not (storage.is_complete(out) and storage.exists(key) and storage.exists(info_uri)
            and storage.read_text(key).strip() == resume_key(fold_cfg)):
        return False
    info = storage.read_json(info_uri)
    return (info.get("split_hash") == table_hash(fold_table, ["image_id", "patient_id", "split"])
            and info.get("manifest_hash") == manifest_hash(fold_table.drop(columns=["split"])))


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None


def _pooled(oof: pd.DataFrame, task: str, class_names: list[str], n_boot: int, seed: int) -> dict:
    """Pooled out-of-fold AUROC of the first class (binary: the positive class; macro over
    classes otherwise) with a patient-bootstrap 95% interval."""
    from fracture_ops.evaluation.bootstrap import bootstrap_ci
    from fracture_ops.evaluation.metrics import compute_metrics

    y = targets(oof, class_names)
    probs = probabilities(oof[logit_columns(class_names)].to_numpy(np.float64), task)
    thresholds = np.full(len(class_names), 0.5)
    key = (class_names[0], "auroc") if task == "binary" else (None, "auroc_macro")
    point = compute_metrics(y, probs, task, class_names, thresholds)[key]
    ci = bootstrap_ci(y, probs, oof["patient_id"].astype(str).to_numpy(), task, class_names,
                      thresholds, n_resamples=n_boot, seed=seed)["ci"].get(key, (None, None))
    return {"auroc": round(float(point), 4), "ci95": [None if v is None else round(float(v), 4) for v in ci],
            "metric": key[1] if key[0] is None else f"{key[0]}/auroc"}


def cv_step(cfg: CVConfig) -> dict:
    """Cross-validate the training recipe of ``cfg`` over the split's training patients.

    Raises:
        ConfigError: no ``split_uri``.
        ManifestError: fewer patients than folds, or a fold without both outcomes.
    """
    from fracture_ops import tracking
    from fracture_ops.cli_common import progress

    from fracture_ops.training.distributed import from_env

    if from_env().enabled:  # small data (cv's use) needs no second GPU; the folds are separate runs
        raise ConfigError("cv runs in one process: run it without torchrun (fit takes the cv "
                          "path only below cv_below_images training images)")
    cfg = cfg.with_split()
    if not storage.exists(cfg.split_uri):
        raise ConfigError(f"cv: no split table at {cfg.split_uri}")
    out = cfg.output_dir(STEP)
    pool = training_pool(storage.read_parquet(cfg.split_uri))
    fold = assign_folds(pool, outcome_strata(pool, cfg), cfg.folds, cfg.seed)
    storage.write_text(storage.join(out, "folds.json"),
                       pool.assign(fold=fold)[["patient_id", "fold"]].drop_duplicates()
                       .astype({"patient_id": str}).to_json(orient="records"))
    mlflow = tracking.setup(cfg.experiment)
    with mlflow.start_run(run_name=f"cv-{cfg.run_id}",
                          tags={"fracture_ops.step": STEP, "backbone": cfg.backbone}) as parent:
        mlflow.log_params(tracking.flatten(cfg.model_dump(mode="json")))
        parent_id = parent.info.run_id
    frames, histories, per_fold = [], [], []
    for k in progress(range(cfg.folds), "cv folds", total=cfg.folds):
        split_uri = storage.join(out, "splits", f"fold-{k + 1}.parquet")
        fold_table = pool.drop(columns=["split"], errors="ignore").assign(
            split=np.where(fold == k, "val", "train"))
        storage.write_parquet(split_uri, fold_table)
        fold_cfg = _fold_config(cfg, k, split_uri, parent_id)
        if _fold_done(fold_cfg, storage.read_parquet(split_uri)):
            log.info("cv: fold %d/%d already trained with this configuration", k + 1, cfg.folds)
        else:
            train_step(fold_cfg)
        fold_dir = fold_cfg.output_dir(fold_cfg.step_folder)
        preds = storage.read_parquet(storage.join(fold_dir, catalog.PREDICTIONS.file))
        val = preds[preds["split"] == "val"].assign(fold=k + 1)
        frames.append(val)
        histories.append([h["val_auroc"] for h in storage.read_json(storage.join(fold_dir, "history.json"))])
        y = val[label_columns(cfg.class_names)[0]].to_numpy()
        p = val[logit_columns(cfg.class_names)[0]].to_numpy()
        per_fold.append({"fold": k + 1, "images": len(val), "patients": int(val["patient_id"].nunique()),
                         "auroc": _auroc(y, p)})
    oof = pd.concat(frames, ignore_index=True)
    write_predictions(storage.join(out, "oof"), oof, cfg.task, cfg.class_names)
    curves = np.array([h for h in histories if len(h) == cfg.epochs], dtype=float)
    mean_curve = np.nanmean(curves, axis=0) if len(curves) else np.array([])
    recommended = int(np.nanargmax(mean_curve)) + 1 if mean_curve.size and np.isfinite(mean_curve).any() else cfg.epochs
    pooled = _pooled(oof, cfg.task, cfg.class_names, cfg.n_bootstrap, cfg.seed)
    summary = {"step": STEP, "folds": cfg.folds, "images": len(oof),
               "patients": int(oof["patient_id"].nunique()), "per_fold": per_fold,
               "pooled": pooled, "mean_val_auroc_per_epoch": [round(float(v), 4) for v in mean_curve],
               "recommended_epochs": recommended, "weights": cfg.weights,
               "oof_uri": storage.join(out, "oof"), "mlflow_run_id": parent_id}
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_metrics({"cv_auroc_pooled": pooled["auroc"], "recommended_epochs": recommended,
                            **{f"cv_auroc_fold{f['fold']}": f["auroc"] for f in per_fold
                               if f["auroc"] is not None}})
    storage.write_json(storage.join(out, "cv.json"), summary)
    write_resolved(cfg, out)
    storage.mark_success(out, summary)
    log.info("cv: pooled out-of-fold AUROC %.4f (95%% CI %s), folds %s, recommended epochs %d",
             pooled["auroc"], pooled["ci95"], [f["auroc"] for f in per_fold], recommended)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops cv SPLIT --folds 5 --backbone B --image-size S --epochs E``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    parser.add_argument("split", nargs="?", help="split.parquet of the split step (its test rows "
                        "are left out) or a manifest (every row is used)")
    add_field_flags(parser, CVConfig, "folds", "backbone", "image_size", "epochs", "batch_size",
                    "lr", "loss", "seed", "weights", "pretrained_path", "device", "boxes_uri",
                    *RECIPE_FLAGS)
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the cv step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    return cv_step(config_from_args(CVConfig, args, split_uri=args.split))
