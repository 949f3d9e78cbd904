"""The predictions contract and the calibrate -> tune_thresholds -> evaluate steps end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fracture_ops import storage
from fracture_ops.errors import BadInputError, ErrorBudgetExceeded
from fracture_ops.evaluation import calibration, evaluate, thresholds
from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
from fracture_ops.evaluation.evaluate import EvaluateConfig, evaluate_step
from fracture_ops.model.outputs import (
    load_predictions,
    probabilities,
    quarantine_bad_rows,
    targets,
    write_predictions,
)
from fracture_ops.evaluation.synthetic import synthetic_predictions
from fracture_ops.evaluation.thresholds import TuneThresholdsConfig, tune_thresholds_step

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("roc.png", "pr.png", "confusion.png", "reliability.png")


def _predictions(tmp_path: Path, task="binary", n_patients=160, seed=0, **kw) -> str:
    df, task, names = synthetic_predictions(task, n_patients=n_patients, seed=seed, **kw)
    folder = tmp_path / f"preds_{task}_{seed}"
    write_predictions(str(folder), df, task, names)
    return str(folder)


def test_load_predictions_accepts_folder_or_file_and_checks_columns(tmp_path):
    folder = _predictions(tmp_path, "multilabel")
    df, task, names = load_predictions(folder)
    assert task == "multilabel" and names == ["elbow", "hand", "shoulder"]
    assert targets(df, names).shape == (len(df), 3)
    assert load_predictions(str(Path(folder) / "predictions.parquet"))[0].equals(df)
    storage.write_parquet(str(Path(folder) / "predictions.parquet"), df.drop(columns="logit_hand"))
    with pytest.raises(BadInputError, match="logit_hand"):
        load_predictions(folder)
    with pytest.raises(BadInputError):
        load_predictions(str(tmp_path / "nowhere"))
    storage.write_json(
        str(Path(folder) / "model_info.json"), {"task": "binary", "class_names": ["a", "b"]}
    )
    with pytest.raises(BadInputError, match="positive class"):
        load_predictions(folder)


def test_probabilities_sigmoid_and_softmax():
    z = np.array([[0.0, np.log(3.0)]])
    np.testing.assert_allclose(probabilities(z, "multilabel"), [[0.5, 0.75]])
    np.testing.assert_allclose(probabilities(z, "multiclass"), [[0.25, 0.75]])


def test_bad_rows_are_quarantined_with_reasons_within_the_budget():
    df, task, names = synthetic_predictions("multiclass", n_patients=300, seed=1)
    df.loc[0, "logit_hand"] = np.nan
    df.loc[1, "y_hand"] = 2
    df.loc[2, ["y_elbow", "y_hand", "y_shoulder"]] = [1, 1, 0]
    df.loc[3, "split"] = "holdout"
    clean, bad = quarantine_bad_rows(df, task, names, error_budget=0.05)
    assert len(clean) == len(df) - 4
    assert [b["reason"] for b in bad] == [
        "logit not finite",
        "label not 0/1",
        "labels not one-hot",
        "unknown split",
    ]
    assert bad[0]["image_id"] == df.loc[0, "image_id"]
    with pytest.raises(ErrorBudgetExceeded):
        quarantine_bad_rows(df, task, names, error_budget=0.001)


def _reject_nan(token):
    raise AssertionError(f"evaluation.json holds {token}: not valid JSON")


def _run_all(tmp_path, preds, run_id="r1", **eval_kw):
    common = {
        "artifact_root": str(tmp_path / "artifacts"),
        "run_id": run_id,
        "predictions_uri": preds,
    }
    cal = calibrate_step(CalibrateConfig(**common, method="temperature"))
    thr = tune_thresholds_step(
        TuneThresholdsConfig(
            **common, calibration_uri=str(Path(cal["calibration_uri"]).parent), method="f1"
        )
    )
    ev = evaluate_step(
        EvaluateConfig(
            **common,
            calibration_uri=cal["calibration_uri"],
            thresholds_uri=thr["thresholds_uri"],
            n_bootstrap=200,
            **eval_kw,
        )
    )
    return cal, thr, ev


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_steps_end_to_end_write_every_artifact_and_rerun_identically(tmp_path, task):
    preds = _predictions(tmp_path, task)
    _cal, _thr, ev = _run_all(tmp_path, preds)
    run = tmp_path / "artifacts" / "runs" / "r1"
    expected = {
        "calibrate": {"calibration.json"},
        "tune_thresholds": {"thresholds.json"},
        "evaluate": {"evaluation.json", "evaluation.html", *PLOTS},
    }
    snapshot = {}
    for step, files in expected.items():
        names = {p.name for p in (run / step).iterdir()}
        assert names == files | {"_SUCCESS", "config.resolved.yaml", "quarantine.json"}
        snapshot.update({(step, p.name): p.read_bytes() for p in (run / step).iterdir()})
    for name in PLOTS:
        data = (run / "evaluate" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    assert json.loads((run / "evaluate" / "_SUCCESS").read_text()) == json.loads(json.dumps(ev))

    report = json.loads(
        (run / "evaluate" / "evaluation.json").read_text(), parse_constant=_reject_nan
    )
    assert report["split"] == "test" and report["bootstrap"]["unit"] == "patient"
    assert report["bootstrap"]["n_valid"] + report["bootstrap"]["n_skipped"] == 200
    auroc = report["metrics"]["overall"]["auroc_macro"]
    assert 0.8 < auroc["value"] <= 1.0 and auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    first = report["metrics"]["per_class"][report["class_names"][0]]
    assert {
        "auroc",
        "ap",
        "sensitivity",
        "specificity",
        "sens_at_spec_0.80",
        "spec_at_sens_0.90",
        "ece",
    } <= set(first)
    assert (
        report["thresholds"]
        == json.loads((run / "tune_thresholds" / "thresholds.json").read_text())["thresholds"]
    )
    assert ev["headline"]["auroc"] == auroc["value"]

    (run / "evaluate" / "stale.txt").write_text("left over from an older run")
    _run_all(tmp_path, preds)
    for (step, name), data in snapshot.items():
        assert (run / step / name).read_bytes() == data, (step, name)
    assert not (run / "evaluate" / "stale.txt").exists()


def test_evaluate_defaults_to_no_calibration_and_half_thresholds(tmp_path):
    preds = _predictions(tmp_path, "binary")
    ev = evaluate_step(
        EvaluateConfig(
            artifact_root=str(tmp_path / "a"), predictions_uri=preds, n_bootstrap=0, split="val"
        )
    )
    report = storage.read_json(ev["evaluation_uri"])
    assert report["thresholds"] == {"fracture": 0.5} and report["calibration"]["method"] == "none"
    assert report["split"] == "val" and report["bootstrap"]["n_resamples"] == 0
    assert "ci_low" not in report["metrics"]["overall"]["auroc_macro"]
    assert (
        report["calibration"]["ece_uncalibrated"]
        == report["calibration"]["ece_calibrated"]
        == report["metrics"]["overall"]["ece"]["value"]
    )


def test_calibration_lowers_test_ece_of_an_overconfident_model(tmp_path):
    preds = _predictions(tmp_path, "binary", n_patients=1500, overconfidence=4.0, max_images=2)
    cal, _, ev = _run_all(tmp_path, preds)
    assert cal["ece_after"] < cal["ece_before"]
    held_out = storage.read_json(ev["evaluation_uri"])["calibration"]
    assert held_out["ece_calibrated"] < held_out["ece_uncalibrated"]


def test_per_body_region_metrics_when_the_column_is_present(tmp_path):
    df, task, names = synthetic_predictions("binary", n_patients=300, seed=2)
    test_rows = df.index[df.split == "test"]
    df.loc[test_rows[:3], "body_region"] = "skull"  # too few images to evaluate
    write_predictions(str(tmp_path / "p"), df, task, names)
    ev = evaluate_step(
        EvaluateConfig(
            artifact_root=str(tmp_path / "a"),
            predictions_uri=str(tmp_path / "p"),
            n_bootstrap=100,
            min_region_images=10,
        )
    )
    regions = storage.read_json(ev["evaluation_uri"])["by_body_region"]
    assert set(regions) == {"hand", "leg", "wrist", "skull"}
    assert regions["skull"] == {"n_images": 3, "skipped": "fewer than min_region_images"}
    hand = regions["hand"]
    assert hand["n_images"] == int(((df.split == "test") & (df.body_region == "hand")).sum())
    assert hand["metrics"]["overall"]["auroc_macro"]["ci_low"] is not None
    no_region = tmp_path / "q"
    write_predictions(str(no_region), df.drop(columns="body_region"), task, names)
    ev = evaluate_step(
        EvaluateConfig(
            artifact_root=str(tmp_path / "b"), predictions_uri=str(no_region), n_bootstrap=0
        )
    )
    assert "by_body_region" not in storage.read_json(ev["evaluation_uri"])


def test_steps_reject_bad_inputs(tmp_path):
    preds = _predictions(tmp_path, "binary")
    root = str(tmp_path / "a")
    # no predictions_uri: defaults to this run's train folder, which does not exist here
    with pytest.raises(BadInputError, match="train"):
        evaluate_step(EvaluateConfig(artifact_root=root))
    other = _predictions(tmp_path, "multiclass")
    cal = calibrate_step(CalibrateConfig(artifact_root=root, run_id="mc", predictions_uri=other))
    with pytest.raises(BadInputError, match="task"):
        evaluate_step(
            EvaluateConfig(
                artifact_root=root, predictions_uri=preds, calibration_uri=cal["calibration_uri"]
            )
        )
    with pytest.raises(BadInputError, match="thresholds"):
        evaluate_step(
            EvaluateConfig(
                artifact_root=root,
                predictions_uri=preds,
                thresholds_uri=str(tmp_path / "missing.json"),
            )
        )
    df = pd.read_parquet(Path(preds) / "predictions.parquet")
    write_predictions(str(tmp_path / "noval"), df[df.split != "val"], "binary", ["fracture"])
    with pytest.raises(BadInputError, match="val"):
        tune_thresholds_step(
            TuneThresholdsConfig(artifact_root=root, predictions_uri=str(tmp_path / "noval"))
        )
    assert not (tmp_path / "a" / "runs" / "manual" / "tune_thresholds" / "_SUCCESS").exists()


@pytest.mark.parametrize(
    "module, step, argv",
    [
        (calibration, "calibrate", ["--method", "isotonic"]),
        (
            thresholds,
            "tune_thresholds",
            ["--method", "min_sensitivity", "--min-sensitivity", "0.85"],
        ),
        (
            evaluate,
            "evaluate",
            ["--n-bootstrap", "50", "--seed", "3", "--set", "spec_targets=[0.8,0.95]"],
        ),
    ],
)
def test_cli_modules_parse_flags_and_run_the_step(tmp_path, module, step, argv):
    preds = _predictions(tmp_path, "binary")
    parser = argparse.ArgumentParser()
    module.configure_parser(parser)
    args = parser.parse_args(
        ["--predictions", preds, "--artifact-root", str(tmp_path / "a"), "--run-id", "cli", *argv]
    )
    summary = module.run_cli(args)
    folder = tmp_path / "a" / "runs" / "cli" / step
    assert (folder / "_SUCCESS").exists()
    assert json.loads(json.dumps(summary))  # the summary is small plain JSON
    resolved = (folder / "config.resolved.yaml").read_text()
    assert "predictions_uri" in resolved
    if step == "evaluate":
        per_class = storage.read_json(summary["evaluation_uri"])["metrics"]["per_class"]["fracture"]
        assert {"sens_at_spec_0.80", "sens_at_spec_0.95"} <= set(per_class)
    if step == "tune_thresholds":
        assert storage.read_json(summary["thresholds_uri"])["min_sensitivity"] == 0.85


def test_fracture_ops_cli_runs_the_three_steps_and_maps_bad_input_to_exit_3(tmp_path, capsys):
    from fracture_ops import cli

    preds = _predictions(tmp_path, "binary")
    common = ["--predictions", preds, "--artifact-root", str(tmp_path / "a"), "--run-id", "c"]
    assert cli.main(["calibrate", *common]) == 0
    cal = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["calibration_uri"]
    assert cli.main(["tune-thresholds", *common, "--calibration", cal]) == 0
    capsys.readouterr()
    thr = str(tmp_path / "a" / "runs" / "c" / "tune_thresholds")
    argv = ["evaluate", *common, "--calibration", cal, "--thresholds", thr, "--n-bootstrap", "20"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["split"] == "test"
    missing = ["--predictions", str(tmp_path / "none"), "--artifact-root", str(tmp_path / "a")]
    assert cli.main(["evaluate", *missing]) == 3
