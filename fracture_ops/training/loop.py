"""The training loop: AdamW, cosine-with-warm-up or ReduceLROnPlateau, AMP on CUDA, gradient
clipping, an optional exponential moving average of the weights (validated and kept in place of
the raw weights), early stopping on validation AUROC, best/last checkpoints with resume.

The loop knows nothing about files or MLflow: :func:`fit` takes the model, loaders and a
``on_epoch`` callback, and a :class:`Checkpointer` that saves and restores the full training state
(model, optimiser, scheduler, scaler, epoch, best score, RNG states). The same code runs on CPU and
CUDA; only the device string differs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """What the loop needs: a slice of the step's TrainConfig, which holds the defaults
    (:meth:`from_train`); no default is written here."""

    epochs: int
    lr: float
    weight_decay: float
    scheduler: str  # cosine | plateau | none
    warmup_epochs: float
    grad_clip: float
    amp: str  # auto | bf16 | fp16 | off
    patience: int
    task: str
    ema_decay: float  # 0: no weight averaging
    tta_hflip: bool  # validation scores average the mirrored images' logits
    box_weight: float  # weight of the box-supervision loss of the feature-map cells (0: off)
    mixup: float  # alpha of mixup's Beta(alpha, alpha) mixing weight (0: off)
    min_epochs: int  # epochs before one may be kept or early stopping counts (clamped to epochs)
    backbone_lr_scale: float  # the backbone's learning rate relative to the head's
    layer_decay: float  # per-stage learning-rate decay from the head down (1: none)
    head_warmup_epochs: float  # the backbone's learning rate is 0 for these first epochs
    freeze_bn: bool  # BatchNorm layers keep their (pretrained) statistics and stay in eval mode

    @classmethod
    def from_train(cls, cfg) -> LoopConfig:
        """The loop's fields of a TrainConfig (keeping the last weights: no early stopping)."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls)}
        if getattr(cfg, "weights", "best") == "last":
            values["patience"] = cfg.epochs
        return cls(**values)


@dataclass
class LoopState:
    """Mutable training state saved in checkpoints."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)
    best_val_loss: float = math.inf  # the kept epoch's validation loss (breaks AUROC ties)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels (warn, not fail)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def amp_dtype(amp: str, device: str) -> torch.dtype | None:
    """The autocast dtype: bf16 where supported, fp16 otherwise; CUDA only (CPU trains in fp32)."""
    if amp == "off" or not device.startswith("cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def head_parameters(model: nn.Module) -> set[int]:
    """The ids of the classifier head's parameters (timm's ``get_classifier``; a network without
    one: none, and every parameter counts as backbone)."""
    net = _unwrapped(model)
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    return {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()


def param_groups(model: nn.Module, cfg: LoopConfig) -> list[dict]:
    """AdamW's parameter groups: no weight decay on norms and biases; the head at ``lr``, the
    backbone at ``lr * backbone_lr_scale``, and with ``layer_decay`` < 1 each of the backbone's
    stages (timm's ``group_matcher``: stem, blocks, the layers after them) one factor lower than
    the one above it. Each group carries ``backbone`` (False for the head) for the head-only
    warm-up."""
    head = head_parameters(model)
    scale: dict[int, float] = {}
    net = _unwrapped(model)
    if cfg.layer_decay < 1.0 and hasattr(net, "group_matcher"):
        from timm.models import group_parameters

        # timm's coarse grouping: the stem, one group per stage, then the layers after them
        layer = group_parameters(net, net.group_matcher(coarse=True), reverse=True)
        top = max(layer.values())
        named = dict(net.named_parameters())
        for name, group in layer.items():
            if name in named:
                scale[id(named[name])] = cfg.layer_decay ** (top - group)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = id(p) in head
        lr = cfg.lr * (1.0 if is_head else cfg.backbone_lr_scale * scale.get(id(p), 1.0))
        wd = 0.0 if p.ndim <= 1 or name.endswith(".bias") else cfg.weight_decay
        key = (round(lr, 12), wd, not is_head)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd,
                                "backbone": not is_head})["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: LoopConfig, steps_per_epoch: int):
    """AdamW over :func:`param_groups` and the scheduler (the head-only warm-up holds the
    backbone groups at 0 for its first ``head_warmup_epochs``)."""
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    frozen = int(cfg.head_warmup_epochs * steps_per_epoch)
    if cfg.scheduler == "cosine":
        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / max(1, warm)
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        def held(step: int) -> float:
            # held at 0, then its own linear warm-up over `warm` steps from where it starts
            # (not straight to the peak rate on weights that have not moved yet)
            if step < frozen:
                return 0.0
            return factor(step) * min(1.0, (step - frozen + 1) / max(1, warm))

        lambdas = [held if g["backbone"] and frozen else factor for g in opt.param_groups]
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas), "step"
    if frozen:  # plateau reacts to scores, not steps: it cannot hold the backbone
        from fracture_ops.errors import ConfigError

        if cfg.scheduler == "plateau":
            raise ConfigError("head_warmup_epochs needs the cosine or none scheduler, not plateau")
        lambdas = [(lambda step: 0.0 if step < frozen else 1.0) if g["backbone"] else
                   (lambda step: 1.0) for g in opt.param_groups]
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas), "step"
    if cfg.scheduler == "plateau":
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5,
                                                               patience=1), "epoch"
    return opt, None, "none"


class Checkpointer:
    """Saves ``last.pt`` every epoch and ``best.pt`` on improvement, atomically."""

    def __init__(self, folder: str | Path, on_save: Callable[[Path], None] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.on_save = on_save  # e.g. copy the checkpoint to S3 so another pod can resume

    def save(self, name: str, model, opt, sched, scaler, state: LoopState, ema=None) -> None:
        from fracture_ops.model.checkpoint import plain

        blob = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "scheduler": plain(sched.state_dict()) if sched else None,
                "scaler": scaler.state_dict() if scaler else None,
                "state": plain(state.__dict__), "rng": _rng_state()}
        tmp = self.folder / f".{name}.tmp"
        torch.save(blob, tmp)
        tmp.replace(self.folder / name)  # atomic: a kill never leaves a torn checkpoint
        if self.on_save is not None:
            self.on_save(self.folder / name)

    def restore(self, model, opt, sched, scaler, ema=None) -> LoopState | None:
        path = self.folder / "last.pt"
        if not path.exists():
            return None
        from fracture_ops.model.checkpoint import load_weights

        blob = load_weights(path, "checkpoint last.pt")
        model.load_state_dict(blob["model"])
        if ema is not None and blob.get("ema"):
            ema.module.load_state_dict(blob["ema"])
        opt.load_state_dict(blob["optimizer"])
        if sched is not None and blob["scheduler"]:
            sched.load_state_dict(blob["scheduler"])
        if scaler is not None and blob["scaler"]:
            scaler.load_state_dict(blob["scaler"])
        _set_rng_state(blob["rng"])
        return LoopState(**blob["state"])


def _rng_state() -> dict:
    """RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state()}


def _set_rng_state(s: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(s["torch"])


def predict_logits(model: nn.Module, loader, device: str, dtype: torch.dtype | None = None,
                   tta_hflip: bool = False) -> np.ndarray:
    """Logits for every sample of a loader (eval mode, no grad; ``tta_hflip``: averaged with the
    mirrored images' logits, see :func:`fracture_ops.model.network.tta_logits`)."""
    from fracture_ops.model.network import tta_logits

    model.eval()
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                out.append(tta_logits(model, x, tta_hflip).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


def _validate(model, loader, targets: np.ndarray, loss_fn, cfg: LoopConfig, device: str,
              dtype) -> tuple[float, float]:
    """Validation AUROC and loss (without label smoothing: comparable across recipes)."""
    logits = predict_logits(model, loader, device, dtype, cfg.tta_hflip)
    plain_loss = getattr(loss_fn, "unsmoothed", loss_fn)
    loss = float(plain_loss(torch.from_numpy(logits).to(device), torch.from_numpy(targets).to(device)))
    return val_auroc(logits, targets, cfg.task), loss


def val_auroc(logits: np.ndarray, targets: np.ndarray, task: str) -> float:
    """Macro AUROC over classes with both outcomes present (NaN when none)."""
    from sklearn.metrics import roc_auc_score

    scores = []
    for k in range(targets.shape[1]):
        if 0 < targets[:, k].sum() < len(targets):
            scores.append(roc_auc_score(targets[:, k], logits[:, k]))
    return float(np.mean(scores)) if scores else float("nan")


class CellLogits(nn.Module):
    """Training wrapper for box supervision: the network's image logits and a ``B x K x h x w``
    map of cell logits, each cell of the last feature map put through the network's own head
    (pooling a single cell, then whatever the head holds: norm, convolution, classifier). It
    adds no parameters: the model that is kept and served is the network itself.

    Raises:
        ConfigError: the backbone's features are not a ``B x C x h x w`` map.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        if feats.ndim != 4:
            from fracture_ops.errors import ConfigError

            raise ConfigError("box supervision needs a backbone whose features are a B x C x h x w "
                              f"map, not {tuple(feats.shape)}")
        b, c, h, w = feats.shape
        one_cell = feats.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
        cells = self.model.forward_head(one_cell).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return self.model.forward_head(feats), cells


def cell_loss(cells: torch.Tensor, mask: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Box supervision: binary cross-entropy of every cell of the last feature map (its logit
    from the classifier, ``B x 1 x h x w``) against "a box reaches into this cell" (the
    augmented ``B x H x W`` box mask, max-pooled to ``h x w``), averaged over the images whose
    boxes are ``known`` (negatives: every cell 0); 0 when no image in the batch is known."""
    target = nn.functional.adaptive_max_pool2d(mask[:, None].float(), cells.shape[-2:])
    per_image = nn.functional.binary_cross_entropy_with_logits(
        cells, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_image * known).sum() / known.sum().clamp(min=1.0)


def _mixed(loss_of: Callable, lam: float, perm: torch.Tensor | None, *targets) -> torch.Tensor:
    """``loss_of(*targets)``; under mixup (``perm``: the shuffled partner of each image) the
    blend ``lam * loss_of(*targets) + (1 - lam) * loss_of(*targets[perm])``."""
    got = loss_of(*targets)
    if perm is None:
        return got
    return lam * got + (1.0 - lam) * loss_of(*(t[perm] for t in targets))


def train_one_epoch(model, loader, loss_fn, opt, sched, sched_mode, scaler, device, dtype,
                    grad_clip: float, progress: Callable, ema=None, step0: int = 0,
                    box_weight: float = 0.0, mixup: float = 0.0, freeze_bn: bool = False) -> dict:
    """One pass over the training loader; returns loss, images/s and lr. With ``ema`` (timm's
    ``ModelEmaV3``) the average is updated after every optimiser step (``step0``: the steps
    taken before this epoch, for the average's warm-up). A model that returns image and cell
    logits (:class:`CellLogits`) over batches with box masks adds
    ``box_weight`` times :func:`cell_loss`. With ``mixup`` (alpha > 0; Zhang et al., "mixup:
    Beyond Empirical Risk Minimization", ICLR 2018) each batch is blended with a shuffled copy of
    itself, ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)``, and every loss
    (the label loss and the cell loss) is the same blend of the losses against both images'
    targets, so any loss and task works unchanged. ``freeze_bn``: BatchNorm layers stay in eval
    mode (their running statistics, e.g. ImageNet's, are used and kept; their scale and shift
    still train), for batches too small to estimate statistics from."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    # the loss is summed on the device: reading it every step would wait for the GPU each time
    total, n, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    for batch in progress(loader):
        x, y, *boxes = batch  # box supervision: (image, target, mask, known) from the dataset
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        lam, perm = 1.0, None
        if mixup > 0 and len(x) > 1:  # the global torch generator: seeded and checkpointed
            lam = float(torch.distributions.Beta(mixup, mixup).sample())
            perm = torch.randperm(len(x)).to(device)
            x = lam * x + (1.0 - lam) * x[perm]
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            out = model(x)
            if isinstance(out, tuple):  # a CellLogits network: image logits and cell logits
                out, cells = out
                mask, known = (t.to(device, non_blocking=True) for t in boxes)
                loss = _mixed(partial(loss_fn, out.float()), lam, perm, y) + box_weight * _mixed(
                    partial(cell_loss, cells.float()), lam, perm, mask, known)
            else:
                loss = _mixed(partial(loss_fn, out.float()), lam, perm, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if sched is not None and sched_mode == "step":
            sched.step()
        if ema is not None:
            step0 += 1
            ema.update(_unwrapped(model), step=step0)
        total += loss.detach() * len(x)
        n += len(x)
    total = float(total)  # one wait for the device, then the clock stops
    elapsed = time.perf_counter() - t0
    # the head's rate (the backbone's may be scaled down, or held at 0 in a head-only warm-up)
    head = next((g for g in opt.param_groups if not g.get("backbone", True)), opt.param_groups[0])
    return {"train_loss": total / max(n, 1), "images_per_s": n / max(elapsed, 1e-9),
            "lr": head["lr"], "images": n}


def _unwrapped(model):
    """The network inside DistributedDataParallel and :class:`CellLogits` (its parameters,
    without ``module.`` or ``model.``)."""
    from torch.nn.parallel import DistributedDataParallel

    model = model.module if isinstance(model, DistributedDataParallel) else model
    return model.model if isinstance(model, CellLogits) else model


def _gathered(stats: dict, dist) -> dict:
    """Training loss (image-weighted mean) and throughput (sum) over every rank, and how many
    images each rank trained on."""
    from fracture_ops.training import distributed

    if not dist.enabled:
        return stats
    parts = distributed.gather(dist, (stats["train_loss"], stats["images"], stats["images_per_s"]))
    n = sum(p[1] for p in parts)
    return {**stats, "train_loss": sum(p[0] * p[1] for p in parts) / max(n, 1), "images": n,
            "images_per_s": sum(p[2] for p in parts), "images_per_rank": [p[1] for p in parts]}


def fit(model, train_loader, val_loader, val_targets: np.ndarray, loss_fn, cfg: LoopConfig,
        device: str, ckpt: Checkpointer, on_epoch: Callable[[dict], None],
        progress: Callable = lambda it: it,
        on_epoch_start: Callable[[int], None] | None = None, dist=None) -> LoopState:
    """Train until ``cfg.epochs`` or early stopping; resume from ``last.pt`` when present.

    Without ``val_loader`` (a refit) every epoch runs and no score is kept. ``dist``: the
    process group (:mod:`fracture_ops.training.distributed`; default one process): the model is
    trained through DDP, rank 0 validates, saves and reports, the others follow its score."""
    from fracture_ops.training import distributed

    dist = dist or distributed.SINGLE
    model.to(device).to(memory_format=torch.channels_last)
    loss_fn.to(device)  # class weights are buffers of the loss
    opt, sched, mode = build_optimizer(model, cfg, len(train_loader))
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        # warm-up: the average starts short (decay grows with the steps) so a run of a few
        # hundred steps is not dominated by its random initial weights
        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    state = ckpt.restore(model, opt, sched, scaler, ema) or LoopState()
    if state.epoch:
        log.info("resumed at epoch %d (best val AUROC %.4f)", state.epoch, state.best_score)
    boxed = getattr(getattr(train_loader, "dataset", None), "regions", None) is not None
    if cfg.box_weight > 0 and boxed:  # training also scores the feature-map cells against boxes
        trained = distributed.wrap(CellLogits(model), dist, device)
    else:
        trained = distributed.wrap(model, dist, device)
    while state.epoch < cfg.epochs:
        if state.epoch - state.best_epoch > cfg.patience and state.best_epoch >= 0:
            log.info("early stopping: no val AUROC gain for %d epochs", cfg.patience)
            break
        if on_epoch_start is not None:
            on_epoch_start(state.epoch)
        stats = _gathered(train_one_epoch(trained, train_loader, loss_fn, opt, sched, mode, scaler,
                                          device, dtype, cfg.grad_clip, progress, ema,
                                          state.epoch * len(train_loader), cfg.box_weight,
                                          cfg.mixup, cfg.freeze_bn),
                         dist)
        if val_loader is None:  # a refit: no validation images
            stats.update(epoch=state.epoch)
            score, val_loss = math.nan, math.nan
        else:
            val = None
            if dist.is_main:
                val = _validate(ema.module if ema is not None else model, val_loader, val_targets,
                                loss_fn, cfg, device, dtype)
            score, val_loss = distributed.broadcast(dist, val)
            stats.update(epoch=state.epoch, val_auroc=score, val_loss=val_loss)
        if sched is not None and mode == "epoch" and val_loader is not None:  # plateau needs a score
            sched.step(score if not math.isnan(score) else 0.0)
        state.epoch += 1
        # an epoch before min_epochs is neither kept nor counted by early stopping: a model whose
        # training loss has not moved yet can score a high validation AUROC by chance
        counts = state.epoch >= min(cfg.min_epochs, cfg.epochs)
        # a gain: a higher validation AUROC, or the same AUROC at a lower validation loss (a small
        # validation set saturates at 1.0 while the model still improves)
        improved = counts and not math.isnan(score) and (
            score > state.best_score
            or (score == state.best_score and not math.isnan(val_loss)
                and val_loss < state.best_val_loss))
        if improved or (counts and state.best_epoch < 0):
            state.best_score, state.best_epoch = (score if not math.isnan(score) else -math.inf,
                                                  state.epoch - 1)
            state.best_val_loss = val_loss if not math.isnan(val_loss) else math.inf
        state.history.append(stats)
        if dist.is_main:
            on_epoch(stats)
            if improved or (counts and not (ckpt.folder / "best.pt").exists()):
                ckpt.save("best.pt", model, opt, sched, scaler, state, ema)
            ckpt.save("last.pt", model, opt, sched, scaler, state, ema)
        log.info("epoch %d/%d loss %.4f val AUROC %.4f %.1f img/s", state.epoch, cfg.epochs,
                 stats["train_loss"], score, stats["images_per_s"])
    return state
