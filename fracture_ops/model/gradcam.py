"""Grad-CAM heatmaps for the trained classifiers, in the original image's pixel coordinates.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017) weights each channel of a convolutional layer's activations by the
spatial mean of the gradient of the target score with respect to it, sums the weighted channels
and keeps the positive part. The computation itself is pytorch-grad-cam's ``GradCAM``; this module
picks the layer to hook (:func:`resolve_target_layer`, one per backbone family, see
:data:`fracture_ops.model.network.CAM_LAYERS`), the score to explain (the positive logit for a
one-logit binary head, the class logit otherwise) and maps the map back from the model input to the
original radiograph.

The evaluation transform letterboxes by default: albumentations ``LongestMaxSize`` (longest side
to ``image_size``, the other side ``round(side * scale)``) then ``PadIfNeeded`` (centred, the odd
pixel of padding after the image). :func:`letterbox_geometry` reproduces that arithmetic and
:func:`cam_to_original` crops the padding away and resizes the rest to the original height and
width, so overlays and box-overlap checks are in original pixels. A model trained with
``resize: squash`` fills the whole input: its map is resized to the original as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fracture_ops import storage
from fracture_ops.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits inside the square model input.

    Attributes:
        size: side of the square model input.
        height: original image height (pixels).
        width: original image width (pixels).
        new_h: height of the resized image inside the input.
        new_w: width of the resized image inside the input.
        top: padding rows above the image.
        left: padding columns left of the image.
    """

    size: int
    height: int
    width: int
    new_h: int
    new_w: int
    top: int
    left: int


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    """The geometry of ``LongestMaxSize(size)`` + centred ``PadIfNeeded(size, size)``.

    Args:
        height: original image height.
        width: original image width.
        size: model input side.

    Returns:
        The :class:`Letterbox` (albumentations 2.x arithmetic: sides rounded with Python's
        ``round``, the floor of half the padding before the image).
    """
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = int((size - new_h) / 2.0) if new_h < size else 0
    left = int((size - new_w) / 2.0) if new_w < size else 0
    return Letterbox(size, int(height), int(width), new_h, new_w, top, left)


def cam_to_original(cam: np.ndarray, geom: Letterbox) -> np.ndarray:
    """Map a CAM over the letterboxed input back onto the original image.

    Args:
        cam: ``size x size`` map over the model input.
        geom: the input's :func:`letterbox_geometry`.

    Returns:
        ``height x width`` float32 map, clipped to [0, 1].
    """
    import cv2

    inner = np.asarray(cam, np.float32)[geom.top:geom.top + geom.new_h,
                                        geom.left:geom.left + geom.new_w]
    # bilinear for upsampling, area averaging when the original is smaller than the input
    up = geom.height >= geom.new_h
    out = cv2.resize(inner, (geom.width, geom.height),
                     interpolation=cv2.INTER_LINEAR if up else cv2.INTER_AREA)
    return np.clip(out, 0.0, 1.0)


def box_energy(cam: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> tuple[float, float]:
    """Share of the CAM's energy inside the boxes, and the boxes' share of the image area.

    A heatmap that ignores the boxes has an energy fraction about equal to the area fraction, so
    their ratio measures localisation (1 = chance). Overlapping boxes count once (their union).

    Args:
        cam: ``H x W`` non-negative map in original pixels.
        boxes: ``(x_min, y_min, x_max, y_max)`` boxes in pixels, corners inclusive.

    Returns:
        ``(energy_fraction, area_fraction)``; the energy fraction is 0 for an all-zero map.
    """
    h, w = cam.shape
    mask = np.zeros((h, w), bool)
    for x_min, y_min, x_max, y_max in boxes:
        x0, y0 = max(0, int(np.floor(x_min))), max(0, int(np.floor(y_min)))
        x1, y1 = min(w, int(np.ceil(x_max)) + 1), min(h, int(np.ceil(y_max)) + 1)
        mask[y0:y1, x0:x1] = True
    total = float(cam.sum())
    return (float(cam[mask].sum()) / total if total > 0 else 0.0), float(mask.mean())


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The CAM as a JET heatmap over the grayscale radiograph.

    Args:
        image: ``H x W`` float image in [0, 1].
        cam: ``H x W`` map in [0, 1] (original pixels).
        alpha: weight of the heatmap (0 = only the image).

    Returns:
        ``H x W x 3`` uint8 RGB.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(np.clip(np.asarray(image, np.float32), 0, 1)[..., None], 3, axis=2)
    return show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=1.0 - alpha)


def default_layer_name(model, backbone: str) -> str | None:
    """The dotted name of the layer Grad-CAM hooks by default.

    Known families come from :data:`~fracture_ops.model.network.CAM_LAYERS`; for other timm
    models (e.g. ``test_resnet``, whose name does not start with ``resnet``) it is timm's last
    feature stage, ``feature_info[-1]["module"]`` (``layer4`` there), not a pooling layer.
    """
    from fracture_ops.model.network import CAM_LAYERS

    family = next((f for f in CAM_LAYERS if backbone.startswith(f)), None)
    if family:
        return CAM_LAYERS[family]
    info = getattr(model, "feature_info", None)
    try:
        return str(info[-1]["module"])
    except (TypeError, IndexError, KeyError):
        return None


def resolve_target_layer(model, backbone: str, layer: str | None = None):
    """The module to hook: ``layer`` (a dotted path such as ``layer3`` or ``stages.-1``) or
    :func:`default_layer_name` (for known families the same module as
    :func:`fracture_ops.model.network.cam_target_layer`).

    Raises:
        ConfigError: ``layer`` does not name a module of the model.
    """
    from fracture_ops.model.network import cam_target_layer

    path = layer or default_layer_name(model, backbone)
    if path is None:
        return cam_target_layer(model, backbone)
    node = model
    try:
        for part in path.split("."):
            node = node[int(part)] if part.lstrip("-").isdigit() else getattr(node, part)
    except (AttributeError, IndexError, TypeError) as exc:
        raise ConfigError(f"target_layer {path!r} is not a module of {backbone}: {exc}") from exc
    return node


@dataclass
class LoadedModel:
    """A trained network with what it needs to preprocess images."""

    model: object
    info: dict
    image_size: int
    clahe: bool
    pre_size: int | None = None  # the shrink every served/evaluated image goes through first
    resize: str = "letterbox"  # the input geometry: letterbox or squash
    tta_hflip: bool = False  # scores average the mirror image's logits
    jpeg_draft: bool = False  # JPEGs decoded at reduced scale, as in its training
    mean: tuple | None = None  # input normalisation (None: ImageNet's, as models saved before)
    std: tuple | None = None

    def transform_spec(self) -> dict:
        """The model.pt ``transform`` record this was loaded from (what ``served_transform``
        reads)."""
        spec = {"image_size": self.image_size, "clahe": self.clahe, "resize": self.resize}
        if self.mean is not None and self.std is not None:
            spec.update(mean=self.mean, std=self.std)
        return spec


def load_classifier(model_uri: str, device: str = "cpu") -> LoadedModel:
    """Rebuild the network of a train step's ``model.pt`` (local or s3://).

    Raises:
        BadInputError: the file is missing or is not a fracture-ops checkpoint.
    """
    from fracture_ops.model.network import load_model

    if not storage.exists(model_uri):
        raise BadInputError(f"model file not found: {model_uri}")
    saved = load_model(storage.read_bytes(model_uri), model_uri, device)
    model, info, tf = saved.model, saved.info, saved.transform
    return LoadedModel(model, info, int(tf["image_size"]), bool(tf.get("clahe", False)),
                       tf.get("pre_size"), tf.get("resize", "letterbox"),
                       bool(tf.get("tta_hflip", False)), bool(tf.get("jpeg_draft", False)),
                       tf.get("mean"), tf.get("std"))


@dataclass
class CamResult:
    """One explained image: the map in original pixels and the raw logits of that forward pass
    (averaged with the mirror image's when the model scores with a test-time flip)."""

    cam: np.ndarray
    logits: np.ndarray


class GradCamExplainer:
    """Grad-CAM for one class of a loaded classifier.

    Args:
        loaded: the network (:func:`load_classifier`).
        class_name: the class to explain (default: the first; for binary, the positive class).
        target_layer: dotted module path overriding the backbone family's default layer.

    Raises:
        ConfigError: unknown class or layer.
    """

    def __init__(self, loaded: LoadedModel, class_name: str | None = None,
                 target_layer: str | None = None):
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import (
            BinaryClassifierOutputTarget,
            ClassifierOutputTarget,
        )

        from fracture_ops.model.preprocess import served_transform

        names = list(loaded.info["class_names"])
        self.class_name = class_name or names[0]
        if self.class_name not in names:
            raise ConfigError(f"class {self.class_name!r} is not one of the model's classes {names}")
        self.loaded = loaded
        self.layer_name = (target_layer or default_layer_name(loaded.model, loaded.info["backbone"])
                           or "(models.cam_target_layer fallback)")
        layer = resolve_target_layer(loaded.model, loaded.info["backbone"], target_layer)
        # one sigmoid logit: explain the positive score; K logits: the class's own logit
        self.target = (BinaryClassifierOutputTarget(1) if loaded.info["task"] == "binary"
                       else ClassifierOutputTarget(names.index(self.class_name)))
        self.transform = served_transform(loaded.transform_spec())
        self.cam = GradCAM(model=loaded.model, target_layers=[layer])

    def explain(self, image: np.ndarray, model_input: np.ndarray | None = None) -> CamResult:
        """Grad-CAM of one ``H x W`` [0, 1] image, mapped to its ``H x W`` pixels.

        The image goes through the same preprocessing as in evaluation and serving (shrink to
        ``pre_size``, float16 rounding), so the explained forward pass is the one that is scored.
        ``model_input``: the image as the model reads the file
        (:func:`~fracture_ops.model.preprocess.read_model_input`, a JPEG decoded at reduced
        scale), when ``image`` is the full-resolution decode shown in a report.
        """
        import cv2

        from fracture_ops.model.preprocess import preprocess

        small = preprocess(image if model_input is None else model_input, self.loaded.pre_size)
        tensor = self.transform(small)["image"][None].to(self.cam.device)
        maps = self.cam(input_tensor=tensor, targets=[self.target])
        logits = self.cam.outputs.detach().float().cpu().numpy()[0]
        if self.loaded.tta_hflip:  # the reported score is the served one (mirror averaged)
            import torch

            with torch.no_grad():
                mirrored = self.loaded.model(tensor.flip(-1)).detach().float().cpu().numpy()[0]
            logits = (logits + mirrored) / 2
        size = self.loaded.image_size
        geom = (letterbox_geometry(small.shape[0], small.shape[1], size)
                if self.loaded.resize == "letterbox"  # squash: the whole input is the image
                else Letterbox(size, small.shape[0], small.shape[1], size, size, 0, 0))
        cam = cam_to_original(maps[0], geom)
        if cam.shape != image.shape:
            cam = np.clip(cv2.resize(cam, (image.shape[1], image.shape[0]),
                                     interpolation=cv2.INTER_LINEAR), 0, 1).astype(np.float32)
        return CamResult(cam, logits)

    def close(self) -> None:
        """Remove the hooks from the model and drop the GradCAM object now.

        GradCAM releases its hooks again in ``__del__``; left to interpreter shutdown that runs
        after torch is torn down and prints a TypeError, so the object is deleted here.
        """
        if self.cam is not None:
            self.cam.activations_and_grads.release()
            self.cam = None

