"""The classification chain end to end on the real FracAtlas subset (CPU, from scratch):
ingest -> validate -> split -> train -> calibrate -> tune -> evaluate -> Grad-CAM report.
Metrics are modest from scratch on 300 images; the test asserts every artifact exists and the
numbers are well-formed, and prints them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_fracatlas_chain_produces_every_artifact(realdata, tmp_path, monkeypatch):
    from fracture_ops.data.sources import IngestConfig, ingest_step
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.validation import ValidateConfig, validate_step
    from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
    from fracture_ops.evaluation.evaluate import EvaluateConfig, evaluate_step
    from fracture_ops.evaluation.thresholds import TuneThresholdsConfig, tune_thresholds_step
    from fracture_ops.explain.cam import CamConfig, cam_step
    from fracture_ops.training.train import TrainConfig, train_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = dict(artifact_root=str(tmp_path / "art"), run_id="fracatlas")
    ingest = ingest_step(IngestConfig(source_uri=str(realdata / "fracatlas"), layout="fracatlas", **root))
    valid = validate_step(ValidateConfig(manifest_uri=ingest["manifest_uri"], **root))
    assert valid["rows"] == 300 and valid["clean"] + valid["quarantined"] == 300
    split = split_step(SplitConfig(manifest_uri=valid["clean_manifest_uri"], seed=0, **root))
    train = train_step(TrainConfig(split_uri=split["split_uri"], backbone="resnet18", image_size=160,
                                   epochs=4, batch_size=16, lr=1e-3, **root))
    run = Path(root["artifact_root"], "runs", "fracatlas")
    calibrate_step(CalibrateConfig(**root))
    tune_thresholds_step(TuneThresholdsConfig(calibration_uri=str(run / "calibrate"), **root))
    ev = evaluate_step(EvaluateConfig(calibration_uri=str(run / "calibrate"),
                                      thresholds_uri=str(run / "tune_thresholds"), n_bootstrap=300, **root))
    cam_step(CamConfig(top_k=4, max_errors=4, **root))
    for rel in ("train/model.pt", "train/predictions.parquet", "calibrate/calibration.json",
                "tune_thresholds/thresholds.json", "evaluate/evaluation.json", "evaluate/roc.png",
                "evaluate/pr.png", "evaluate/confusion.png", "evaluate/reliability.png",
                "cam/report.html", "cam/cams.json"):
        assert (run / rel).exists(), rel
        assert (run / rel.split("/")[0] / "_SUCCESS").exists()
    headline = ev["headline"]
    assert 0.0 <= headline["auroc"] <= 1.0 and not math.isnan(headline["ece"])
    print("\nFracAtlas (resnet18 @160 px, 4 epochs from scratch, CPU):",
          json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()}),
          f"best val AUROC {train['best_val_auroc']}")


def test_fracatlas_dag_path_refits_on_every_training_patient(realdata, tmp_path, monkeypatch):
    """The training DAG's train task (`fit`) on the 300 real images: below the size threshold it
    cross-validates, then refits on every training patient; compared with a model trained the
    train/val way on the same split (fewer images), the counts say so, and calibration and
    thresholds come from the out-of-fold predictions (corrupting the test rows changes nothing)."""
    from fracture_ops import storage
    from fracture_ops.data.sources import IngestConfig, ingest_step
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.validation import ValidateConfig, validate_step
    from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
    from fracture_ops.evaluation.thresholds import TuneThresholdsConfig, tune_thresholds_step
    from fracture_ops.training.train import TrainConfig, train_step
    from fracture_ops.workflows.fit import FitConfig, fit_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = dict(artifact_root=str(tmp_path / "art"), run_id="refit")
    ingest = ingest_step(IngestConfig(source_uri=str(realdata / "fracatlas"), layout="fracatlas", **root))
    valid = validate_step(ValidateConfig(manifest_uri=ingest["manifest_uri"], **root))
    split_uri = split_step(SplitConfig(manifest_uri=valid["clean_manifest_uri"], seed=0, **root))["split_uri"]
    split = storage.read_parquet(split_uri)
    quick = dict(split_uri=split_uri, backbone="test_resnet", image_size=64, epochs=1,
                 batch_size=32, device="cpu")
    s = fit_step(FitConfig(**quick, folds=2, **root))
    assert s["fit_path"] == "cv+refit"
    held = train_step(TrainConfig(**quick, artifact_root=root["artifact_root"], run_id="held"))
    info = storage.read_json(storage.join(s["train_dir"], "model_info.json"))
    held_info = storage.read_json(storage.join(held["train_dir"], "model_info.json"))
    pool = split[split["split"] != "test"]
    assert info["refit"] and info["images"]["train"] == len(pool) == (
        held_info["images"]["train"] + held_info["images"]["val"]) > held_info["images"]["train"]
    assert info["patients"]["train"] == pool["patient_id"].nunique()
    cal = calibrate_step(CalibrateConfig(predictions_uri=s["train_dir"], **root))
    doc = storage.read_json(cal["calibration_uri"])
    assert doc["fitted_on"] == "val" and doc["n_images"] == len(pool)
    tune_thresholds_step(TuneThresholdsConfig(predictions_uri=s["train_dir"],
                                              calibration_uri=cal["calibration_uri"], **root))
    preds = storage.read_parquet(s["predictions_uri"])
    assert (preds["split"] == "test").sum() == (split["split"] == "test").sum()
    bad = preds.assign(logit_fracture=np.where(preds["split"] == "test",
                                               -preds["logit_fracture"] * 100, preds["logit_fracture"]))
    storage.write_parquet(s["predictions_uri"], bad)
    again = calibrate_step(CalibrateConfig(predictions_uri=s["train_dir"],
                                           artifact_root=root["artifact_root"], run_id="refit2"))
    assert storage.read_json(again["calibration_uri"])["calibrator"] == doc["calibrator"]
