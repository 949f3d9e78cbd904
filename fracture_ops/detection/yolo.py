"""YOLOv8 (ultralytics) train / validate / predict, offline by construction.

ultralytics reaches for the network in several places; each is closed before it is imported:

- ``YOLO_OFFLINE=1`` makes ``ultralytics.utils.ONLINE`` False (no update checks, no auto-installs,
  no analytics); it is read once at import, so :func:`import_ultralytics` sets it first.
- ``YOLO_CONFIG_DIR`` keeps its settings file out of ``~/.config``; the integrations that would log
  elsewhere (its own MLflow callback, ClearML, Comet, DVC, ...) are switched off in those settings,
  because this project logs to MLflow itself.
- ``check_det_dataset`` always asks for ``Arial.ttf`` and downloads it when missing, whatever
  ``plots`` says; matplotlib's bundled DejaVu Sans (Bitstream Vera licence) is copied under that
  name into the config folder, so the lookup is satisfied locally.
- the AMP check loads ``yolo26n.pt`` (a download). It runs only for fp16 AMP, so training uses
  ``amp=False`` on CPU and bf16 autocast (which skips the check) on CUDA GPUs that support it.
- weights named by the user must be a local file; that is checked before ultralytics sees the
  name, which would otherwise try a GitHub download for an unknown ``*.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.errors import ConfigError
from fracture_ops.registry.client import DETECTOR

log = logging.getLogger(__name__)

ARCHITECTURES = ("yolov8n.yaml", "yolov8s.yaml", "yolov8m.yaml")
# train() keys this module sets itself; a pass-through override of them would break offline use
# or the output layout.
RESERVED_TRAIN_ARGS = {"data", "epochs", "imgsz", "batch", "device", "workers", "amp", "plots",
                       "project", "name", "exist_ok", "seed", "patience", "pretrained", "model",
                       "resume", "save_dir", "verbose"}
_INTEGRATIONS_OFF = {"sync": False, "mlflow": False, "clearml": False, "comet": False, "dvc": False,
                     "raytune": False, "tensorboard": False, "wandb": False}


class DetectConfig(StepConfig):
    """Config of the ``detect`` steps (train, val, predict)."""

    section: ClassVar[str] = "detect"

    split_uri: str = ""  # split.parquet (manifest + split column)
    boxes_uri: str | None = None  # boxes.parquet (pixel boxes); none: every image is a negative
    source_uri: str = ""  # predict: an image file or a folder of images
    model: str = "yolov8n.yaml"  # architecture for training from scratch: yolov8{n,s,m}.yaml or a local yaml
    weights: str | None = None  # local .pt: starting weights (train) or the model (val, predict)
    class_names: list[str] | None = None
    imgsz: int = Field(640, ge=32, le=4096)
    epochs: int = Field(50, ge=1, description="YOLO training epochs (the detection branch)")
    batch: int = Field(16, ge=1)
    patience: int = Field(50, ge=1)
    device: str = "auto"  # auto: CUDA when available, else CPU; or "cpu", "0", "0,1"
    workers: int = Field(2, ge=0)
    amp: bool = True  # mixed precision on CUDA (bf16); always off on CPU
    seed: int = 0
    train_args: dict[str, Any] = Field(default_factory=dict)  # other ultralytics train() arguments
    conf: float = Field(0.25, ge=0, le=1)  # boxes reported by predict and drawn in reports
    score_conf: float = Field(0.001, ge=0, le=1)  # boxes that count for the image-level score
    iou: float = Field(0.7, gt=0, le=1)  # NMS IoU
    eval_split: Literal["val", "test"] = "test"
    spec_target: float = Field(0.80, gt=0, lt=1)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    report_images: int = Field(24, ge=0)
    sample_images: int = Field(4, ge=0)  # prediction overlays logged to MLflow
    mlflow: bool = True
    experiment: str = "fracture-detection"
    registered_model: str = DETECTOR
    register_model: bool = True  # register in MLflow as `registered_model`

    @field_validator("imgsz")
    @classmethod
    def _stride_multiple(cls, v: int) -> int:
        if v % 32:
            raise ValueError("imgsz must be a multiple of 32 (the YOLOv8 stride)")
        return v

    @field_validator("train_args")
    @classmethod
    def _no_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(v) & RESERVED_TRAIN_ARGS)
        if clash:
            raise ValueError(f"train_args may not set {clash}: they have their own config fields")
        return v


@dataclass
class ImagePrediction:
    """Boxes predicted on one image, in the original image's pixel coordinates."""

    image_id: str
    width: int
    height: int
    boxes: list[dict] = field(default_factory=list)  # class_id, class_name, confidence, x_min..y_max
    image_score: float | None = None  # set when ``boxes`` was filtered after scoring

    @property
    def score(self) -> float:
        """Image-level fracture score: the highest box confidence, 0 without a box."""
        if self.image_score is not None:
            return self.image_score
        return max((b["confidence"] for b in self.boxes), default=0.0)

    def to_json(self) -> dict:
        """JSON-ready dict (rounded to 0.01 px and 1e-4 confidence)."""
        return {"image_id": self.image_id, "width": self.width, "height": self.height,
                "score": round(self.score, 4), "boxes": [
                    {**b, "confidence": round(b["confidence"], 4),
                     **{k: round(b[k], 2) for k in ("x_min", "y_min", "x_max", "y_max")}}
                    for b in self.boxes]}


def default_config_dir(artifact_root: str) -> Path:
    """Where ultralytics keeps settings and its font: ``<artifact_root>/.ultralytics`` when local."""
    if storage.is_s3(artifact_root):
        return Path.home() / ".cache" / "fracture_ops" / "ultralytics"
    return Path(artifact_root).resolve() / ".ultralytics"


def import_ultralytics(config_dir: str | Path | None = None):
    """Import ultralytics offline with its integrations off; returns the ``ultralytics`` module.

    Args:
        config_dir: ``YOLO_CONFIG_DIR`` to use unless the environment already names one.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    if "ultralytics" in sys.modules and not os.environ.get("YOLO_CONFIG_DIR"):
        log.warning("ultralytics was imported before fracture_ops set YOLO_CONFIG_DIR")
    if config_dir is not None:
        os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    if not os.environ.get("YOLO_CONFIG_DIR"):
        from fracture_ops.config import default_artifact_root

        os.environ["YOLO_CONFIG_DIR"] = str(default_config_dir(default_artifact_root()))
    base = Path(os.environ["YOLO_CONFIG_DIR"])
    _install_font(base / "Ultralytics")
    import ultralytics
    from ultralytics.utils import SETTINGS

    if any(SETTINGS.get(k) != v for k, v in _INTEGRATIONS_OFF.items()):
        SETTINGS.update(_INTEGRATIONS_OFF)
    return ultralytics


def _install_font(folder: Path) -> None:
    """Place a local font where ultralytics looks for ``Arial.ttf`` (else it downloads one)."""
    import matplotlib

    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (folder / name).exists():
            shutil.copyfile(src, folder / name)


def resolve_device(device: str) -> str:
    """``auto`` -> ``"0"`` when CUDA is available, else ``"cpu"``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def amp_mode(device: str, wanted: bool) -> bool | str:
    """ultralytics ``amp`` value: False on CPU; ``"bf16"`` on CUDA with bf16 (skips the AMP
    check, which downloads weights); False otherwise."""
    if not wanted or device == "cpu":
        return False
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else False


def check_weights(path: str | None, required: bool) -> Path | None:
    """Check that user-named weights are a local ``.pt`` file.

    Raises:
        ConfigError: required but not given, not a ``.pt`` file, or not found (before ultralytics,
            which would try a download).
    """
    if not path:
        if required:
            raise ConfigError("weights: a local .pt file is required (e.g. detect_train/weights/best.pt)")
        return None
    if storage.is_s3(path) or "://" in path:
        raise ConfigError(f"weights must be a local .pt file, not a URI: {path}")
    p = Path(path).expanduser()
    if p.suffix != ".pt":
        raise ConfigError(f"weights must be a .pt file: {path}")
    if not p.is_file():
        raise ConfigError(f"weights file not found: {path} (nothing is downloaded; name a local file)")
    return p.resolve()


def check_architecture(model: str) -> str:
    """Return a model yaml ultralytics can build offline.

    Raises:
        ConfigError: neither a known YOLOv8 yaml nor an existing local yaml file.
    """
    if model in ARCHITECTURES or (model.endswith((".yaml", ".yml")) and Path(model).is_file()):
        return model
    raise ConfigError(f"model must be one of {', '.join(ARCHITECTURES)} or a local yaml file, "
                      f"got {model!r} (use 'weights' for a .pt file)")


def load_model(cfg: DetectConfig, for_training: bool):
    """Build or load the YOLO model named by ``cfg`` (weights checked first, then ultralytics)."""
    weights = check_weights(cfg.weights, required=not for_training)
    arch = None if weights else check_architecture(cfg.model)
    import_ultralytics(default_config_dir(cfg.artifact_root))
    from ultralytics import YOLO

    if weights:
        log.info("detect: loading weights %s", weights.name)
        return YOLO(str(weights), task="detect")
    log.info("detect: no weights named; training %s from scratch", arch)
    return YOLO(arch, task="detect")


def train(cfg: DetectConfig, data_yaml: Path, work_dir: Path) -> Path:
    """Train; returns the path of ``best.pt`` under ``work_dir/ultralytics/weights``."""
    model = load_model(cfg, for_training=True)
    device = resolve_device(cfg.device)
    model.train(data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch,
                device=device, workers=cfg.workers, amp=amp_mode(device, cfg.amp), plots=False,
                project=str(work_dir), name="ultralytics", exist_ok=True, seed=cfg.seed,
                patience=cfg.patience, verbose=False, **cfg.train_args)
    best = work_dir / "ultralytics" / "weights" / "best.pt"
    if not best.is_file():
        best = work_dir / "ultralytics" / "weights" / "last.pt"
    return best


def validate(cfg: DetectConfig, weights: Path, data_yaml: Path, split: str, work_dir: Path):
    """Run ultralytics validation on one split; returns its ``DetMetrics``."""
    model = load_model(cfg.model_copy(update={"weights": str(weights)}), for_training=False)
    device = resolve_device(cfg.device)
    run_dir = work_dir / f"val_{split}"
    metrics = model.val(data=str(data_yaml), split=split, imgsz=cfg.imgsz, batch=cfg.batch,
                        device=device, workers=cfg.workers, plots=False, project=str(work_dir),
                        name=run_dir.name, exist_ok=True, iou=cfg.iou, verbose=False)
    with contextlib.suppress(OSError):  # plots=False leaves it empty
        run_dir.rmdir()
    return metrics


def to_bgr_uint8(img: np.ndarray) -> np.ndarray:
    """A [0, 1] grayscale image -> the HxWx3 uint8 array ultralytics takes (BGR; gray so equal)."""
    from fracture_ops.data.images import to_uint8

    return np.repeat(to_uint8(img)[..., None], 3, axis=2)


def result_boxes(result) -> list[dict]:
    """Boxes of one ultralytics ``Results`` as dicts, in the original image's pixel coordinates.

    ultralytics maps boxes from the letterboxed network input back to the image it was given
    (``ops.scale_boxes`` in ``DetectionPredictor.construct_result``), and ``to_bgr_uint8`` gives it
    the image at its original size, so ``boxes.xyxy`` is already in original pixels.
    """
    b = result.boxes
    if b is None or len(b) == 0:
        return []
    xyxy, conf, cls = (t.detach().cpu().numpy() for t in (b.xyxy, b.conf, b.cls))
    names = result.names
    return [{"class_id": int(c), "class_name": str(names[int(c)]), "confidence": float(p),
             "x_min": float(x0), "y_min": float(y0), "x_max": float(x1), "y_max": float(y1)}
            for (x0, y0, x1, y1), p, c in zip(xyxy, conf, cls)]


def predict_arrays(model, images: list[np.ndarray], ids: list[str], cfg: DetectConfig,
                   conf: float) -> list[ImagePrediction]:
    """Predict on [0, 1] grayscale images at original size, in batches of ``cfg.batch``."""
    device = resolve_device(cfg.device)
    out: list[ImagePrediction] = []
    for start in range(0, len(images), cfg.batch):
        chunk = [to_bgr_uint8(im) for im in images[start:start + cfg.batch]]
        results = model.predict(source=chunk, imgsz=cfg.imgsz, conf=conf, iou=cfg.iou,
                                device=device, verbose=False, save=False)
        for image_id, arr, res in zip(ids[start:start + cfg.batch], chunk, results):
            out.append(ImagePrediction(image_id, arr.shape[1], arr.shape[0], result_boxes(res)))
    return out


def predict_uris(model, uris: list[str], ids: list[str], cfg: DetectConfig,
                 conf: float) -> tuple[list[ImagePrediction], list[dict]]:
    """Read images with ``read_image`` (PNG/JPEG/DICOM, any bit depth) and predict.

    Returns:
        ``(predictions, quarantined)``; unreadable images are quarantined with their reason.
    """
    from fracture_ops.data.images import read_image
    from fracture_ops.errors import ImageDecodeError

    preds: list[ImagePrediction] = []
    bad: list[dict] = []
    for start in range(0, len(uris), cfg.batch):
        imgs, keep = [], []
        for uri, image_id in zip(uris[start:start + cfg.batch], ids[start:start + cfg.batch]):
            try:
                imgs.append(read_image(uri)[0])
                keep.append(image_id)
            except ImageDecodeError as exc:
                bad.append({"image_id": image_id, "reason": exc.cause})
        if imgs:
            preds += predict_arrays(model, imgs, keep, cfg, conf)
    return preds, bad
