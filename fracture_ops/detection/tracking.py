"""MLflow logging and registration of a detection run.

The tracking store is the project's (:mod:`fracture_ops.tracking`: ``$MLFLOW_TRACKING_URI``, else
the embedded SQLite store under ``$FRACTURE_OPS_MLFLOW_DIR`` or ``./data/mlflow``; MLflow 3.17
refuses a ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``), so the detector and the
classifier sit in one registry.

The detector is registered as its own registered model (``fracture-detector`` by default): a pyfunc
model (:mod:`fracture_ops.detection.pyfunc_model`, logged as code, not as a pickle) carrying
``best.pt`` as an artifact. Registry writes check before they create: the registered model is
created only when missing, a run that already has a version gets no second one, and the version
gets the alias ``challenger`` (``champion`` is left to a person, as for the classifier).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fracture_ops.registry.client import CHALLENGER

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_DESCRIPTION = ("YOLOv8 fracture localisation (boxes + image-level score). Research and "
                     "education only; not for clinical use.")


def ensure_registered_model(client, name: str) -> None:
    """Create the detector's registered model only when it does not exist yet."""
    from fracture_ops.registry.client import ensure_registered_model as ensure

    ensure(client, name, MODEL_DESCRIPTION, {"task": "detection", "framework": "ultralytics"})


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> ``{"a.b": value}`` with numbers only (NaN and strings dropped)."""
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{key}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[key] = float(v)
    return out


def log_detection_run(cfg, metrics: dict, weights: Path, files: list[Path], samples: list[Path],
                      tags: dict[str, str] | None = None, example_image: str | None = None) -> dict:
    """Log params, metrics, weights, files and sample overlays; register the model.

    Args:
        cfg: the :class:`fracture_ops.detection.yolo.DetectConfig` of the run.
        metrics: nested metrics (flattened with dots for MLflow).
        weights: ``best.pt``.
        files: extra artifacts (metrics.json, report.html, config.resolved.yaml).
        samples: prediction overlay PNGs.
        tags: extra run tags (hashes of the data).
        example_image: an image file for the registered model's input example.

    Returns:
        ``{"mlflow_run_id", "model_name", "model_version"}`` (version None when not registering).
    """
    from fracture_ops import tracking

    mlflow = tracking.setup(cfg.experiment)
    params = {k: v for k, v in cfg.model_dump(mode="json").items()
              if k not in ("artifact_root", "split_uri", "boxes_uri", "source_uri")}
    with mlflow.start_run(run_name=f"detect-{cfg.run_id}") as run:
        mlflow.set_tags({"step": "detect_train", "task": "detection", "pipeline_run_id": cfg.run_id,
                         **(tags or {})})
        mlflow.log_params(tracking.flatten(params))
        mlflow.log_metrics(flat_metrics(metrics))
        mlflow.log_artifact(str(weights), "weights")
        for f in files:
            mlflow.log_artifact(str(f))
        for s in samples:
            mlflow.log_artifact(str(s), "samples")
        version = (register(cfg, run.info.run_id, weights, metrics, example_image)
                   if cfg.register_model else None)
    return {"mlflow_run_id": run.info.run_id, "model_name": cfg.registered_model,
            "model_version": version}


def register(cfg, run_id: str, weights: Path, metrics: dict, example_image: str | None = None) -> str:
    """Log the pyfunc model into the active run and register it, once per run.

    Returns:
        The version number (the existing one when this run was registered before).
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    ensure_registered_model(client, cfg.registered_model)
    # once per pipeline run: a retried task (new MLflow run, same run folder) reuses its version
    for v in client.search_model_versions(f"name='{cfg.registered_model}'"):
        if v.run_id == run_id or v.tags.get("pipeline_run_id") == cfg.run_id:
            return str(v.version)
    model_config = {"imgsz": cfg.imgsz, "conf": cfg.conf, "iou": cfg.iou,
                    "class_names": list(cfg.class_names or [])}
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(PYFUNC_FILE), artifacts={"weights": str(weights)},
        model_config=model_config, signature=_signature(),
        input_example=_example(example_image) if example_image else None,
        pip_requirements=["fracture-ops[train]"])
    tags = {"task": "detection", "pipeline_run_id": cfg.run_id,
            **{f"metric.{k}": f"{v:.4f}" for k, v in flat_metrics(metrics).items()
               if k in ("map50", "map50_95", "image_level.auroc")}}
    mv = mlflow.register_model(info.model_uri, cfg.registered_model, tags=tags)
    client.set_registered_model_alias(cfg.registered_model, CHALLENGER, mv.version)
    log.info("detect: registered %s version %s (alias %s)", cfg.registered_model, mv.version,
             CHALLENGER)
    return str(mv.version)


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    out = [ColSpec("double", "score"), ColSpec("long", "n_boxes"), ColSpec("string", "boxes"),
           ColSpec("long", "width"), ColSpec("long", "height"), ColSpec("string", "error")]
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema(out))


def _example(image_uri: str):
    """A one-row input example holding the base64 bytes of an image (as the classifier's)."""
    import base64

    import pandas as pd

    from fracture_ops import storage

    return pd.DataFrame({"image": [base64.b64encode(storage.read_bytes(image_uri)).decode("ascii")]})
