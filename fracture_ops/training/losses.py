"""Losses: BCE with logits, cross-entropy, focal loss; class-balanced weights from training prevalence.

Focal loss: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FocalLoss(nn.Module):
    """Binary/multi-label focal loss on logits (Lin et al. 2017): ``-a (1-p_t)^g log p_t``."""

    def __init__(self, gamma: float = 2.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits(
            logits, target, pos_weight=self.pos_weight, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        return ((1 - p_t) ** self.gamma * bce).mean()


class MultiClassFocalLoss(nn.Module):
    """Softmax focal loss for single-label multi-class targets (one-hot in, as the datasets give)."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        idx = target.argmax(1)
        logp = torch.log_softmax(logits, 1).gather(1, idx[:, None])[:, 0]
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.weight is not None:
            loss = loss * self.weight[idx]
        return loss.mean()


class OneHotCrossEntropy(nn.Module):
    """Cross-entropy taking one-hot targets (the datasets' uniform target format)."""

    def __init__(self, weight: torch.Tensor | None = None):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, target.argmax(1))


def class_weights(targets: np.ndarray, task: str) -> np.ndarray:
    """Weights from training prevalence.

    Binary/multi-label: ``pos_weight = negatives / positives`` per class (BCE's convention).
    Multi-class: ``n / (K * count_k)`` (scikit-learn's "balanced").
    """
    targets = np.asarray(targets, np.float64)
    if task == "multiclass":
        counts = targets.sum(0)
        return len(targets) / (targets.shape[1] * np.clip(counts, 1, None))
    pos = targets.sum(0)
    return (len(targets) - pos) / np.clip(pos, 1, None)


class SmoothedTargets(nn.Module):
    """Label smoothing in front of a loss: sigmoid losses (BCE, focal) see targets moved ``eps``
    toward 1/2; the softmax cross-entropy uses torch's own smoothing (toward 1/K). ``unsmoothed``
    is the plain loss, for validation losses that stay comparable between recipes."""

    def __init__(self, loss: nn.Module, eps: float):
        super().__init__()
        self.loss, self.eps = loss, float(eps)

    @property
    def unsmoothed(self) -> nn.Module:
        return self.loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(self.loss, OneHotCrossEntropy):
            return nn.functional.cross_entropy(logits, target.argmax(1), weight=self.loss.ce.weight,
                                               label_smoothing=self.eps)
        return self.loss(logits, target * (1 - self.eps) + 0.5 * self.eps)


def build_loss(name: str, task: str, train_targets: np.ndarray | None = None,
               balanced: bool = False, gamma: float = 2.0,
               label_smoothing: float = 0.0) -> nn.Module:
    """Build the loss for a task.

    Args:
        name: ``bce``, ``ce`` or ``focal``.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        train_targets: N x K targets of the training split (for balanced weights).
        balanced: weight classes by inverse training prevalence.
        gamma: focal loss focusing parameter.
        label_smoothing: move targets this far toward the uniform value (0: off).

    Raises:
        ConfigError: a loss that does not fit the task (e.g. ``ce`` for multi-label).
    """
    from fracture_ops.errors import ConfigError

    loss = _base_loss(name, task, train_targets, balanced, gamma)
    if label_smoothing <= 0:
        return loss
    if task == "multiclass" and not isinstance(loss, OneHotCrossEntropy):
        raise ConfigError("label_smoothing is not supported with the multi-class focal loss; "
                          "use loss 'ce'")
    return SmoothedTargets(loss, label_smoothing)


def _base_loss(name: str, task: str, train_targets: np.ndarray | None, balanced: bool,
               gamma: float) -> nn.Module:
    from fracture_ops.errors import ConfigError

    w = None
    if balanced and train_targets is not None:
        w = torch.tensor(class_weights(train_targets, task), dtype=torch.float32)
    if task == "multiclass":
        if name == "bce":
            raise ConfigError("loss 'bce' does not fit a multiclass task; use 'ce' or 'focal'")
        return MultiClassFocalLoss(gamma, w) if name == "focal" else OneHotCrossEntropy(w)
    if name == "ce":
        raise ConfigError(f"loss 'ce' does not fit a {task} task; use 'bce' or 'focal'")
    if name == "focal":
        return FocalLoss(gamma, w)
    return nn.BCEWithLogitsLoss(pos_weight=w)
