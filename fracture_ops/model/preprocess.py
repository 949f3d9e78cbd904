"""Image transforms (albumentations) for training and evaluation.

Inputs are 2-D float32 radiographs in [0, 1] from :func:`fracture_ops.data.images.read_image`.
Outputs are 3xHxW float tensors: grayscale replicated to three channels, normalised with the
mean/std the backbone's pretrained weights expect (ImageNet's by default; the EfficientNet-Lite
weights of :mod:`fracture_ops.model.pretrained` were trained on 0.5/0.5). A model records its own
in model.pt's ``transform`` (:func:`served_transform` reads it back).

Geometry (``resize``): ``letterbox`` (default) shrinks the longer side to the output size and
pads the shorter one, so nothing of the image is cropped away and its proportions stay;
``squash`` resizes both sides to the output size. Eval is that geometry alone (deterministic).
Train starts from the same geometry (so the model trains on what it will be shown), then a
random resized crop of ``crop_scale``-100 % of that square, rotation of at most 10 degrees,
brightness/contrast by up to ``brightness_contrast``, optional CLAHE, and horizontal flip only
when the config allows it (laterality markers and left/right anatomy matter on radiographs).
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI update check at import

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(image_size: int, train: bool, *, hflip: bool = False, clahe: bool = False,
                     rotate_limit: float = 10.0, seed: int | None = None,
                     resize: str = "letterbox", crop_scale: float = 0.85,
                     brightness_contrast: float = 0.1, vflip: bool = False,
                     rotate90: bool = False, mean: tuple = IMAGENET_MEAN,
                     std: tuple = IMAGENET_STD):
    """Build the albumentations pipeline.

    Args:
        image_size: output side in pixels (square).
        train: random augmentation when True; deterministic resize/pad when False.
        hflip: allow horizontal flips (train only).
        clahe: apply CLAHE (contrast-limited adaptive histogram equalisation) in both modes.
        rotate_limit: maximum rotation in degrees (capped at 10).
        resize: ``letterbox`` (keep proportions, pad) or ``squash`` (both sides to the size).
        crop_scale: smallest area fraction of the random resized crop (train; 1.0: no crop).
        brightness_contrast: brightness and contrast limit of the random change (train; 0: off).
        vflip: allow vertical flips (train only).
        rotate90: random quarter turns of the square input (train only).
        mean, std: per-channel normalisation of the [0, 1] input (the pretrained weights').
        seed: seed of the pipeline's own random generator (albumentations 2 ignores global seeds);
            DataLoader workers reseed it per worker (see ``datasets._seed_worker``).

    Returns:
        A callable ``f(image=HxW float32) -> {"image": 3xHxW torch.Tensor}``; with
        ``mask=HxW uint8`` it also returns ``"mask"`` (HxW tensor) under the same geometry.
    """
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    ops: list = []
    if clahe:
        ops += [A.FromFloat(max_value=255, dtype="uint8"), A.CLAHE(clip_limit=2.0, p=1.0),
                A.ToFloat(max_value=255)]
    if resize not in ("letterbox", "squash"):
        raise ValueError(f"resize must be letterbox or squash, not {resize!r}")
    if resize == "squash":
        ops.append(A.Resize(image_size, image_size))
    else:
        ops += [A.LongestMaxSize(max_size=image_size),
                A.PadIfNeeded(min_height=image_size, min_width=image_size,
                              border_mode=cv2.BORDER_CONSTANT, fill=0)]
    if train:
        if crop_scale < 1.0:
            ops.append(A.RandomResizedCrop(size=(image_size, image_size), scale=(crop_scale, 1.0),
                                           ratio=(0.9, 1.1)))
        ops.append(A.Rotate(limit=min(float(rotate_limit), 10.0), border_mode=cv2.BORDER_CONSTANT,
                            fill=0, p=0.7))
        if brightness_contrast > 0:
            ops.append(A.RandomBrightnessContrast(brightness_limit=brightness_contrast,
                                                  contrast_limit=brightness_contrast, p=0.5))
        if hflip:
            ops.append(A.HorizontalFlip(p=0.5))
        if vflip:
            ops.append(A.VerticalFlip(p=0.5))
        if rotate90:
            ops.append(A.RandomRotate90(p=1.0))
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0), ToTensorV2()]
    pipeline = A.Compose(ops, seed=seed)

    def apply(image: np.ndarray, mask: np.ndarray | None = None):
        rgb = np.repeat(np.asarray(image, np.float32)[..., None], 3, axis=2)
        if mask is None:
            return pipeline(image=rgb)
        # a box mask goes through the same geometry (resize, pad, crop, rotation, flip)
        return pipeline(image=rgb, mask=mask)

    apply.pipeline = pipeline  # lets loader workers reseed it
    return apply


def served_transform(spec: dict):
    """The evaluation transform of a model from its ``model.pt`` ``transform`` record (size,
    CLAHE, geometry, normalisation; models saved before the record held a normalisation used
    ImageNet's)."""
    return build_transforms(int(spec["image_size"]), False, clahe=bool(spec.get("clahe", False)),
                            resize=spec.get("resize", "letterbox"),
                            mean=tuple(spec.get("mean", IMAGENET_MEAN)),
                            std=tuple(spec.get("std", IMAGENET_STD)))


def preprocess(img: np.ndarray, pre_size: int | None) -> np.ndarray:
    """What every image goes through before the transforms, in training, evaluation and serving:
    shrink (never enlarge) so the longer side is at most ``pre_size``, and round to float16 (the
    cache's precision), so cached and uncached paths give bit-identical inputs."""
    if pre_size:
        img = shrink_longest(img, pre_size)
    return img.astype(np.float16).astype(np.float32)


def read_model_input(uri: str, pre_size: int | None, jpeg_draft: bool = True) -> np.ndarray:
    """Decode ``uri`` and :func:`preprocess` it: the one way training, evaluation, batch
    inference and the served model read an image file for the network. JPEGs are decoded at a
    reduced scale no smaller than ``pre_size`` (see :func:`fracture_ops.data.images.read_image`)
    for models trained so (``jpeg_draft`` in model.pt's transform; models trained before that
    decode in full, as they were trained).

    Raises:
        ImageDecodeError: the file cannot be read (see ``read_image``).
    """
    from fracture_ops.data.images import read_image

    return preprocess(read_image(uri, max_side=pre_size if jpeg_draft else None)[0], pre_size)


def shrink_longest(img: np.ndarray, size: int) -> np.ndarray:
    """Shrink (never enlarge) a 2-D image so its longer side is at most ``size`` (area filter)."""
    import cv2

    h, w = img.shape
    scale = size / max(h, w)
    if scale >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)
