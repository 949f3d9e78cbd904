"""Classification models: ``timm.create_model`` behind one :func:`build_model`.

Heads: binary = one logit (sigmoid), multi-class = K logits (softmax), multi-label = K logits
(sigmoid). Pretrained weights come only from a local file or a local Hugging Face cache folder
named in the config; without one the model starts from scratch and says so. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Grad-CAM target layers per backbone family (see explain/); kept next to the factory on purpose.
# backbones the trigger form proposes (any timm model name is accepted); test_resnet is timm's tiny
# test network, for demos and tests on a CPU
BACKBONES = ["efficientnet_b0", "efficientnet_b3", "densenet121", "resnet18", "resnet50",
             "convnext_nano", "test_resnet"]
CAM_LAYERS = {"efficientnet": "bn2", "densenet": "features.norm5", "resnet": "layer4",
              "convnext": "stages.-1", "mobilenet": "bn2", "regnet": "final_conv"}


def n_outputs(task: str, n_classes: int) -> int:
    """Number of logits for a task: 1 for binary, K otherwise."""
    return 1 if task == "binary" else n_classes


def resolve_weights_file(path: str) -> str:
    """A weights file from a file path or a local HF cache/snapshot folder.

    Raises:
        ConfigError: the path does not exist or holds no weights file.
    """
    from fracture_ops.errors import ConfigError

    p = Path(path).expanduser()
    if p.is_file():
        return str(p)
    if p.is_dir():
        for pattern in ("model.safetensors", "pytorch_model.bin", "*.safetensors", "*.pth", "*.pt", "*.bin"):
            found = sorted(p.rglob(pattern))
            if found:
                return str(found[0])
        raise ConfigError(f"pretrained_path {path}: folder holds no .safetensors/.pth/.bin weights")
    raise ConfigError(f"pretrained_path {path} does not exist (weights are never downloaded)")


# timm's global pools (SelectAdaptivePool2d): avg, max, avgmax (the mean of both), catavgmax
# (both, concatenated: twice the features)
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax")


def build_model(backbone: str, task: str, n_classes: int, pretrained_path: str | None = None,
                drop_rate: float = 0.0, quiet: bool = False, global_pool: str = "avg"):
    """Create the network.

    Args:
        backbone: a timm model name (efficientnet_b0/b3, densenet121, resnet18/50, convnext_nano...).
        task: ``binary``, ``multiclass`` or ``multilabel``.
        n_classes: number of classes (1 for binary).
        pretrained_path: local weights file or HF cache folder; None = from scratch.
        drop_rate: dropout before the classifier.
        quiet: no "from scratch" warning (when weights are loaded right after, e.g. from a checkpoint).
        global_pool: the pooling of the last feature map before the classifier (:data:`GLOBAL_POOLS`);
            ``max`` and ``avgmax`` keep a small local finding from being averaged away.

    Raises:
        ConfigError: unknown backbone or missing weights file.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm

    from fracture_ops.errors import ConfigError

    if not timm.is_model(backbone):
        raise ConfigError(f"unknown backbone {backbone!r} (not a timm model name)")
    if global_pool not in GLOBAL_POOLS:
        raise ConfigError(f"global_pool must be one of {GLOBAL_POOLS}, not {global_pool!r}")
    kwargs = dict(num_classes=n_outputs(task, n_classes), in_chans=3, drop_rate=drop_rate)
    if global_pool != "avg":  # not every timm family takes the argument; avg is everyone's default
        kwargs["global_pool"] = global_pool
    if pretrained_path:
        weights = resolve_weights_file(pretrained_path)
        log.info("loading pretrained weights for %s from %s", backbone, weights)
        return timm.create_model(backbone, pretrained=True,
                                 pretrained_cfg_overlay={"file": weights}, **kwargs)
    if not quiet:
        log.warning("no pretrained_path for %s: training from scratch (random initialisation)",
                    backbone)
    return timm.create_model(backbone, pretrained=False, **kwargs)


def cam_target_layer(model, backbone: str):
    """The module Grad-CAM should hook for this backbone family."""
    family = next((f for f in CAM_LAYERS if backbone.startswith(f)), None)
    if family is None:
        # timm records its feature stages: the last one is the right resolution for Grad-CAM
        return model.get_submodule(model.feature_info[-1]["module"])
    node = model
    for part in CAM_LAYERS[family].split("."):
        node = node[int(part)] if part.lstrip("-").isdigit() else getattr(node, part)
    return node


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def tta_logits(model, x, hflip: bool):
    """The model's logits for a batch; with ``hflip`` (test-time augmentation) the mean of the
    logits of the batch and of its horizontal mirror. Every place that scores a trained model
    (validation, out-of-fold and test predictions, the served pyfunc model, batch inference,
    Grad-CAM's reported score) goes through here with the model's own setting."""
    out = model(x)
    if hflip:
        out = (out + model(x.flip(-1))) / 2
    return out
