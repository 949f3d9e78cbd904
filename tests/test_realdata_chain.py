"""The classification chain end to end on the real FracAtlas subset (CPU, from scratch):
ingest -> validate -> split -> train -> calibrate -> tune -> evaluate -> Grad-CAM report.
Metrics are modest from scratch on 300 images; the test asserts every artifact exists and the
numbers are well-formed, and prints them."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
