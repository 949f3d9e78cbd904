"""Cross-validation (`fracture-ops cv`): patient-grouped folds, the train step's own code,
out-of-fold predictions in the predictions contract, pooled AUROC with patient-bootstrap
intervals, parent and child MLflow runs, and a resumable rerun."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from fracture_ops import storage

pytestmark = pytest.mark.slow
# small and short on purpose: these tests check what cross-validation computes (folds, out-of-fold
# predictions, the AUROCs of exactly those predictions, reuse, refit rows), not how well a network
# learns on a given machine (that is benchmarks/bench_realdata.py's business)
FOLDS, SIZE, EPOCHS, BATCH = 3, 64, 3, 16


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.synthetic import SynthConfig, synth_step
    from fracture_ops.workflows.cv import CVConfig, cv_step

    tmp = tmp_path_factory.mktemp("cv")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    root = dict(artifact_root=str(tmp / "art"), run_id="cv")
    synth_step(SynthConfig(out_dir=str(tmp / "syn"), n_patients=72, image_size=SIZE, seed=3))
    split = split_step(SplitConfig(manifest_uri=str(tmp / "syn" / "manifest.parquet"), **root))
    cfg = CVConfig(split_uri=split["split_uri"], folds=FOLDS, backbone="test_resnet", image_size=SIZE,
                   epochs=EPOCHS, batch_size=BATCH, lr=3e-3, n_bootstrap=200, **root)
    summary = cv_step(cfg)
    yield dict(tmp=tmp, cfg=cfg, summary=summary, split=storage.read_parquet(split["split_uri"]))
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def test_fold_and_pooled_aurocs_are_those_of_the_out_of_fold_predictions(cv_run):
    """Each fold's AUROC is the AUROC of its own held-out rows, the pooled one that of every
    out-of-fold row, inside its bootstrap interval; the recommended epoch is the peak of the
    mean validation curve."""
    from sklearn.metrics import roc_auc_score

    s = cv_run["summary"]
    assert [f["fold"] for f in s["per_fold"]] == list(range(1, FOLDS + 1))
    oof = storage.read_parquet(storage.join(s["oof_uri"], "predictions.parquet"))
    y = oof["y_fracture"].to_numpy(int)
    for f in s["per_fold"]:
        rows = oof["fold"] == f["fold"]
        assert f["images"] == int(rows.sum())
        assert f["auroc"] == pytest.approx(roc_auc_score(y[rows], oof.loc[rows, "logit_fracture"]))
    assert s["pooled"]["auroc"] == pytest.approx(roc_auc_score(y, oof["logit_fracture"]), abs=1e-4)
    low, high = s["pooled"]["ci95"]
    assert low <= s["pooled"]["auroc"] <= high
    curve = s["mean_val_auroc_per_epoch"]
    assert len(curve) == EPOCHS and s["recommended_epochs"] == int(np.argmax(curve)) + 1


def test_folds_hold_whole_patients_and_leave_the_test_set_alone(cv_run):
    split, out = cv_run["split"], cv_run["cfg"].output_dir("cv")
    oof = storage.read_parquet(storage.join(out, "oof", "predictions.parquet"))
    pool = split[split["split"] != "test"]
    # every training-pool image is predicted exactly once, by the fold that did not train on it
    assert sorted(oof["image_id"]) == sorted(pool["image_id"])
    assert not set(oof["image_id"]) & set(split.loc[split["split"] == "test", "image_id"])
    folds_of_patient = oof.groupby("patient_id")["fold"].nunique()
    assert (folds_of_patient == 1).all(), "a patient appears in two folds"
    for k in range(1, FOLDS + 1):
        fold_split = storage.read_parquet(storage.join(out, "splits", f"fold-{k}.parquet"))
        train_p = set(fold_split.loc[fold_split["split"] == "train", "patient_id"])
        val_p = set(fold_split.loc[fold_split["split"] == "val", "patient_id"])
        assert not train_p & val_p and val_p == set(oof.loc[oof["fold"] == k, "patient_id"])
        assert "test" not in set(fold_split["split"])
    # stratified: each fold's positive share is near the pool's
    shares = oof.groupby("fold")["y_fracture"].mean()
    assert (shares - pool["label"].eq("fracture").mean()).abs().max() < 0.12, shares.to_dict()


def test_oof_predictions_are_the_fold_models_predictions_and_keep_every_epoch(cv_run):
    out = cv_run["cfg"].output_dir("cv")
    oof = storage.read_parquet(storage.join(out, "oof", "predictions.parquet"))
    for k in range(1, FOLDS + 1):
        fold_dir = storage.join(out, f"fold-{k}")
        info = storage.read_json(storage.join(fold_dir, "model_info.json"))
        assert info["weights"] == "last" and info["epochs_run"] == EPOCHS  # no early stopping
        preds = storage.read_parquet(storage.join(fold_dir, "predictions.parquet"))
        val = preds[preds["split"] == "val"].set_index("image_id")["logit_fracture"]
        mine = oof[oof["fold"] == k].set_index("image_id")["logit_fracture"]
        pd.testing.assert_series_equal(mine.sort_index(), val.sort_index())


def test_mlflow_has_one_parent_with_a_child_per_fold(cv_run):
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(cv_run["summary"]["mlflow_run_id"])
    assert parent.data.metrics["cv_auroc_pooled"] == pytest.approx(cv_run["summary"]["pooled"]["auroc"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == FOLDS


def test_a_rerun_reuses_the_finished_folds(cv_run, caplog):
    import logging

    from fracture_ops.workflows.cv import cv_step

    with caplog.at_level(logging.INFO, logger="fracture_ops.workflows.cv"):
        again = cv_step(cv_run["cfg"])
    assert caplog.text.count("already trained with this configuration") == FOLDS
    assert again["pooled"] == cv_run["summary"]["pooled"]
    assert again["per_fold"] == cv_run["summary"]["per_fold"]


def test_too_few_patients_for_the_folds_is_a_clear_error():
    from fracture_ops.errors import ManifestError
    from fracture_ops.workflows.cv import assign_folds

    pool = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "label": ["fracture", "normal"] * 2})
    with pytest.raises(ManifestError, match="3 patients cannot fill 5 folds"):
        assign_folds(pool, np.array([1, 0, 1, 0]), 5, 0)


def test_refit_trains_on_every_training_patient_and_calibrates_on_out_of_fold(cv_run, tmp_path):
    """The refit uses train+val (counts asserted against a normal train run on the same split),
    keeps its last weights, writes only test predictions; calibration and thresholds fitted on the
    out-of-fold predictions never see a test row (corrupting the test logits changes nothing)."""
    from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
    from fracture_ops.evaluation.evaluate import EvaluateConfig, evaluate_step
    from fracture_ops.evaluation.thresholds import TuneThresholdsConfig, tune_thresholds_step
    from fracture_ops.training.train import TrainConfig, train_step

    cfg, split, s = cv_run["cfg"], cv_run["split"], cv_run["summary"]
    base = dict(split_uri=cfg.split_uri, backbone="test_resnet", image_size=SIZE,
                batch_size=BATCH, lr=3e-3, artifact_root=cfg.artifact_root)
    refit = train_step(TrainConfig(**base, epochs=s["recommended_epochs"], refit=True, run_id="refit"))
    held = train_step(TrainConfig(**base, epochs=2, run_id="held"))  # the train/val path
    info = storage.read_json(storage.join(refit["train_dir"], "model_info.json"))
    held_info = storage.read_json(storage.join(held["train_dir"], "model_info.json"))
    pool = split[split["split"] != "test"]
    assert info["refit"] and info["weights"] == "last" and info["epochs_run"] == s["recommended_epochs"]
    assert info["images"]["train"] == len(pool) and info["images"]["val"] == 0
    assert info["patients"]["train"] == pool["patient_id"].nunique()
    assert held_info["images"]["train"] < info["images"]["train"] == (
        held_info["images"]["train"] + held_info["images"]["val"])
    preds = storage.read_parquet(refit["predictions_uri"])
    assert set(preds["split"]) == {"test"} and len(preds) == int((split["split"] == "test").sum())

    oof = s["oof_uri"]
    root = dict(artifact_root=cfg.artifact_root, run_id="refit")
    cal = calibrate_step(CalibrateConfig(predictions_uri=oof, **root))
    th = tune_thresholds_step(TuneThresholdsConfig(predictions_uri=oof,
                                                   calibration_uri=cal["calibration_uri"], **root))
    doc = storage.read_json(cal["calibration_uri"])
    assert doc["fitted_on"] == "val" and doc["n_images"] == s["images"]
    ev = evaluate_step(EvaluateConfig(predictions_uri=refit["train_dir"],
                                      calibration_uri=cal["calibration_uri"],
                                      thresholds_uri=th["thresholds_uri"], n_bootstrap=200, **root))
    assert ev["split"] == "test" and ev["n_images"] == len(preds), ev
    # the test rows cannot move the calibration: corrupt them and fit again
    bad = preds.assign(logit_fracture=-preds["logit_fracture"] * 100)
    storage.write_parquet(refit["predictions_uri"], bad)
    again = calibrate_step(CalibrateConfig(predictions_uri=oof, artifact_root=cfg.artifact_root,
                                           run_id="refit2"))
    assert storage.read_json(again["calibration_uri"])["calibrator"] == doc["calibrator"]


def test_fit_takes_cv_and_refit_for_a_small_data_set(cv_run, caplog):
    """The DAG's train task (`fit`) below the size threshold: the cv step (its finished folds
    reused), a refit on every training patient, and a train folder whose val rows are the
    out-of-fold predictions, so calibrate and tune-thresholds fit on them unchanged."""
    import logging

    from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
    from fracture_ops.workflows.fit import FitConfig, fit_step

    cfg, split = cv_run["cfg"], cv_run["split"]
    fit_cfg = FitConfig(**cfg.model_dump(exclude={"weights"}), cv_below_images=10**6)
    with caplog.at_level(logging.INFO, logger="fracture_ops.workflows"):
        s = fit_step(fit_cfg)
    assert s["fit_path"] == "cv+refit" and s["cv_auroc_pooled"] == cv_run["summary"]["pooled"]["auroc"]
    assert caplog.text.count("already trained with this configuration") == FOLDS
    info = storage.read_json(storage.join(s["train_dir"], "model_info.json"))
    pool = split[split["split"] != "test"]
    assert info["fit_path"] == "cv+refit" and info["refit"] and info["images"]["train"] == len(pool)
    preds = storage.read_parquet(s["predictions_uri"])
    oof = storage.read_parquet(storage.join(cv_run["summary"]["oof_uri"], "predictions.parquet"))
    val = preds[preds["split"] == "val"].set_index("image_id")["logit_fracture"].sort_index()
    pd.testing.assert_series_equal(val, oof.set_index("image_id")["logit_fracture"].sort_index())
    assert (preds["split"] == "test").sum() == (split["split"] == "test").sum()
    cal = calibrate_step(CalibrateConfig(predictions_uri=s["train_dir"],
                                         artifact_root=cfg.artifact_root, run_id=cfg.run_id))
    assert storage.read_json(cal["calibration_uri"])["n_images"] == len(pool)
    assert storage.is_complete(s["train_dir"])


def test_fit_keeps_the_train_val_path_for_a_large_data_set(cv_run):
    from fracture_ops.workflows.fit import FitConfig, fit_step

    cfg, split = cv_run["cfg"], cv_run["split"]
    fields = cfg.model_dump(exclude={"weights", "epochs", "run_id"})
    s = fit_step(FitConfig(**fields, epochs=2, run_id="large", cv_below_images=0))
    info = storage.read_json(storage.join(s["train_dir"], "model_info.json"))
    assert s["fit_path"] == info["fit_path"] == "train" and not info["refit"]
    preds = storage.read_parquet(s["predictions_uri"])
    assert (preds["split"] == "val").sum() == (split["split"] == "val").sum()
    assert not storage.exists(FitConfig(**fields, run_id="large").output_dir("cv"))


def test_a_fold_is_reused_only_for_the_same_rows(cv_run):
    """Fold split files have one path whatever the input: reuse is decided by their content."""
    from fracture_ops.workflows.cv import _fold_config, _fold_done

    cfg = cv_run["cfg"]
    out = cfg.output_dir("cv")
    split_uri = storage.join(out, "splits", "fold-1.parquet")
    table = storage.read_parquet(split_uri)
    fold_cfg = _fold_config(cfg, 0, split_uri, "parent")
    assert _fold_done(fold_cfg, table)
    assert not _fold_done(fold_cfg, table.iloc[1:])  # another split's fold
    moved = table.assign(split=np.where(table["split"] == "val", "train", "val"))
    assert not _fold_done(fold_cfg, moved)  # other patients held out
    relabelled = table.assign(label=np.where(table["label"] == "fracture", "normal", "fracture"))
    assert not _fold_done(fold_cfg, relabelled)  # same ids, other labels


def test_fit_falls_back_to_train_val_when_folds_cannot_hold_both_outcomes():
    from fracture_ops.workflows.fit import FitConfig, _why_not_cv

    pool = pd.DataFrame({"patient_id": [f"p{i}" for i in range(20)],
                         "label": ["fracture"] * 3 + ["normal"] * 17})
    cfg = FitConfig(split_uri="x", folds=5)
    assert "too few patients per outcome" in _why_not_cv(pool, cfg)
    assert _why_not_cv(pool, FitConfig(split_uri="x", folds=3)) == ""
    assert "cv_below_images=10" in _why_not_cv(pool, FitConfig(split_uri="x", cv_below_images=10))
