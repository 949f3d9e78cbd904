"""Trigger-form parameters of the DAGs, generated from the step configs.

Each trigger parameter names the step config field it sets (:data:`DAG_FIELDS`); its default,
type, bounds, choices and description are read from that pydantic field
(:func:`fracture_ops.config.field_schema`), the same source as the step's CLI flag
(:func:`fracture_ops.cli_common.add_field_flags`), so the form, the flag and the config cannot
disagree. Only the two parameters that steer the DAG itself (``profile``, ``detection``) are
written here.

The step configs live beside code that imports pandas and torch, which a DAG file must not load
at parse time; so the generated forms are kept in ``trigger_forms.json`` beside this module
(``python -m fracture_ops.orchestration.params`` rewrites it) and a test fails when the file no
longer equals what the configs generate. Plain data (no Airflow import): the DAG turns each entry
into an ``airflow.sdk.Param``; the local demo uses the defaults directly.
"""

from __future__ import annotations

import json
import os
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fracture_ops import envvars

if TYPE_CHECKING:
    from pydantic import BaseModel

FORMS_FILE = Path(__file__).with_name("trigger_forms.json")

# Training profiles: the model-size fields set together. A profile fills each of these fields
# the user left at its default; a field set to anything else wins. "gpu" is the fields' own
# defaults (TrainConfig's: a GPU pod: tf_efficientnet_lite0 from its installed ImageNet weights)
# with the fine-tuning recipe that measured best on real radiographs (benchmarks/bench_realdata.py,
# docs/benchmarks.md), "cpu-quick" the demo's small model for a laptop's CPU.
RECIPE_FIELDS = ("hflip", "tta_hflip", "resize", "backbone_lr_scale", "weight_decay",
                 "rotate_limit", "brightness_contrast", "crop_scale")
PROFILE_FIELDS = ("backbone", "image_size", "epochs", "batch_size", "lr", "cv_below_images",
                  *RECIPE_FIELDS)
PROFILES: dict[str, dict[str, Any]] = {
    # no cross-validation: minutes, not the accuracy of a small data set's best path
    # a pretrained Lite0 (ImageNet weights installed with the package) learns the demo's data in
    # its first epochs whatever the key and seed (benchmarks/bench_demo.py); test_resnet from
    # scratch learnt late or not at all on some keys
    "cpu-quick": {"backbone": "tf_efficientnet_lite0", "image_size": 128, "epochs": 6,
                  "batch_size": 16, "lr": 0.001, "cv_below_images": 0},
    # TrainConfig's defaults, and the pretrained fine-tuning recipe of the real-data bench (its
    # PRETRAINED_RECIPE): flips (label-invariant for fracture presence) in training and at test
    # time, the whole image squashed to the input, the backbone at half the head's rate
    "gpu": {"hflip": True, "tta_hflip": True, "resize": "squash", "backbone_lr_scale": 0.5,
            "weight_decay": 0.01, "rotate_limit": 0.0, "brightness_contrast": 0.0,
            "crop_scale": 1.0},
}


def default_profile() -> str:
    """``gpu`` where steps run as Kubernetes pods (GPU pool), else ``cpu-quick``."""
    return "gpu" if os.environ.get(envvars.RUNNER, "local").strip().lower() == "kubernetes" \
        else "cpu-quick"


@cache
def dag_fields() -> dict[str, dict[str, tuple[type[BaseModel], str]]]:
    """Per DAG: trigger parameter -> (step config class, field). The one place a trigger
    parameter is tied to a step; ``specs.py`` passes it to that step as the field's CLI flag."""
    from fracture_ops.config import StepConfig
    from fracture_ops.data.sources import IngestConfig
    from fracture_ops.data.split import SplitConfig
    from fracture_ops.data.validation import ValidateConfig
    from fracture_ops.detection.yolo import DetectConfig
    from fracture_ops.inference.infer import InferConfig
    from fracture_ops.inference.shards import PlanConfig
    from fracture_ops.monitoring.drift_step import DriftConfig
    from fracture_ops.pacs.ingest import PacsIngestConfig
    from fracture_ops.pacs.report import PacsReportConfig
    from fracture_ops.workflows.fit import FitConfig

    root = {"artifact_root": (StepConfig, "artifact_root")}
    return {
        "fracture_training": {
            "source_uri": (IngestConfig, "source_uri"), "layout": (IngestConfig, "layout"),
            "patient_regex": (IngestConfig, "patient_regex"),
            "one_image_per_patient": (IngestConfig, "one_image_per_patient"),
            **root, "raw_root": (StepConfig, "raw_root"),
            **{f: (FitConfig, f) for f in ("backbone", "image_size", "epochs", "batch_size", "lr",
                                           "loss", "cv_below_images", "box_weight",
                                           "global_pool", "pretrained_path", *RECIPE_FIELDS)},
            "seed": (SplitConfig, "seed"),  # split and train (TrainConfig.seed: same field, test)
            "max_bad_fraction": (ValidateConfig, "max_bad_fraction"),
            "detect_epochs": (DetectConfig, "epochs"),
        },
        "fracture_inference": {"incoming_uri": (InferConfig, "incoming_uri"), **root,
                               "shards": (PlanConfig, "shards"),
                               "raw_root": (StepConfig, "raw_root"),
                               "pacs_dataset": (PacsReportConfig, "dataset")},
        "fracture_drift": {**root, "window_days": (DriftConfig, "window_days"),
                           "drift_share_threshold": (DriftConfig, "drift_share_threshold")},
        "fracture_promotion": dict(root),
        "fracture_pacs_ingest": {**root, "raw_root": (StepConfig, "raw_root"),
                                 "dataset": (PacsIngestConfig, "dataset"),
                                 "max_studies": (PacsIngestConfig, "max_studies")},
    }


def param_schema(cls: type[BaseModel], name: str) -> dict[str, Any]:
    """An ``airflow.sdk.Param``'s keyword arguments for a config field: its JSON schema
    (type, bounds, enum, description; ``examples`` become the form's proposals) and default."""
    from fracture_ops.config import field_schema

    schema = field_schema(cls, name)
    desc = schema.get("description", "")
    schema["description"] = desc + ("" if desc.endswith(".") else ".")
    schema["default"] = cls.model_fields[name].get_default(call_default_factory=True)
    return schema


def generate_forms() -> dict[str, dict[str, dict[str, Any]]]:
    """Every DAG's config-field parameters, generated from the step configs (imports them)."""
    return {dag: {name: param_schema(cls, field) for name, (cls, field) in fields.items()}
            for dag, fields in dag_fields().items()}


@cache
def _stored_forms() -> dict[str, dict[str, dict[str, Any]]]:
    return json.loads(FORMS_FILE.read_text(encoding="utf-8"))


def _resolve_env_default(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The roots' defaults are computed where the DAG is parsed, by the config's rules: the
    artifact root is ``$FRACTURE_OPS_ARTIFACT_ROOT`` or ``data/artifacts`` (the form shows a real
    path); the raw root is ``$FRACTURE_OPS_RAW_ROOT`` or empty (then ``<artifact_root>-raw``)."""
    if schema.get("default"):
        return schema
    if name == "artifact_root":
        from fracture_ops.config import default_artifact_root

        return {**schema, "default": default_artifact_root()}
    if name == "raw_root":
        from fracture_ops.config import RAW_ROOT_ENV

        return {**schema, "default": os.environ.get(RAW_ROOT_ENV, "")}
    return schema


# the parameters that steer the DAG itself, not a step
DAG_ONLY: dict[str, dict[str, dict[str, Any]]] = {
    "fracture_inference": {
        "pacs_results": {"default": False, "type": "boolean",
                         "description": "Also send the champion's results on the studies pulled "
                         "from the PACS (fracture_pacs_ingest, dataset pacs_dataset) back to the "
                         "PACS: a DICOM SR and a Grad-CAM secondary capture per radiograph, under "
                         "the original study. Off by default."},
    },
    "fracture_training": {
        "profile": {"default": "cpu-quick", "type": "string", "enum": list(PROFILES),
                    "description": "Model size, set together for the fields below left at their "
                    "defaults. cpu-quick: tf_efficientnet_lite0 from its installed ImageNet weights, "
                    "128 px, 6 epochs, batch 16, lr 1e-3 (the demo's model; minutes on a laptop "
                    "CPU, for trying the platform, not for accuracy; no cross-validation). gpu: "
                    "the fields as shown (meant for a GPU pod, hours on a CPU). "
                    "Default: gpu with the Kubernetes runner, cpu-quick with the local one.",
                    "values_display": {"cpu-quick": "cpu-quick: small model, minutes on a CPU",
                                       "gpu": "gpu: full model, needs a GPU pod"}},
        "detection": {"default": False, "type": "boolean",
                      "description": "Also train the YOLOv8 localisation track on the boxes."},
        "gpus": {"default": 1, "type": "integer", "minimum": 1, "maximum": 8,
                 "description": "GPUs of the training pod. More than 1: the pod requests them and "
                 "trains one model with one process per GPU (DDP under torchrun), the same "
                 "command otherwise. With the local runner: that many processes."},
        "nodes": {"default": 1, "type": "integer", "minimum": 1, "maximum": 32,
                  "description": "Nodes to train on. More than 1 (Kubernetes runner, Kubeflow "
                  "Trainer installed): the training step runs as a TrainJob of this many nodes "
                  "with `gpus` GPUs each, the same command on every node (DDP across nodes). "
                  "The local runner trains on one machine only."},
    },
}


def dag_params(dag_id: str) -> dict[str, dict[str, Any]]:
    """The trigger form of ``dag_id``: the DAG's own parameters, then one per step config field
    (defaults that depend on the environment read now, at DAG parse time)."""
    own = {k: dict(v) for k, v in DAG_ONLY.get(dag_id, {}).items()}
    if "profile" in own:
        own["profile"]["default"] = default_profile()
    fields = {name: _resolve_env_default(name, dict(schema))
              for name, schema in _stored_forms()[dag_id].items()}
    return {**own, **fields}


def training_params() -> dict[str, dict[str, Any]]:
    """The ``fracture_training`` trigger form."""
    return dag_params("fracture_training")


def field_default_of(param: str) -> Any:
    """The default of a training trigger parameter."""
    return training_params()[param]["default"]


def resolve_profile(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the profile applied to the :data:`PROFILE_FIELDS` left at their defaults
    (what the ``train`` task receives; :func:`profile_template` is the same rule in Jinja)."""
    chosen = PROFILES.get(params.get("profile", "gpu"), {})
    form = training_params()
    return {**params, **{f: chosen[f] for f in PROFILE_FIELDS
                         if f in chosen and params.get(f) == form[f]["default"]}}


def profile_template(field: str) -> str:
    """A Jinja expression rendering ``field`` as :func:`resolve_profile` resolves it, for the
    step specs (Airflow and the local runner render the same way)."""
    values = {name: p[field] for name, p in PROFILES.items() if field in p}
    default = json.dumps(field_default_of(field))
    return (f"{{{{ {json.dumps(values)}.get(params.get('profile', 'gpu'), params.{field}) "
            f"if params.{field} == {default} else params.{field} }}}}")


def defaults(**overrides: Any) -> dict[str, Any]:
    """The training form's default params, with overrides (unknown names are errors)."""
    form = training_params()
    unknown = set(overrides) - set(form)
    if unknown:
        raise KeyError(f"unknown training params: {sorted(unknown)}")
    return {k: v["default"] for k, v in form.items()} | overrides


def main(argv: list[str] | None = None) -> int:
    """``python -m fracture_ops.orchestration.params [--check]``: rewrite (or check) the stored
    trigger forms from the step configs."""
    text = json.dumps(generate_forms(), indent=2, sort_keys=True) + "\n"
    if "--check" in (argv if argv is not None else sys.argv[1:]):
        same = FORMS_FILE.exists() and FORMS_FILE.read_text(encoding="utf-8") == text
        print(f"{FORMS_FILE.name}: {'up to date' if same else 'stale: run python -m fracture_ops.orchestration.params'}")
        return 0 if same else 1
    FORMS_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {FORMS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
