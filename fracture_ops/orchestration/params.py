"""Trigger-form parameters of the training DAG: defaults, descriptions and validation schema.

Plain data (no Airflow import): the DAG turns each entry into an ``airflow.sdk.Param``; the
local demo uses the defaults directly.
"""

from __future__ import annotations

import os
from typing import Any

BACKBONES = ["efficientnet_b0", "efficientnet_b3", "densenet121", "resnet18", "resnet50",
             "convnext_nano", "test_resnet"]
LAYOUTS = ["csv", "folder", "fracatlas", "grazpedwri", "mura"]

TRAINING_PARAMS: dict[str, dict[str, Any]] = {
    "source_uri": {"default": "data/demo/synthetic/manifest.csv", "type": "string",
                   "description": "Data source: folder, CSV file or s3:// URI of the raw data set."},
    "layout": {"default": "csv", "type": "string", "enum": LAYOUTS,
               "description": "Layout of the data source (csv, folder, fracatlas, grazpedwri, mura)."},
    "artifact_root": {"default": os.environ.get("FRACTURE_OPS_ARTIFACT_ROOT", "data/artifacts"),
                      "type": "string",
                      "description": "Where run folders go: a local folder or an s3:// prefix."},
    "raw_root": {"default": os.environ.get("FRACTURE_OPS_RAW_ROOT", ""), "type": "string",
                 "description": "Raw zone for the identifying tables before de-identification "
                 "(its own bucket and credentials, with an expiry); empty: <artifact_root>-raw."},
    "backbone": {"default": "efficientnet_b0", "type": "string", "enum": BACKBONES,
                 "description": "timm backbone of the classifier."},
    "image_size": {"default": 384, "type": "integer", "minimum": 64, "maximum": 1024,
                   "description": "Input side in pixels (320-512 typical; smaller for CPU demos)."},
    "epochs": {"default": 20, "type": "integer", "minimum": 1, "maximum": 500,
               "description": "Training epochs (early stopping on validation AUROC may stop sooner)."},
    "batch_size": {"default": 32, "type": "integer", "minimum": 1, "maximum": 1024,
                   "description": "Training batch size."},
    "lr": {"default": 0.001, "type": "number", "exclusiveMinimum": 0, "maximum": 1,
           "description": "Peak learning rate of AdamW."},
    "loss": {"default": "bce", "type": "string", "enum": ["bce", "focal", "ce"],
             "description": "Loss: bce (binary/multi-label), focal, ce (multi-class)."},
    "seed": {"default": 0, "type": "integer", "minimum": 0,
             "description": "Seed of the split, the training and the bootstrap."},
    "max_bad_fraction": {"default": 0.05, "type": "number", "minimum": 0, "maximum": 1,
                         "description": "Validation error budget: fail when more rows are bad."},
    "detection": {"default": False, "type": "boolean",
                  "description": "Also train the YOLOv8 localisation track on the boxes."},
    "detect_epochs": {"default": 50, "type": "integer", "minimum": 1,
                      "description": "YOLO epochs (detection branch only)."},
}


def defaults(**overrides: Any) -> dict[str, Any]:
    """The default params, with overrides (unknown names are errors)."""
    unknown = set(overrides) - set(TRAINING_PARAMS)
    if unknown:
        raise KeyError(f"unknown training params: {sorted(unknown)}")
    return {k: v["default"] for k, v in TRAINING_PARAMS.items()} | overrides
