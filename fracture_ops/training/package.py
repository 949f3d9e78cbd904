"""The ``package`` step: log the deployable MLflow pyfunc model into the training run.

It bundles the best weights with the calibration and thresholds fitted on validation, and logs the
evaluation report, its plots and the Grad-CAM report beside it, all in the training step's MLflow
run (so one run holds everything a reviewer needs). Registration in the model registry is the
registry step's job.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.errors import BadInputError
from fracture_ops.registry.client import CLASSIFIER
from fracture_ops.model.network import MODEL_FILE

log = logging.getLogger(__name__)


class PackageConfig(StepConfig):
    """Config of the ``package`` step (every URI defaults to this run's step folders)."""

    section: ClassVar[str] = "package"
    train_dir: str = ""
    calibration_uri: str = ""
    thresholds_uri: str = ""
    evaluation_dir: str = ""
    cam_report_uri: str = ""
    example_image_uri: str = ""

    def resolved(self, name: str, step: str, file: str = "") -> str:
        value = getattr(self, name) or self.output_dir(step)
        return storage.join(value, file) if file and not value.endswith(file) else value


def _signature(class_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = []
    for c in class_names:
        # null (NaN) for a row whose image could not be read (see the error column)
        outputs += [ColSpec("double", f"prob_{c}", required=False),
                    ColSpec("long", f"decision_{c}", required=False)]
    outputs.append(ColSpec("string", "error", required=False))  # why a row could not be read
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema(outputs))


def _local_copy(uri: str, folder: Path, name: str) -> str:
    path = folder / name
    path.write_bytes(storage.read_bytes(uri))
    return str(path)


def package_step(cfg: PackageConfig) -> dict:
    """Log the pyfunc model and the evaluation artifacts to the training run.

    Raises:
        BadInputError: the training step did not finish, or a required input is missing.
    """
    from fracture_ops import tracking
    from fracture_ops.model.pyfunc import example_input

    train_dir = cfg.resolved("train_dir", "train")
    if not storage.is_complete(train_dir):
        raise BadInputError(f"package: training in {train_dir} has not finished (_SUCCESS missing)")
    info = storage.read_json(storage.join(train_dir, catalog.MODEL_INFO.file))
    inputs = {"model": storage.join(train_dir, MODEL_FILE),
              "calibration": cfg.resolved("calibration_uri", catalog.CALIBRATION.step, catalog.CALIBRATION.file),
              "thresholds": cfg.resolved("thresholds_uri", catalog.THRESHOLDS.step, catalog.THRESHOLDS.file)}
    for name, uri in inputs.items():
        if not storage.exists(uri):
            raise BadInputError(f"package: {name} input not found: {uri}")
    example_uri = cfg.example_image_uri or _first_test_image(info)
    out = cfg.output_dir("package")
    storage.reset_dir(out)
    mlflow, run, _ = tracking.start_or_resume(train_dir, info.get("experiment", CLASSIFIER),
                                               f"train-{cfg.run_id}")
    with run, tempfile.TemporaryDirectory() as tmp:
        artifacts = {k: _local_copy(u, Path(tmp), Path(u).name) for k, u in inputs.items()}
        # models from code: the registry stores pyfunc_code.py, never a pickled object
        model_info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc_code_file(), artifacts=artifacts,
            signature=_signature(info["class_names"]),
            input_example=example_input(example_uri) if example_uri else None,
            pip_requirements=_requirements())
        _log_reports(mlflow, cfg, Path(tmp))
    summary = {"model_uri": model_info.model_uri, "mlflow_run_id": run.info.run_id,
               "run_model_uri": f"runs:/{run.info.run_id}/model"}
    write_resolved(cfg, out)
    storage.write_json(storage.join(out, catalog.PACKAGE.file), summary)
    storage.mark_success(out, summary)
    return summary


def pyfunc_code_file() -> str:
    """The models-from-code file the classifier is logged as (not imported here: importing it
    registers the model with MLflow)."""
    from fracture_ops.model.pyfunc import CODE_FILE

    return str(CODE_FILE)


def _first_test_image(info: dict) -> str:
    """An image of the test (else val) split, for the model's input example."""
    table = storage.read_parquet(info["split_uri"])
    for split in ("test", "val"):
        rows = table[table["split"] == split]
        if len(rows):
            return str(rows["image_uri"].iloc[0])
    return ""


def _log_reports(mlflow, cfg: PackageConfig, tmp: Path) -> None:
    """Log evaluation.json, its plots and the CAM report when they exist."""
    eval_dir = cfg.resolved("evaluation_dir", "evaluate")
    for uri in storage.list_files(eval_dir, (".json", ".png", ".html")):
        mlflow.log_artifact(_local_copy(uri, tmp, Path(uri).name), "evaluation")
    done = storage.join(eval_dir, storage.SUCCESS_MARKER)  # holds the step summary with headline
    if storage.exists(done):
        mlflow.log_metrics(_headline(storage.read_json(done)))
    cam = cfg.resolved("cam_report_uri", "cam", "report.html")
    if storage.exists(cam):
        mlflow.log_artifact(_local_copy(cam, tmp, "gradcam_report.html"), "explain")


def _headline(doc: dict) -> dict[str, float]:
    """The evaluate step's headline numbers (AUROC with CI, AP, ECE...), prefixed ``test_``."""
    out = {}
    for key, value in (doc.get("headline") or {}).items():
        if isinstance(value, (int, float)) and np.isfinite(value):
            out[f"test_{key}"] = float(value)
    return out


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["torch", "timm", "albumentations", "pydicom", "numpy", "pandas", "pillow"]
    return [f"{p}=={version(p)}" for p in pkgs] + [f"fracture-ops=={version('fracture-ops')}"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops package [--train-dir D --calibration C --thresholds T]``."""
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("--train-dir", help="train step folder (default: this run's)")
    parser.add_argument("--calibration", help="calibration.json (default: this run's calibrate step)")
    parser.add_argument("--thresholds", help="thresholds.json (default: this run's tune_thresholds step)")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the package step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(PackageConfig, args, train_dir=args.train_dir,
                           calibration_uri=args.calibration, thresholds_uri=args.thresholds)
    return package_step(cfg)
