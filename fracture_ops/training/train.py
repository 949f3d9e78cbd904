"""The ``train`` step: split.parquet in; checkpoints, predictions and an MLflow run out.

Outputs under ``<artifact_root>/runs/<run_id>/train/``: ``best.pt``/``last.pt`` (full state, for
resume), ``model.pt`` (best weights + what is needed to rebuild the network), ``predictions.parquet``
and ``model_info.json`` (the evaluation steps' input: logits on val and test), ``history.json``,
``config.resolved.yaml``, ``mlflow_run.json`` and ``_SUCCESS``.

Started again on a folder that holds ``last.pt`` but no ``_SUCCESS`` (the process was killed),
the step resumes from the checkpoint and logs to the same MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.data.manifest import manifest_hash, table_hash
from fracture_ops.errors import ConfigError, ManifestError
from fracture_ops.model.network import BACKBONES
from fracture_ops.model.outputs import (
    MODEL_INFO_FILE,
    PREDICTIONS_FILE,
    label_columns,
    logit_columns,
    write_predictions,
)
from fracture_ops.registry.client import CLASSIFIER
from fracture_ops import envvars

log = logging.getLogger(__name__)


class TrainConfig(StepConfig):
    """Config of the ``train`` step."""

    section: ClassVar[str] = "train"
    split_uri: str = Field("", description="the split step's table; empty: this run's "
                           "(the step before train in the catalog, once it has finished)")
    task: Literal["binary", "multiclass", "multilabel"] = "binary"
    class_names: list[str] = ["fracture"]  # binary: the positive label
    label_column: str = "label"
    backbone: str = Field("tf_efficientnet_lite0", examples=BACKBONES,
                          description="timm backbone of the classifier (any timm model name; "
                          "tf_efficientnet_lite0/1/2 start from ImageNet weights installed with "
                          "the package)")
    pretrained_path: str | None = Field(
        "auto", description="starting weights: auto (the ImageNet weights installed from the "
        "package registry for tf_efficientnet_lite0/1/2; other backbones from scratch), "
        "pkg:efficientnet-lite0 (or lite1, lite2), a local weights file or Hugging Face cache "
        "folder (never downloaded); none or empty: train from scratch")
    image_size: int = Field(384, ge=32, le=1024, description="input side in pixels (320-512 on a "
                            "GPU, smaller for CPU demos)")
    epochs: int = Field(20, ge=1, le=500, description="training epochs (early stopping on "
                        "validation AUROC may stop sooner)")
    batch_size: int = Field(32, ge=1, le=1024, description="training batch size")
    lr: float = Field(1e-3, gt=0, le=1, description="peak learning rate of AdamW")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0,
                                description="AdamW weight decay (not on norms and biases)")
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0,
                                 description="linear learning-rate warm-up before the cosine")
    grad_clip: float = Field(1.0, ge=0.0, description="gradient norm clipping (0: off)")
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    patience: int = Field(5, ge=1, description="early stopping: epochs without a validation "
                          "AUROC gain before training stops")
    min_epochs: int = Field(3, ge=1, description="epochs trained before one may be kept or early "
                            "stopping counts (clamped to `epochs`): an epoch whose training loss "
                            "has not moved yet can score a high validation AUROC by chance")
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0, description="the backbone's learning "
                                     "rate as a fraction of `lr` (the head's); below 1 when "
                                     "fine-tuning pretrained weights")
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="layer-wise learning-rate decay: "
                               "each backbone stage learns this factor slower than the one above "
                               "it (timm's coarse grouping: stem, stages, the layers after them; "
                               "1: off)")
    head_warmup_epochs: float = Field(0.0, ge=0.0, description="epochs that train the head alone "
                                      "(the backbone's learning rate held at 0) before the whole "
                                      "network trains")
    freeze_bn: bool = Field(False, description="BatchNorm layers keep their pretrained running "
                            "statistics (eval mode) in training: for small batches")
    weights: Literal["best", "last"] = Field(
        "best", description="the weights the model keeps: best (the epoch with the highest "
        "validation AUROC, early stopping after `patience` epochs without gain) or last (every "
        "epoch runs; no choice made on the validation images: cross-validation folds)")
    loss: Literal["bce", "ce", "focal"] = Field("bce", description="loss: bce (binary, "
                                                "multi-label), focal, ce (multi-class)")
    focal_gamma: float = 2.0
    balanced: bool = False
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier "
                             "(0: off)")
    global_pool: Literal["avg", "max", "avgmax", "catavgmax"] = Field(
        "avg", description="pooling of the last feature map before the classifier: avg, max, "
        "avgmax (mean of both) or catavgmax (both side by side); max keeps a small finding from "
        "being averaged over the whole image")
    hflip: bool = Field(False, description="random horizontal flips in training (label-invariant "
                        "for fracture presence; off by default because left/right anatomy and "
                        "laterality markers can matter to other labels)")
    vflip: bool = Field(False, description="random vertical flips in training (label-invariant for "
                        "fracture presence; a limb radiograph upside down is still the same "
                        "finding)")
    rotate90: bool = Field(False, description="random quarter turns of the (square) training "
                           "input; with hflip and vflip, all eight orientations")
    clahe: bool = Field(False, description="contrast-limited adaptive histogram equalisation of "
                        "every image (training and serving)")
    rotate_limit: float = Field(10.0, ge=0, le=10, description="random rotation limit in degrees "
                                "(training; 0: off)")
    resize: Literal["letterbox", "squash"] = Field(
        "letterbox", description="image geometry in training and serving: letterbox (keep the "
        "proportions, pad to a square) or squash (stretch both sides to the size)")
    crop_scale: float = Field(0.85, ge=0.3, le=1.0, description="smallest area fraction of the "
                              "training random resized crop (1.0: no crop)")
    brightness_contrast: float = Field(0.1, ge=0.0, le=0.5, description="limit of the random "
                                       "brightness and contrast change in training (0: off)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="label smoothing of the "
                                   "training targets (0: off)")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="decay of the exponential moving "
                             "average of the weights (timm ModelEmaV3) that is validated and kept "
                             "instead of the raw weights; 0: off. Its warm-up caps the decay at "
                             "1-(1+step)^(-2/3): about 0.98 after 450 steps, 0.998 only after "
                             "~11,000, so short runs average over their last few dozen steps")
    mixup: float = Field(0.0, ge=0.0, le=4.0, description="mixup alpha (Zhang et al. 2018): each "
                         "training batch is blended with a shuffled copy, weight ~ Beta(alpha, "
                         "alpha), and the loss is the same blend of both targets' losses (0: off)")
    tta_hflip: bool = Field(False, description="test-time augmentation: every score (validation, "
                            "out-of-fold, test, serving) averages the logits of the image and of "
                            "its mirror image")
    box_weight: float = Field(0.0, ge=0.0, le=10.0, description="box supervision (binary task): "
                              "weight of a loss that teaches every cell of the last feature map "
                              "whether a box of the positive class reaches into it, from "
                              "`boxes_uri` (the training DAG: the run's de-identified boxes); "
                              "negatives count as boxes nowhere, positives without a "
                              "box train on their label alone; training only, the served model "
                              "is unchanged (0: off)")
    boxes_uri: str = Field("", description="box table (image_id, class_name, x_min, y_min, x_max, "
                           "y_max, img_w, img_h) keyed like the split's image ids, for "
                           "`box_weight`; empty or absent: no box supervision")
    workers: int = 0
    cache: bool = True
    cache_dir: str | None = None  # default <artifact_root>/cache/decoded
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1")
    seed: int = Field(0, ge=0, description="seed of the split, the training and the bootstrap")
    deterministic: bool = True
    experiment: str = CLASSIFIER
    refit: bool = Field(False, description="train on the train and val patients together for "
                        "`epochs` epochs and keep the last weights (no validation, no early "
                        "stopping); calibration and thresholds then come from the cv step's "
                        "out-of-fold predictions")
    # where the step writes, under the run folder (cross-validation trains into cv/fold-<k>)
    step_folder: str = Field("train", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    mlflow_parent_run_id: str | None = None  # shows the run under a parent (a CV run's folds)

    @model_validator(mode="after")
    def _warmup_needs_a_step_schedule(self) -> TrainConfig:
        """The head-only warm-up holds the backbone by step; plateau steps on scores."""
        if self.head_warmup_epochs > 0 and self.scheduler == "plateau":
            from fracture_ops.errors import ConfigError

            raise ConfigError("head_warmup_epochs needs the cosine or none scheduler, not plateau")
        return self

    def with_split(self) -> TrainConfig:
        """This config with its split table: the given one, else this run's (a manual chain
        shares one --run-id; refused unless the step before finished)."""
        if self.split_uri:
            return self
        return self.model_copy(update={"split_uri": self.run_input("train")})

    @model_validator(mode="after")
    def _refit_keeps_last(self) -> TrainConfig:
        """A refit has no validation images to choose an epoch on: it keeps the last weights."""
        if self.refit and self.weights != "last":
            object.__setattr__(self, "weights", "last")
        return self


def _split_frames(cfg: TrainConfig) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    if not storage.exists(cfg.split_uri):
        raise ConfigError(f"train: no split table at {cfg.split_uri}")
    table = storage.read_parquet(cfg.split_uri)
    parts = {s: table[table["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    if cfg.refit:  # every training patient trains; nothing is held out but the test set
        parts["train"] = table[table["split"] != "test"].reset_index(drop=True)
        parts["val"] = parts["val"].iloc[:0]
    for s in ("train",) if cfg.refit else ("train", "val"):
        if parts[s].empty:
            raise ManifestError(f"train: the {s} split of {cfg.split_uri} is empty")
    return table, parts


def _check_both_outcomes(targets: dict[str, np.ndarray], cfg: TrainConfig) -> None:
    """Model selection needs a defined validation AUROC: each class needs positives and negatives
    in train and val (for binary: some images labelled ``class_names[0]`` and some not)."""
    for s in ("train",) if cfg.refit else ("train", "val"):
        y = targets[s]
        pos = y.sum(0)
        bad = [cfg.class_names[k] for k in range(y.shape[1]) if pos[k] == 0 or pos[k] == len(y)]
        if bad and (cfg.task != "multiclass" or len(bad) == y.shape[1]):
            raise ManifestError(f"train: the {s} split has no positives or no negatives for {bad} "
                                f"(labels in {cfg.label_column!r} must include {cfg.class_names})")


def resume_key(cfg: TrainConfig) -> str:
    """What a resumed run must share with the killed one (else it starts afresh)."""
    import hashlib
    import json

    keep = cfg.model_dump(include={"split_uri", "task", "class_names", "label_column", "backbone",
                                   "image_size", "batch_size", "epochs", "lr", "weight_decay",
                                   "scheduler", "warmup_epochs", "loss", "balanced", "seed",
                                   "weights", "refit", "resize", "crop_scale", "hflip", "vflip",
                                   "rotate90", "clahe",
                                   "rotate_limit", "brightness_contrast", "label_smoothing",
                                   "ema_decay", "tta_hflip", "grad_clip", "pretrained_path",
                                   "drop_rate", "focal_gamma", "patience", "amp",
                                   "global_pool", "box_weight", "boxes_uri", "mixup",
                                   "min_epochs", "backbone_lr_scale", "layer_decay",
                                   "head_warmup_epochs", "freeze_bn"})
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _default_cache_dir(cfg: TrainConfig) -> str:
    """``$FRACTURE_OPS_CACHE_DIR/decoded`` (the pod's cache volume) or ``<artifact_root>/cache``."""
    env = os.environ.get(envvars.CACHE_DIR)
    if env:
        return str(Path(env) / "decoded")
    if storage.is_s3(cfg.artifact_root):
        return str(Path(tempfile.gettempdir()) / "fracture-ops-cache" / "decoded")
    return str(Path(cfg.artifact_root) / "cache" / "decoded")


def pre_size(cfg: TrainConfig) -> int:
    """Longest side images are shrunk to before augmentation (room for the random crop)."""
    return int(cfg.image_size * 1.15)


def weights_provenance(cfg: TrainConfig) -> dict | None:
    """Where the pretrained weights come from (source, SHA-256, license, normalisation), or None
    when training from scratch.

    Raises:
        ConfigError: weights that cannot be resolved or converted.
    """
    from fracture_ops.model.network import resolve_pretrained

    return resolve_pretrained(cfg.pretrained_path, cfg.backbone)[1]


def normalisation(provenance: dict | None) -> tuple[tuple, tuple]:
    """The input mean/std: the pretrained weights' own, else ImageNet's (from scratch)."""
    from fracture_ops.model.preprocess import IMAGENET_MEAN, IMAGENET_STD

    if provenance is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(provenance["mean"]), tuple(provenance["std"])


def _datasets(cfg: TrainConfig, parts: dict[str, pd.DataFrame], targets: dict[str, np.ndarray],
              mean: tuple, std: tuple):
    from fracture_ops.training.datasets import DecodeCache, ManifestDataset
    from fracture_ops.model.preprocess import build_transforms

    pre = pre_size(cfg)
    cache = None
    if cfg.cache:
        folder = cfg.cache_dir or _default_cache_dir(cfg)
        if storage.is_s3(folder):
            raise ManifestError("cache_dir must be a local folder (a pod volume), not s3://")
        cache = DecodeCache(folder, pre)
    kw = dict(hflip=cfg.hflip, vflip=cfg.vflip, rotate90=cfg.rotate90, clahe=cfg.clahe,
              rotate_limit=cfg.rotate_limit, resize=cfg.resize, crop_scale=cfg.crop_scale,
              brightness_contrast=cfg.brightness_contrast, mean=mean, std=std)
    train_tf = build_transforms(cfg.image_size, True, seed=cfg.seed, **kw)
    eval_tf = build_transforms(cfg.image_size, False, **kw)
    regions = _train_regions(cfg, parts["train"], targets["train"])
    return {s: ManifestDataset(parts[s], targets[s], train_tf if s == "train" else eval_tf,
                               cache=cache, pre_size=pre,
                               regions=regions if s == "train" else None) for s in parts}


def _train_regions(cfg: TrainConfig, train: pd.DataFrame, targets: np.ndarray):
    """The training rows' box regions for box supervision, or None (off, or no boxes to use).

    Raises:
        ConfigError: box supervision asked for a task that is not binary.
        ManifestError: the box table lacks a column.
    """
    from fracture_ops.data.manifest import BOX_COLUMNS
    from fracture_ops.errors import ConfigError
    from fracture_ops.training.datasets import box_regions

    if cfg.box_weight <= 0:
        return None
    if cfg.task != "binary":
        raise ConfigError(f"box_weight needs the binary task (boxes of {cfg.class_names[0]!r}), "
                          f"not {cfg.task}")
    if not cfg.boxes_uri or not storage.exists(cfg.boxes_uri):
        log.warning("box_weight %.2f but no box table (%s): training on the labels alone",
                    cfg.box_weight, cfg.boxes_uri or "boxes_uri empty")
        return None
    boxes = storage.read_parquet(cfg.boxes_uri)
    missing = [c for c in BOX_COLUMNS if c not in boxes.columns]
    if missing:
        raise ManifestError(f"{cfg.boxes_uri}: box table lacks columns {missing}")
    regions = box_regions(train, targets, boxes, cfg.class_names[0])
    positives = int((targets[:, 0] > 0.5).sum())
    boxed = sum(r is not None and len(r) > 0 for r in regions)
    log.info("box supervision: %d of %d positive training images have %r boxes (weight %.2f)",
             boxed, positives, cfg.class_names[0], cfg.box_weight)
    if boxed == 0:
        log.warning("no training image has a %r box in %s: training on the labels alone",
                    cfg.class_names[0], cfg.boxes_uri)
        return None
    return regions


def _predictions(parts, targets, logits, class_names) -> pd.DataFrame:
    frames = []
    for s, lg in logits.items():
        df = parts[s][["image_id", "patient_id"]].copy()
        df["split"] = s
        for col in ("body_region", "view", "laterality", "study_id"):
            if col in parts[s].columns:
                df[col] = parts[s][col].values
        for k, (y_col, logit_col) in enumerate(zip(label_columns(class_names),
                                                  logit_columns(class_names), strict=True)):
            df[y_col] = targets[s][:, k].astype(int)
            df[logit_col] = lg[:, k].astype(np.float64)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _local_folder(cfg: TrainConfig, out: str) -> Path:
    """Where checkpoints are written: the run folder itself, or (for s3:// artifact roots) a
    work folder on the pod's volume (``$FRACTURE_OPS_CACHE_DIR``), mirrored to S3 on every save."""
    if not storage.is_s3(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out)
    base = Path(os.environ.get(envvars.CACHE_DIR) or tempfile.gettempdir())
    folder = base / "work" / cfg.run_id / "train"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _reseed(loader, seed: int, epoch: int, dist=None) -> None:
    """Shuffle and augment epoch ``e`` from ``seed + e``, so a resumed run replays the same
    epochs an uninterrupted one would (workers reseed the augmentation from the generator).
    Under several processes the sampler shuffles from ``seed + e`` on every rank and cuts its
    disjoint parts; each rank augments from its own stream."""
    rank = dist.rank if dist is not None else 0
    stream = seed + epoch + 1_000_003 * rank  # rank 0 (one process): seed + epoch, as before
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(stream)
    pipeline = getattr(loader.dataset.transform, "pipeline", None)
    if pipeline is not None and loader.num_workers == 0:
        pipeline.set_random_seed(stream)


def _uploader(out: str):
    def upload(path: Path) -> None:
        storage.write_bytes(storage.join(out, path.name), path.read_bytes())

    return upload


def train_step(cfg: TrainConfig) -> dict:
    """Train a classifier on the split; resume when a previous attempt was killed.

    Returns:
        Summary: MLflow run id, best epoch and val AUROC, output URIs.

    Raises:
        ManifestError: missing or empty splits, unknown labels.
        ConfigError: unknown backbone, missing pretrained weights, loss/task mismatch.

    Under ``torchrun --nproc-per-node N`` the N processes train one model together
    (:mod:`fracture_ops.training.distributed`); rank 0 returns the summary, the others
    ``{"train_dir", "rank", "world_size"}``.
    """
    from fracture_ops.training import distributed
    from fracture_ops.model.network import resolve_device

    cfg = cfg.with_split()
    dist, device = distributed.init(resolve_device(cfg.device))
    # no collective follows fit: the other ranks return while rank 0 predicts, writes and
    # uploads (however long that takes; torchrun waits for every rank)
    return _train(cfg, dist, device)


def _prepare_folder(cfg: TrainConfig, out: str, local: Path, dist) -> None:
    """Resume a killed attempt's folder (same config) or start afresh; rank 0 decides and
    clears, every rank fetches the checkpoints it restores from."""
    from fracture_ops.training import distributed

    remote = storage.is_s3(out)
    key_uri = storage.join(out, "resume_key.txt")
    resuming = None
    if dist.is_main:
        resuming = (storage.exists(storage.join(out, "last.pt")) and not storage.is_complete(out)
                    and storage.exists(key_uri)
                    and storage.read_text(key_uri).strip() == resume_key(cfg))
        if not resuming:
            storage.reset_dir(out)
        storage.write_text(key_uri, resume_key(cfg))
    resuming = distributed.broadcast(dist, resuming)
    if not resuming and remote:
        storage.reset_dir(str(local))
    elif resuming and remote:  # another pod was killed: fetch its checkpoints
        for name in ("last.pt", "best.pt"):
            if storage.exists(storage.join(out, name)):
                (local / name).write_bytes(storage.read_bytes(storage.join(out, name)))
    distributed.barrier(dist)


def _train(cfg: TrainConfig, dist, device: str) -> dict:
    """:func:`train_step` in one process of the group (``dist``; one process: rank 0 of 1)."""
    from fracture_ops import tracking
    from fracture_ops.cli_common import progress
    from fracture_ops.training import distributed
    from fracture_ops.training.datasets import make_loader, targets_for
    from fracture_ops.training.loop import Checkpointer, LoopConfig, fit, predict_logits, seed_everything
    from fracture_ops.training.losses import build_loss
    from fracture_ops.model.network import build_model

    out = cfg.output_dir(cfg.step_folder)
    local, remote = _local_folder(cfg, out), storage.is_s3(out)
    _prepare_folder(cfg, out, local, dist)
    seed_everything(cfg.seed, cfg.deterministic)
    table, parts = _split_frames(cfg)
    targets = {s: targets_for(parts[s], cfg.task, cfg.class_names, cfg.label_column) for s in parts}
    _check_both_outcomes(targets, cfg)
    provenance = weights_provenance(cfg)
    mean, std = normalisation(provenance)
    ds = _datasets(cfg, parts, targets, mean, std)
    sampler = distributed.train_sampler(ds["train"], dist, cfg.seed)
    loaders = {s: make_loader(ds[s], distributed.per_rank_batch(cfg.batch_size, dist) if s == "train"
                              else cfg.batch_size, s == "train", cfg.workers, device, cfg.seed,
                              sampler=sampler if s == "train" else None)
               for s in ds if len(ds[s])}
    model = build_model(cfg.backbone, cfg.task, len(cfg.class_names), cfg.pretrained_path,
                        cfg.drop_rate, global_pool=cfg.global_pool)
    loss_fn = build_loss(cfg.loss, cfg.task, targets["train"], cfg.balanced, cfg.focal_gamma,
                         cfg.label_smoothing)
    if not dist.is_main:  # the other ranks train, and leave the rest to rank 0
        fit(model, loaders["train"], loaders.get("val"), targets["val"], loss_fn,
            LoopConfig.from_train(cfg), device, Checkpointer(local), lambda st: None,
            on_epoch_start=lambda epoch: _reseed(loaders["train"], cfg.seed, epoch, dist), dist=dist)
        return {"train_dir": out, "rank": dist.rank, "world_size": dist.world_size}
    write_resolved(cfg, out)
    tags = {"manifest_hash": manifest_hash(table.drop(columns=["split"])),
            "split_hash": table_hash(table, ["image_id", "patient_id", "split"]),
            "backbone": cfg.backbone, "task": cfg.task, "fracture_ops.step": "train"}
    parent = {"mlflow.parentRunId": cfg.mlflow_parent_run_id} if cfg.mlflow_parent_run_id else {}
    mlflow, run, resumed = tracking.start_or_resume(
        out, cfg.experiment, f"{cfg.step_folder.replace('/', '-')}-{cfg.run_id}", {**tags, **parent})
    with run:
        if not resumed:
            mlflow.log_params(tracking.flatten(cfg.model_dump(mode="json")))
            if provenance:  # the weights' source, hashes and license, next to the config
                mlflow.log_params(tracking.flatten({"pretrained": provenance}))
        loop_cfg = LoopConfig.from_train(cfg)
        t0 = time.perf_counter()
        state = fit(model, loaders["train"], loaders.get("val"), targets["val"], loss_fn, loop_cfg,
                    device, Checkpointer(local, on_save=_uploader(out) if remote else None),
                    lambda st: mlflow.log_metrics({k: v for k, v in st.items() if k != "epoch"
                                                   and isinstance(v, int | float)},
                                                  step=st["epoch"]),
                    progress=lambda it: progress(it, "train", total=len(it)),
                    on_epoch_start=lambda epoch: _reseed(loaders["train"], cfg.seed, epoch, dist),
                    dist=dist)
        from fracture_ops.model.checkpoint import load_weights
        from fracture_ops.model.network import MODEL_FILE, save_model

        kept = f"{cfg.weights}.pt"
        blob = load_weights(local / kept, f"checkpoint {kept}")
        model.load_state_dict(blob.get("ema") or blob["model"])  # the averaged weights, if any
        logits = {s: predict_logits(model, loaders[s], device, tta_hflip=cfg.tta_hflip)
                  for s in ("val", "test") if s in loaders}
        preds = _predictions(parts, targets, logits, cfg.class_names)
        info = {"task": cfg.task, "class_names": cfg.class_names, "backbone": cfg.backbone,
                "global_pool": cfg.global_pool, "image_size": cfg.image_size, "best_epoch": state.best_epoch,
                "best_val_auroc": state.best_score if np.isfinite(state.best_score) else None,
                "epochs_run": state.epoch, "world_size": dist.world_size,
                "weights": cfg.weights, "refit": cfg.refit,
                "recipe": cfg.model_dump(include={"batch_size", "lr", "loss", *RECIPE_FLAGS}),
                "images": {s: len(parts[s]) for s in parts},
                "pretrained": provenance,
                "patients": {s: int(parts[s]["patient_id"].nunique()) for s in parts},
                "mlflow_run_id": run.info.run_id, "split_uri": cfg.split_uri,
                "experiment": cfg.experiment, **tags}
        save_model(local / MODEL_FILE, model.state_dict(), info,
                   {"image_size": cfg.image_size, "clahe": cfg.clahe, "resize": cfg.resize,
                    "tta_hflip": cfg.tta_hflip, "pre_size": pre_size(cfg), "jpeg_draft": True,
                    "mean": list(mean), "std": list(std)})
        # the predictions folder in the contract's layout (checked), then the full model info
        write_predictions(out, preds, cfg.task, cfg.class_names)
        storage.write_json(storage.join(out, MODEL_INFO_FILE), info)
        storage.write_json(storage.join(out, "history.json"), state.history)
        mlflow.log_metrics({"train_wall_s": time.perf_counter() - t0,
                            **({"best_val_auroc": state.best_score}
                               if np.isfinite(state.best_score) else {})})
        if remote:
            storage.write_bytes(storage.join(out, MODEL_FILE), (local / MODEL_FILE).read_bytes())
        mlflow.log_artifact(str(local / MODEL_FILE), "checkpoint")
        mlflow.log_text(storage.read_text(storage.join(out, "config.resolved.yaml")),
                        "config/config.resolved.yaml")
    summary = {"train_dir": out, "mlflow_run_id": run.info.run_id, "best_epoch": state.best_epoch,
               "best_val_auroc": round(state.best_score, 4) if np.isfinite(state.best_score) else None,
               "epochs_run": state.epoch,
               "predictions_uri": storage.join(out, PREDICTIONS_FILE), "resumed": resumed}
    storage.mark_success(out, summary)
    return summary


# the training recipe's knobs, as flags of train, cv and fit (see docs/benchmarks.md)
RECIPE_FLAGS = ("weight_decay", "warmup_epochs", "grad_clip", "hflip", "vflip", "rotate90",
                "clahe", "rotate_limit", "resize", "crop_scale", "brightness_contrast", "label_smoothing", "ema_decay",
                "tta_hflip", "global_pool", "box_weight", "mixup", "drop_rate", "min_epochs",
                "backbone_lr_scale", "layer_decay", "head_warmup_epochs", "freeze_bn")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops train SPLIT --backbone B --image-size S --epochs E``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    parser.add_argument("split", nargs="?", help="split.parquet from the split step")
    add_field_flags(parser, TrainConfig, "backbone", "image_size", "epochs", "batch_size", "lr",
                    "loss", "seed", "weights", "refit", "pretrained_path", "device", "boxes_uri",
                    *RECIPE_FLAGS)
    from fracture_ops.training.distributed import add_launch_flag

    add_launch_flag(parser)
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the train step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(TrainConfig, args, split_uri=args.split)
    return train_step(cfg)
