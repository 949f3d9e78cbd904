"""Threshold tuning and calibration: hand-checked thresholds, calibrators, no fitting on test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from fracture_ops.errors import BadInputError
from fracture_ops.evaluation import calibration as calibration_mod
from fracture_ops.evaluation import thresholds as thresholds_mod
from fracture_ops.evaluation.calibration import CalibrateConfig, Calibrator, calibrate_step
from fracture_ops.model.calibrators import nll
from fracture_ops.evaluation.metrics import expected_calibration_error, task_ece
from fracture_ops.model.outputs import (
    logit_columns,
    logits,
    probabilities,
    targets,
    write_predictions,
)
from fracture_ops.evaluation.synthetic import synthetic_predictions
from fracture_ops.evaluation.thresholds import (
    TuneThresholdsConfig,
    tune_class_threshold,
    tune_thresholds,
    tune_thresholds_step,
)

# negatives {0.1, 0.2, 0.3, 0.4, 0.7}, positives {0.35, 0.5, 0.6, 0.8, 0.9}; decision p >= t.
#   t     TP FP  sens spec  J    F1 = 2TP / (2TP + FP + FN)
#   0.9    1  0   .2   1   .2   2/6
#   0.8    2  0   .4   1   .4   4/7
#   0.7    2  1   .4  .8   .2   4/9
#   0.6    3  1   .6  .8   .4   6/9
#   0.5    4  1   .8  .8   .6   8/10
#   0.4    4  2   .8  .6   .4   8/11
#   0.35   5  2   1   .6   .6   10/12  <- best F1; J ties with 0.5, the lower threshold wins
#   0.3    5  3   1   .4   .4   10/13
Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
P = np.array([0.1, 0.2, 0.3, 0.4, 0.7, 0.35, 0.5, 0.6, 0.8, 0.9])


@pytest.mark.parametrize(
    "method, floor, expected",
    [
        ("f1", 0.9, 0.35),
        ("youden", 0.9, 0.35),
        ("min_sensitivity", 0.8, 0.5),
        ("min_sensitivity", 0.5, 0.6),
        ("min_sensitivity", 1.0, 0.35),
    ],
)
def test_threshold_methods_hand_computed(method, floor, expected):
    assert tune_class_threshold(Y, P, method, floor) == pytest.approx(expected)


def test_single_class_falls_back_to_one_half_and_bad_method_is_rejected():
    y = np.column_stack([Y, np.zeros(10, dtype=int)])
    out = tune_thresholds(y, np.column_stack([P, P]), ["a", "b"], "youden")
    assert out == {"a": pytest.approx(0.35), "b": 0.5}
    with pytest.raises(BadInputError):
        tune_class_threshold(Y, P, "accuracy")


def _split(task, overconfidence, seed=0, n_patients=5000):
    df, task, names = synthetic_predictions(
        task, n_patients=n_patients, max_images=1, overconfidence=overconfidence, seed=seed
    )
    return df, names


@pytest.mark.parametrize("task", ["binary", "multilabel", "multiclass"])
def test_temperature_scaling_reduces_ece_and_nll_on_held_out_data(task):
    df, names = _split(task, overconfidence=4.0)
    fit, held = df[df.split == "val"], df[df.split == "test"]
    cal = Calibrator("temperature", task).fit(logits(fit, names), targets(fit, names))
    assert all(t > 2.0 for t in cal.temperature)  # the logits were inflated four-fold
    z, y = logits(held, names), targets(held, names)
    before, after = probabilities(z, task), cal.transform(z)
    assert task_ece(y, after, task) < 0.6 * task_ece(y, before, task)
    temperature = cal.temperature[0] if task == "multiclass" else np.array(cal.temperature)
    assert nll(y, z, task, temperature) < nll(y, z, task)


def test_temperature_recovers_a_known_inflation():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (20_000, 1))
    y = (rng.random((20_000, 1)) < 1 / (1 + np.exp(-z))).astype(int)  # z is calibrated
    cal = Calibrator("temperature", "binary").fit(3.0 * z, y)
    assert cal.temperature[0] == pytest.approx(3.0, rel=0.05)


def test_shared_temperature_fits_one_value_for_all_classes():
    df, names = _split("multilabel", overconfidence=3.0, n_patients=600)
    val = df[df.split == "val"]
    cal = Calibrator("temperature", "multilabel", shared_temperature=True)
    cal.fit(logits(val, names), targets(val, names))
    assert len(set(cal.temperature)) == 1 and len(cal.temperature) == len(names)


@pytest.mark.parametrize("task", ["binary", "multilabel", "multiclass"])
def test_isotonic_round_trip_reproduces_probabilities(task):
    df, names = _split(task, overconfidence=2.0, n_patients=600)
    val = df[df.split == "val"]
    z_val, y_val = logits(val, names), targets(val, names)
    cal = Calibrator("isotonic", task).fit(z_val, y_val)
    z = np.vstack(
        [logits(df, names), np.full((1, len(names)), 40.0), np.full((1, len(names)), -40.0)]
    )
    restored = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(restored.transform(z), cal.transform(z), rtol=0, atol=1e-9)
    if task != "multiclass":  # per class it is exactly scikit-learn's clipped isotonic fit
        p_val, p = probabilities(z_val, task), probabilities(z, task)
        for k in range(len(names)):
            iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(
                p_val[:, k], y_val[:, k]
            )
            np.testing.assert_allclose(restored.transform(z)[:, k], iso.predict(p[:, k]), atol=1e-9)
    else:
        np.testing.assert_allclose(restored.transform(z).sum(axis=1), 1.0, atol=1e-12)


def test_isotonic_reduces_ece_on_held_out_data():
    df, names = _split("binary", overconfidence=4.0)
    fit, held = df[df.split == "val"], df[df.split == "test"]
    cal = Calibrator("isotonic", "binary").fit(logits(fit, names), targets(fit, names))
    y, z = targets(held, names)[:, 0], logits(held, names)
    assert expected_calibration_error(y, cal.transform(z)[:, 0]) < expected_calibration_error(
        y, probabilities(z, "binary")[:, 0]
    )


def test_calibrator_none_and_invalid_inputs():
    z = np.array([[0.0], [2.0]])
    np.testing.assert_allclose(
        Calibrator("none", "binary").transform(z), probabilities(z, "binary")
    )
    with pytest.raises(BadInputError):
        Calibrator("platt", "binary")
    with pytest.raises(BadInputError):
        Calibrator.from_dict({"method": "temperature", "task": "binary"})
    with pytest.raises(BadInputError):
        Calibrator("temperature", "binary").transform(z)  # not fitted


# ---- the test split is never used for fitting -----------------------------------------------


def _write(folder, df, names, task="binary"):
    write_predictions(str(folder), df, task, names)
    return str(folder)


def _perturb_test_rows(df, names, seed=9):
    rng = np.random.default_rng(seed)
    out = df.copy()
    test = out.split == "test"
    for c in names:
        out.loc[test, f"y_{c}"] = 1 - out.loc[test, f"y_{c}"]
        out.loc[test, f"logit_{c}"] = rng.normal(0, 5, test.sum())
    return out


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_fitted_documents_ignore_test_rows(tmp_path, method):
    df, _task, names = synthetic_predictions("binary", n_patients=120, seed=3)
    perturbed = _perturb_test_rows(df, names)
    docs = []
    for i, table in enumerate([df, perturbed]):
        preds = _write(tmp_path / f"preds{i}", table, names)
        common = {
            "artifact_root": str(tmp_path / f"art{i}"),
            "run_id": "r",
            "predictions_uri": preds,
        }
        cal = calibrate_step(CalibrateConfig(**common, method=method))
        thr = tune_thresholds_step(
            TuneThresholdsConfig(**common, calibration_uri=cal["calibration_uri"])
        )
        docs.append(
            [Path(cal["calibration_uri"]).read_bytes(), Path(thr["thresholds_uri"]).read_bytes()]
        )
    assert docs[0] == docs[1]
    # ... while the validation rows do matter: the check above is not vacuous
    changed = df.copy()
    val = changed.split == "val"
    changed.loc[val, "logit_fracture"] *= 3
    preds = _write(tmp_path / "preds2", changed, names)
    cal = calibrate_step(
        CalibrateConfig(artifact_root=str(tmp_path / "art2"), predictions_uri=preds, method=method)
    )
    assert Path(cal["calibration_uri"]).read_bytes() != docs[0][0]


def test_fitting_functions_only_ever_see_validation_rows(tmp_path, monkeypatch):
    df, task, names = synthetic_predictions("multilabel", n_patients=150, seed=4)
    preds = _write(tmp_path / "preds", df, names, task)
    val = df[df.split == "val"]
    seen = {}
    real_fit, real_tune = Calibrator.fit, thresholds_mod.tune_thresholds

    def spy_fit(self, z, y):
        seen["fit"] = (np.asarray(z), np.asarray(y))
        return real_fit(self, z, y)

    def spy_tune(y, probs, class_names, method, min_sensitivity):
        seen["tune"] = (np.asarray(y), np.asarray(probs))
        return real_tune(y, probs, class_names, method, min_sensitivity)

    monkeypatch.setattr(Calibrator, "fit", spy_fit)
    monkeypatch.setattr(thresholds_mod, "tune_thresholds", spy_tune)
    common = {"artifact_root": str(tmp_path / "art"), "predictions_uri": preds}
    cal = calibrate_step(CalibrateConfig(**common, method="temperature"))
    tune_thresholds_step(TuneThresholdsConfig(**common, calibration_uri=cal["calibration_uri"]))
    np.testing.assert_array_equal(seen["fit"][0], val[logit_columns(names)].to_numpy())
    np.testing.assert_array_equal(seen["fit"][1], targets(val, names))
    np.testing.assert_array_equal(seen["tune"][0], targets(val, names))
    assert len(seen["tune"][1]) == len(val) < len(df)
    assert calibration_mod.FIT_SPLIT == thresholds_mod.FIT_SPLIT == "val"


def _strict_json(path) -> dict:
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(Path(path).read_text(), parse_constant=reject)


def test_untunable_class_falls_back_and_documents_stay_strict_json(tmp_path):
    df, task, names = synthetic_predictions("multilabel", n_patients=150, seed=5)
    df.loc[df.split == "val", "y_hand"] = 0  # no positive 'hand' in validation
    preds = _write(tmp_path / "p", df, names, task)
    out = tune_thresholds_step(
        TuneThresholdsConfig(artifact_root=str(tmp_path / "a"), predictions_uri=preds)
    )
    doc = _strict_json(out["thresholds_uri"])
    assert doc["fallback_classes"] == ["hand"] and doc["thresholds"]["hand"] == 0.5
    assert doc["val"]["hand"]["sensitivity"] is None
    assert doc["thresholds"]["elbow"] != 0.5


def _calibrated_rows(tmp_path, name, scale, n_patients, seed):
    """Binary predictions whose validation logits are the true log-odds times ``scale``."""
    rng = np.random.default_rng(seed)
    n = 2 * n_patients
    true = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true))).astype(int)
    import pandas as pd

    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)],
                       "patient_id": [f"p{k // 2}" for k in range(n)],
                       "split": ["val"] * n, "y_fracture": y, "logit_fracture": true * scale})
    return _write(tmp_path / name, df, ["fracture"])


def test_a_calibration_that_does_not_lower_cross_validated_nll_is_not_applied(tmp_path):
    """Logits that are already calibrated: an isotonic map fitted on 30 validation rows is a
    staircase that does worse on rows it did not see, so the identity is kept, and said. Logits
    four times too confident: temperature scaling lowers the cross-validated NLL and is kept.
    ``--no-require-cv-gain`` applies a calibrator regardless."""
    from fracture_ops.model.documents import read_calibrator

    calibrated = _calibrated_rows(tmp_path, "cal", 1.0, 15, seed=1)
    out = calibrate_step(CalibrateConfig(artifact_root=str(tmp_path / "a1"),
                                         predictions_uri=calibrated, method="isotonic"))
    doc = json.loads(Path(out["calibration_uri"]).read_text())
    assert out["applied"] is False and out["method"] == "none"
    assert doc["calibrator"]["method"] == "none" and doc["requested_method"] == "isotonic"
    assert doc["cv_check"]["nll_after"] >= doc["cv_check"]["nll_before"] and "did not" in doc["why"]
    assert read_calibrator(out["calibration_uri"], "binary").method == "none"

    inflated = _calibrated_rows(tmp_path, "inf", 4.0, 200, seed=2)
    out = calibrate_step(CalibrateConfig(artifact_root=str(tmp_path / "a2"),
                                         predictions_uri=inflated, method="temperature"))
    doc = json.loads(Path(out["calibration_uri"]).read_text())
    assert out["applied"] is True and doc["calibrator"]["method"] == "temperature"
    assert doc["cv_check"]["nll_after"] < doc["cv_check"]["nll_before"]
    assert doc["calibrator"]["temperature"][0] == pytest.approx(4.0, rel=0.3)

    forced = calibrate_step(CalibrateConfig(artifact_root=str(tmp_path / "a3"), method="isotonic",
                                            predictions_uri=calibrated, require_cv_gain=False))
    assert forced["applied"] is True and forced["method"] == "isotonic"
