"""MLflow pyfunc wrapper of a trained YOLO ``.pt``, logged as code (MLflow "models from code").

MLflow stores this file with the model instead of a cloudpickle of an object, so loading runs no
pickled code. ``mlflow.pyfunc.load_model("models:/fracture-detector@challenger")`` returns a model
whose input is the classifier's: a DataFrame with one string column ``image`` (a local path /
``s3://`` URI, or the base64-encoded bytes of a PNG, JPEG or DICOM file). Output, one row per
image: ``score`` (highest box confidence, 0 without a box), ``n_boxes``, ``boxes`` (a JSON list of
``{class_id, class_name, confidence, x_min, y_min, x_max, y_max}`` in the original image's pixels),
``width``, ``height`` and ``error`` (empty, or why the image could not be read). Settings
(``imgsz``, ``conf``, ``iou``) come from the logged ``model_config``; ``params`` may override them.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class YoloDetectorModel(PythonModel):
    """pyfunc model: images in, boxes and an image-level score out."""

    def load_context(self, context) -> None:
        """Load the weights artifact with ultralytics (offline)."""
        from fracture_ops.detection.yolo import import_ultralytics

        import_ultralytics()
        from ultralytics import YOLO

        self.model = YOLO(context.artifacts["weights"], task="detect")
        self.config = dict(context.model_config or {})

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Boxes and scores for every row of ``model_input``."""
        from fracture_ops.detection.yolo import DetectConfig, predict_arrays
        from fracture_ops.errors import ImageDecodeError
        from fracture_ops.model.pyfunc import decode_input

        if "image" not in model_input.columns:
            raise ValueError("input needs a string column 'image' (URI or base64 file bytes)")
        s = {**self.config, **(params or {})}
        cfg = DetectConfig(imgsz=int(s.get("imgsz", 640)), iou=float(s.get("iou", 0.7)),
                           batch=int(s.get("batch", 8)), device=str(s.get("device", "auto")))
        rows, images, keys = [], [], []
        for i, value in enumerate(model_input["image"].astype(str)):
            try:
                images.append(decode_input(value))
                keys.append(str(i))
                rows.append(None)
            except ImageDecodeError as exc:
                rows.append({"score": 0.0, "n_boxes": 0, "boxes": "[]", "width": 0, "height": 0,
                             "error": exc.cause})
        preds = iter(predict_arrays(self.model, images, keys, cfg, float(s.get("conf", 0.25))))
        for i, row in enumerate(rows):
            if row is None:
                p = next(preds)
                rows[i] = {"score": p.score, "n_boxes": len(p.boxes), "boxes": json.dumps(p.boxes),
                           "width": p.width, "height": p.height, "error": ""}
        return pd.DataFrame(rows, index=model_input.index)


mlflow.models.set_model(YoloDetectorModel())
