"""Trigger-form parameters of the training DAG: defaults, descriptions and validation schema.

Plain data (no Airflow import): the DAG turns each entry into an ``airflow.sdk.Param``; the
local demo uses the defaults directly.
"""

from __future__ import annotations

import json
import os
from typing import Any

BACKBONES = ["efficientnet_b0", "efficientnet_b3", "densenet121", "resnet18", "resnet50",
             "convnext_nano", "test_resnet"]
LAYOUTS = ["csv", "folder", "fracatlas", "grazpedwri", "mura"]

# Training profiles: the model-size fields set together. A profile fills each of these fields
# the user left at its default; a field set to anything else wins. "gpu" is the fields' own
# defaults (a GPU pod), "cpu-quick" the demo's small model that runs on a laptop's CPU.
PROFILE_FIELDS = ("backbone", "image_size", "epochs", "batch_size", "lr")
PROFILES: dict[str, dict[str, Any]] = {
    "cpu-quick": {"backbone": "test_resnet", "image_size": 128, "epochs": 12, "batch_size": 16,
                  "lr": 0.003},
    "gpu": {},  # the fields' defaults: efficientnet_b0, 384 px, 20 epochs, batch 32, lr 1e-3
}


def default_profile() -> str:
    """``gpu`` where steps run as Kubernetes pods (GPU pool), else ``cpu-quick``."""
    return "gpu" if os.environ.get("FRACTURE_OPS_RUNNER", "local").strip().lower() == "kubernetes" \
        else "cpu-quick"


TRAINING_PARAMS: dict[str, dict[str, Any]] = {
    "profile": {"default": default_profile(), "type": "string", "enum": list(PROFILES),
                "description": "Model size, set together for the fields below left at their "
                "defaults. cpu-quick: test_resnet, 128 px, 12 epochs, batch 16, lr 3e-3 (the "
                "demo's model; minutes on a laptop CPU, for trying the platform, not for "
                "accuracy). gpu: the fields as shown (efficientnet_b0, 384 px, 20 epochs, batch "
                "32; meant for a GPU pod, hours on a CPU). Default: gpu with the Kubernetes "
                "runner, cpu-quick with the local one.",
                "values_display": {"cpu-quick": "cpu-quick: small model, minutes on a CPU",
                                   "gpu": "gpu: full model, needs a GPU pod"}},
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


def resolve_profile(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the profile applied to the :data:`PROFILE_FIELDS` left at their defaults
    (what the ``train`` task receives; :func:`profile_template` is the same rule in Jinja)."""
    chosen = PROFILES.get(params.get("profile", "gpu"), {})
    return {**params, **{f: chosen[f] for f in PROFILE_FIELDS
                         if f in chosen and params.get(f) == TRAINING_PARAMS[f]["default"]}}


def profile_template(field: str) -> str:
    """A Jinja expression rendering ``field`` as :func:`resolve_profile` resolves it, for the
    step specs (Airflow and the local runner render the same way)."""
    values = {name: p[field] for name, p in PROFILES.items() if field in p}
    default = json.dumps(TRAINING_PARAMS[field]["default"])
    return (f"{{{{ {json.dumps(values)}.get(params.get('profile', 'gpu'), params.{field}) "
            f"if params.{field} == {default} else params.{field} }}}}")


def defaults(**overrides: Any) -> dict[str, Any]:
    """The default params, with overrides (unknown names are errors)."""
    unknown = set(overrides) - set(TRAINING_PARAMS)
    if unknown:
        raise KeyError(f"unknown training params: {sorted(unknown)}")
    return {k: v["default"] for k, v in training_params().items()} | overrides


def training_params() -> dict[str, dict[str, Any]]:
    """:data:`TRAINING_PARAMS` with the defaults that depend on the environment read now (the
    profile follows ``$FRACTURE_OPS_RUNNER`` at DAG parse time)."""
    return {**TRAINING_PARAMS, "profile": {**TRAINING_PARAMS["profile"], "default": default_profile()}}
