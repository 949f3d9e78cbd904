"""Classification models: ``timm.create_model`` behind one :func:`build_model`, and the one
save/load pair of a trained classifier's ``model.pt`` (:func:`save_model`, :func:`load_model`:
the train step writes it; the pyfunc model, Grad-CAM and through them inference, the gate and the
drift reference rebuild it from the weights alone).

Heads: binary = one logit (sigmoid), multi-class = K logits (softmax), multi-label = K logits
(sigmoid). Pretrained weights come only from a package installed from the registry
(``pkg:efficientnet-lite0``, see :mod:`fracture_ops.model.pretrained`), a local file or a local
Hugging Face cache folder named in the config; without one the model starts from scratch and says
so. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fracture_ops import catalog

log = logging.getLogger(__name__)

# Grad-CAM target layers per backbone family (see explain/); kept next to the factory on purpose.
# backbones the trigger form proposes (any timm model name is accepted); test_resnet is timm's tiny
# test network, for demos and tests on a CPU
BACKBONES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
             "efficientnet_b0", "efficientnet_b3", "densenet121", "resnet18", "resnet50",
             "convnext_nano", "test_resnet"]
CAM_LAYERS = {"efficientnet": "bn2", "tf_efficientnet": "bn2", "densenet": "features.norm5", "resnet": "layer4",
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


def resolve_pretrained(source: str | None, backbone: str) -> tuple[dict | None, dict | None]:
    """The starting weights for ``backbone`` from ``source`` (``auto``, ``pkg:NAME`` or a local
    path) as a state dict, and their provenance (source, SHA-256, licence where known, the input
    normalisation they expect); ``(None, None)`` for training from scratch (no source, ``none``,
    or ``auto`` for a backbone no installed package has weights for).

    Raises:
        ConfigError: see :func:`fracture_ops.model.pretrained.resolve`, a missing or unreadable
            local file.
    """
    from fracture_ops.model import pretrained

    text = "" if source is None else str(source).strip()
    if text.lower() in ("", "none"):
        return None, None
    if text.lower() == pretrained.AUTO:
        pkg = pretrained.package_for_backbone(backbone)
        if pkg is None:
            return None, None
        text = pretrained.PREFIX + pkg.name
    if pretrained.is_package_source(text):
        return pretrained.resolve(text, backbone)
    weights = resolve_weights_file(text)
    mean, std = backbone_normalisation(backbone)
    return _read_state(weights), {"source": text, "file": weights,
                                  "file_sha256": pretrained.sha256_file(Path(weights)),
                                  "backbone": backbone, "mean": list(mean), "std": list(std)}


def _read_state(path: str) -> dict:
    """A local weights file's tensors (safetensors, or a torch file loaded without running
    code; a ``state_dict``/``model`` entry is unwrapped).

    Raises:
        ConfigError: unreadable, or not a mapping of names to tensors.
    """
    import torch

    from fracture_ops.errors import ConfigError, UnsafeModelFile

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            from fracture_ops.model.checkpoint import load_weights

            state = load_weights(path, f"pretrained weights {path}")
    except UnsafeModelFile:
        raise
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many kinds for a bad file
        raise ConfigError(f"pretrained weights {path} cannot be read: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"pretrained weights {path}: not a mapping of tensor names to tensors")
    return state


def load_pretrained(model, state: dict, source: str) -> None:
    """Load ``state`` into ``model``: every tensor of the network but its classifier must be in
    the file under its own name and shape, and nothing else may be (the classifier is replaced
    when its shape is the source task's); anything else is refused, naming the tensors, and
    nothing is loaded. The new classifier starts at zero (:func:`zero_head`).

    Raises:
        ConfigError: missing, unexpected or misshapen tensors.
    """
    from fracture_ops.errors import ConfigError

    head = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "")
    is_head = (lambda k: bool(head) and (k == head or k.startswith(head + ".")))
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the network's {tuple(own[k].shape)})"
             for k, v in state.items() if k in own and not is_head(k) and v.shape != own[k].shape]
    unexpected = sorted(k for k in state if k not in own and not is_head(k))
    # BatchNorm's step counters are bookkeeping, not weights: files often leave them out
    missing = sorted(k for k in own if k not in state and not is_head(k)
                     and not k.endswith("num_batches_tracked"))
    if wrong or unexpected or missing:
        parts = [f"{len(missing)} of the network's tensors missing (first: {missing[:3]})"
                 if missing else "",
                 f"{len(unexpected)} tensors the network does not have (first: {unexpected[:3]})"
                 if unexpected else "",
                 f"{len(wrong)} of another shape (first: {wrong[:2]})" if wrong else ""]
        raise ConfigError(f"pretrained weights {source} do not fit {type(model).__name__}: "
                          + "; ".join(p for p in parts if p) + "; refused, nothing loaded")
    fits = {k: v for k, v in state.items()
            if not is_head(k) or (k in own and v.shape == own[k].shape)}
    model.load_state_dict(fits, strict=False)
    if not any(is_head(k) for k in fits):
        zero_head(model)


def backbone_normalisation(backbone: str) -> tuple[tuple, tuple]:
    """The input mean and std of a timm backbone's pretrained config (ImageNet's by default)."""
    import timm

    from fracture_ops.model.preprocess import IMAGENET_MEAN, IMAGENET_STD

    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # noqa: BLE001 - a name without a registered config
        cfg = None
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD)


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
        pretrained_path: ``auto`` (the registry-installed weights made for the backbone, if
            any), ``pkg:NAME``, a local weights file or HF cache folder; None, empty or ``none``:
            from scratch.
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
    state, info = resolve_pretrained(pretrained_path, backbone)
    if state is not None:
        log.info("loading pretrained weights for %s from %s", backbone,
                 info.get("file") or info["source"])
        model = timm.create_model(backbone, pretrained=False, **kwargs)
        load_pretrained(model, state, info["source"])
        return model
    if not quiet:
        log.warning("no pretrained weights for %s (pretrained_path %r): training from scratch "
                    "(random initialisation)", backbone, pretrained_path)
    return timm.create_model(backbone, pretrained=False, **kwargs)


def zero_head(model) -> None:
    """Start a new classifier on pretrained features at zero (every logit 0, probability 0.5).
    timm's EfficientNet initialises a linear head uniformly in +-1/sqrt(outputs), +-1 for a
    single logit: over 1280 pretrained features of up to 6 that is a first logit of tens and a
    first-epoch loss of 3 instead of 0.69, whose gradients tear the pretrained weights. A zero
    head still learns (its gradient is the features times the error)."""
    import torch

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()


MODEL_FILE = catalog.MODEL.file


def save_model(path: str | Path, state_dict: dict, info: dict, transform: dict) -> None:
    """Write ``model.pt``: the weights, ``info`` (backbone, task, classes, global pool, ...) and
    the ``transform`` record (size, geometry, CLAHE, normalisation, pre-shrink)."""
    import torch

    from fracture_ops.model.checkpoint import plain

    torch.save({"state_dict": state_dict, "info": plain(info), "transform": plain(transform)},
               path)


@dataclass
class SavedModel:
    """A rebuilt ``model.pt``: the network (eval mode), its ``info`` and ``transform`` record."""

    model: Any
    info: dict
    transform: dict


def load_model(source: str | Path | bytes, what: str = MODEL_FILE, device: str = "cpu") -> SavedModel:
    """Rebuild the network of a ``model.pt`` (a path or its bytes) with this package's code from
    the weights alone.

    Raises:
        UnsafeModelFile: the file holds more than weights and plain values.
        BadInputError: not a fracture-ops model file.
    """
    from fracture_ops.errors import BadInputError
    from fracture_ops.model.checkpoint import load_weights

    blob = load_weights(source, what)
    if not isinstance(blob, dict) or not {"state_dict", "info", "transform"} <= set(blob):
        raise BadInputError(f"{what} is not a fracture-ops model.pt (state_dict/info/transform)")
    info = blob["info"]
    model = build_model(info["backbone"], info["task"], len(info["class_names"]), None, quiet=True,
                        global_pool=info.get("global_pool", "avg"))
    model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    return SavedModel(model, info, dict(blob["transform"]))


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
