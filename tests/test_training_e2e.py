"""Classification track end to end on synthetic data: train -> calibrate -> tune -> evaluate ->
package, resume after a kill, and the MLflow pyfunc model in a fresh process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fracture_ops import storage

# timm's small ResNet (test_resnet, 0.37 M parameters) at 128 px: the chain's contracts (every
# artifact, one MLflow run with a metric per epoch, the evaluation's figures are those of the
# predictions table, the packaged model reproduces them) hold after any number of epochs, so
# the fixture trains three; how well a model learns is the benchmarks' business
BACKBONE, SIZE, EPOCHS = "test_resnet", 128, 3


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", FRACTURE_OPS_NO_PROGRESS="1")
    return env


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Synthetic data -> split -> train -> calibrate -> tune -> evaluate -> package."""
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.synthetic import SynthConfig, synth_step
    from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
    from fracture_ops.evaluation.evaluate import EvaluateConfig, evaluate_step
    from fracture_ops.evaluation.thresholds import TuneThresholdsConfig, tune_thresholds_step
    from fracture_ops.training.package import PackageConfig, package_step
    from fracture_ops.training.train import TrainConfig, train_step

    tmp = tmp_path_factory.mktemp("e2e")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    root = dict(artifact_root=str(tmp / "art"), run_id="e2e")
    synth_step(SynthConfig(out_dir=str(tmp / "syn"), n_patients=200, image_size=SIZE, seed=0))
    split = split_step(SplitConfig(manifest_uri=str(tmp / "syn" / "manifest.parquet"), **root))
    t0 = time.perf_counter()
    train = train_step(TrainConfig(split_uri=split["split_uri"], backbone=BACKBONE, image_size=SIZE,
                                   epochs=EPOCHS, batch_size=16, lr=3e-3, **root))
    wall = time.perf_counter() - t0
    train_dir = train["train_dir"]
    cal = calibrate_step(CalibrateConfig(predictions_uri=train_dir, **root))
    th = tune_thresholds_step(TuneThresholdsConfig(predictions_uri=train_dir,
                                                   calibration_uri=cal["calibration_uri"], **root))
    ev = evaluate_step(EvaluateConfig(predictions_uri=train_dir, calibration_uri=cal["calibration_uri"],
                                      thresholds_uri=th["thresholds_uri"], n_bootstrap=200, **root))
    pkg = package_step(PackageConfig(**root))
    yield dict(tmp=tmp, train=train, cal=cal, th=th, ev=ev, pkg=pkg, wall=wall, root=root)
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.mark.slow
def test_the_evaluation_reports_the_predictions_tables_test_auroc(pipeline):
    """The evaluation step's test AUROC is that
    of the train step's test rows, computed here from the table: the default calibrator
    (temperature) is strictly monotone, so calibration may not move it."""
    from sklearn.metrics import roc_auc_score

    preds = storage.read_parquet(storage.join(pipeline["train"]["train_dir"], "predictions.parquet"))
    test = preds[preds["split"] == "test"]
    auroc = roc_auc_score(test["y_fracture"], test["logit_fracture"])
    print(f"\n{BACKBONE} @ {SIZE}px, {EPOCHS} epochs: test AUROC {auroc:.4f}, "
          f"train wall {pipeline['wall']:.0f} s")
    doc = storage.read_json(storage.join(pipeline["ev"]["evaluation_uri"]))
    assert doc["split"] == "test" and doc["n_images"] == len(test)
    assert doc["calibration"]["method"] == "temperature"
    reported = doc["metrics"]["overall"]["auroc_macro"]
    assert reported["value"] == pytest.approx(auroc, abs=1e-9)


@pytest.mark.slow
def test_every_artifact_and_mlflow_run(pipeline):
    import mlflow

    train_dir = Path(pipeline["train"]["train_dir"])
    for name in ("best.pt", "last.pt", "model.pt", "predictions.parquet", "model_info.json",
                 "config.resolved.yaml", "_SUCCESS"):
        assert (train_dir / name).exists(), name
    eval_dir = Path(pipeline["root"]["artifact_root"]) / "runs" / "e2e" / "evaluate"
    for name in ("evaluation.json", "roc.png", "pr.png", "confusion.png", "reliability.png"):
        assert (eval_dir / name).exists(), name
    client = mlflow.MlflowClient()
    run = client.get_run(pipeline["train"]["mlflow_run_id"])
    assert run.data.params["backbone"] == BACKBONE and run.data.params["image_size"] == str(SIZE)
    assert len(run.data.tags["manifest_hash"]) == 16 and len(run.data.tags["split_hash"]) == 16
    history = client.get_metric_history(run.info.run_id, "val_auroc")
    assert sorted(m.step for m in history) == list(range(EPOCHS))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "evaluation"} <= artifacts


@pytest.mark.slow
def test_thresholds_and_calibration_fitted_on_val_only(pipeline):
    th = storage.read_json(pipeline["th"]["thresholds_uri"])
    cal = storage.read_json(pipeline["cal"]["calibration_uri"])
    assert th["fitted_on"] == "val" and cal["fitted_on"] == "val"


@pytest.mark.slow
def test_pyfunc_model_reproduces_evaluation_in_fresh_process(pipeline, tmp_path):
    """mlflow.pyfunc.load_model in a new interpreter gives the evaluation's probabilities (1e-5)."""
    from fracture_ops.model.calibrators import Calibrator

    train_dir = pipeline["train"]["train_dir"]
    preds = storage.read_parquet(storage.join(train_dir, "predictions.parquet"))
    test = preds[preds["split"] == "test"].head(12)
    split = storage.read_parquet(storage.read_json(storage.join(train_dir, "model_info.json"))["split_uri"])
    uris = split.set_index("image_id").loc[test["image_id"], "image_uri"].tolist()
    cal = Calibrator.from_dict(storage.read_json(pipeline["cal"]["calibration_uri"])["calibrator"])
    expected = cal.transform(test[["logit_fracture"]].to_numpy()).ravel()
    script = textwrap.dedent(f"""
        import json, sys, mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({pipeline['pkg']['model_uri']!r})
        out = model.predict(pd.DataFrame({{"image": {uris!r}}}))
        print(json.dumps({{"p": out["prob_fracture"].tolist(), "d": out["decision_fracture"].tolist(),
                          "cols": list(out.columns)}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=_env(pipeline["tmp"]), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["cols"] == ["prob_fracture", "decision_fracture", "error"]
    np.testing.assert_allclose(out["p"], expected, atol=1e-5)
    threshold = storage.read_json(pipeline["th"]["thresholds_uri"])["thresholds"]["fracture"]
    assert out["d"] == [int(p >= threshold) for p in out["p"]]


@pytest.mark.slow
def test_the_model_is_stored_as_code_and_loaded_without_running_stored_code(pipeline, tmp_path):
    """Models from code: the registry holds pyfunc_code.py, no pickled object. Our loaders build
    the classifier with the installed package from the weights alone, so a model folder whose
    code file was replaced, or that gained a pickle bomb, runs nothing; MLflow's own loader
    would run the replaced file (the control shows the threat is real)."""
    import shutil

    import mlflow
    import pandas as pd
    import yaml

    from fracture_ops.model.pyfunc import load_classifier_dir

    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=pipeline["pkg"]["model_uri"],
                                                         dst_path=str(tmp_path / "m")))
    files = [p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    code = [f for f in files if f.endswith("pyfunc_code.py")]
    assert code and "python_model" not in flavor, (files, flavor)
    images = [str(u) for u in storage.read_parquet(
        storage.read_json(storage.join(pipeline["train"]["train_dir"], "model_info.json"))["split_uri"]
    )["image_uri"].head(4)]
    expected = load_classifier_dir(str(model_dir)).predict(None, pd.DataFrame({"image": images}))
    # the attacker's model folder: the code file replaced, a pickle bomb beside it
    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    marker = tmp_path / "pwned"
    (evil / code[0]).write_text(f"open({str(marker)!r}, 'w').write('ran')\n" +
                                (model_dir / code[0]).read_text())

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (evil / "python_model.pkl").write_bytes(pickle.dumps(Bomb()))
    got = load_classifier_dir(str(evil)).predict(None, pd.DataFrame({"image": images}))
    assert not marker.exists()
    pd.testing.assert_frame_equal(got, expected)
    mlflow.pyfunc.load_model(str(evil))  # control: MLflow's loader runs the stored file
    assert marker.read_text() == "ran"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_training_resumes_same_mlflow_run(tmp_path, sig):
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.synthetic import SynthConfig, synth_step

    # long enough (3 epochs of 64 px, batch 4) that the kill surely lands before the end
    synth_step(SynthConfig(out_dir=str(tmp_path / "syn"), n_patients=60, image_size=64, seed=2))
    root = ["--artifact-root", str(tmp_path / "art"), "--run-id", "k"]
    split = split_step(SplitConfig(manifest_uri=str(tmp_path / "syn" / "manifest.parquet"),
                                   artifact_root=str(tmp_path / "art"), run_id="k"))
    cmd = [sys.executable, "-m", "fracture_ops.cli", "train", split["split_uri"], "--backbone",
           BACKBONE, "--image-size", "64", "--epochs", "3", "--batch-size", "4", *root]
    env = _env(tmp_path)
    train_dir = tmp_path / "art" / "runs" / "k" / "train"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (train_dir / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.2)
    proc.send_signal(sig)  # epoch 1 is checkpointed; epoch 2 is under way
    proc.wait(timeout=60)
    assert not (train_dir / "_SUCCESS").exists()
    first_run = json.loads((train_dir / "mlflow_run.json").read_text())["run_id"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed"] is True and summary["epochs_run"] == 3
    assert summary["mlflow_run_id"] == first_run
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    steps = {m.step for m in client.get_metric_history(first_run, "val_auroc")}
    assert steps == set(range(3))
    exp = client.get_experiment_by_name("fracture-classifier")
    assert len(client.search_runs([exp.experiment_id])) == 1  # no second run was created


def test_one_unreadable_image_never_fails_the_batch(pipeline, tmp_path, realdata):
    """A truncated JPEG (cut from a real FracAtlas radiograph),
    a missing file and bad bytes: those rows carry an error naming why; every other row gets
    exactly the probabilities and decisions it gets when the batch holds only the good rows."""
    import base64

    import mlflow
    import pandas as pd

    from fracture_ops.model.pyfunc import load_classifier_dir

    # this module's store (a test before may have pointed MLflow's global tracking URI elsewhere)
    mlflow.set_tracking_uri(f"sqlite:///{pipeline['tmp'] / 'mlflow.db'}")
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=pipeline["pkg"]["model_uri"],
                                                    dst_path=str(tmp_path / "m"))
    model = load_classifier_dir(model_dir)
    good = [str(u) for u in storage.read_parquet(
        storage.read_json(storage.join(pipeline["train"]["train_dir"], "model_info.json"))["split_uri"]
    )["image_uri"].head(3)]
    source = sorted((realdata / "fracatlas" / "images").rglob("*.jpg"))[0].read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(source[: len(source) // 3])
    bad_bytes = base64.b64encode(b"not an image at all" * 40).decode()
    rows = [good[0], str(truncated), good[1], str(tmp_path / "missing.png"), bad_bytes, good[2]]
    out = model.predict(None, pd.DataFrame({"image": rows}, index=range(10, 16)))
    alone = model.predict(None, pd.DataFrame({"image": good}))
    assert list(out.index) == list(range(10, 16))
    errors = out["error"].tolist()
    assert [e is None for e in errors] == [True, False, True, False, False, True]
    assert "truncated" in errors[1].lower() or "decode" in errors[1].lower() or "image" in errors[1].lower()
    assert "missing.png" in errors[3] or "No such file" in errors[3] or "not found" in errors[3].lower()
    prob_cols = [c for c in out.columns if c.startswith(("prob_", "decision_"))]
    assert out.loc[[11, 13, 14], prob_cols].isna().all().all()
    got = out.loc[[10, 12, 15], prob_cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, alone[prob_cols].reset_index(drop=True))
    assert alone["error"].isna().all()
