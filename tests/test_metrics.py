"""Metrics against hand-computed values, and the patient-level bootstrap."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score

from fracture_ops.evaluation import bootstrap as B
from fracture_ops.evaluation import metrics as M
from fracture_ops.model.outputs import decisions

# Six samples. Positives score {0.35, 0.65, 0.9}, negatives {0.1, 0.4, 0.8}.
# AUROC = P(score_pos > score_neg) over the 9 pairs: 0.35 beats 1 (0.1), 0.65 beats 2 (0.1, 0.4),
# 0.9 beats 3 -> 6/9 = 2/3.
# AP: by descending score: 0.9(+) 0.8(-) 0.65(+) 0.4(-) 0.35(+) 0.1(-); precision at each positive
# is 1/1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3 = 34/45.
Y6 = np.array([0, 0, 1, 0, 1, 1])
P6 = np.array([0.1, 0.4, 0.35, 0.8, 0.65, 0.9])

# Ten samples: negatives {0.1, 0.2, 0.3, 0.4, 0.6}, positives {0.35, 0.5, 0.6, 0.8, 0.9}, tie: 0.6
# ROC points (fpr, tpr) by descending threshold: (0,0) (0,.2)@.9 (0,.4)@.8 (.2,.6)@.6 (.2,.8)@.5
# (.4,.8)@.4 (.4,1)@.35 (.6,1)@.3 (.8,1)@.2 (1,1)@.1.
Y10 = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
P10 = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.35, 0.5, 0.6, 0.8, 0.9])


def test_auroc_and_ap_match_hand_computed_values():
    assert M.roc_auc(Y6, P6) == pytest.approx(2 / 3, abs=1e-12)
    assert M.average_precision(Y6, P6) == pytest.approx(34 / 45, abs=1e-12)


def test_auroc_counts_ties_as_one_half():
    # positive 0.5 vs negatives 0.2 (win) and 0.5 (tie: 1/2); positive 0.9 wins both -> 3.5/4.
    assert M.roc_auc(np.array([0, 1, 0, 1]), np.array([0.2, 0.5, 0.5, 0.9])) == pytest.approx(0.875)


def test_auroc_undefined_with_one_class():
    assert np.isnan(M.roc_auc(np.ones(4), np.linspace(0, 1, 4)))
    assert np.isnan(M.average_precision(np.zeros(4), np.linspace(0, 1, 4)))


@pytest.mark.parametrize(
    "spec, mode, expected",
    [
        (0.80, "achievable", 0.8),  # fpr <= 0.2: best point (.2, .8) at threshold 0.5
        (0.80, "interpolated", 0.8),  # a point sits exactly at fpr 0.2
        (0.90, "achievable", 0.4),  # fpr <= 0.1: only fpr 0 points, best (0, .4)
        (0.90, "interpolated", 0.5),  # halfway between (0, .4) and (.2, .6)
        (0.70, "achievable", 0.8),  # fpr <= 0.3: (.2, .8)
    ],
)
def test_sensitivity_at_specificity_hand_computed(spec, mode, expected):
    assert M.sensitivity_at_specificity(Y10, P10, spec, mode) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "sens, mode, expected",
    [
        (0.90, "achievable", 0.6),  # first tpr >= .9 is (.4, 1)
        (0.90, "interpolated", 0.6),  # between (.4, .8) and (.4, 1): fpr .4
        (0.50, "achievable", 0.8),  # first tpr >= .5 is (.2, .6)
        (0.50, "interpolated", 0.9),  # between (0, .4) and (.2, .6): fpr .1
    ],
)
def test_specificity_at_sensitivity_hand_computed(sens, mode, expected):
    assert M.specificity_at_sensitivity(Y10, P10, sens, mode) == pytest.approx(expected, abs=1e-12)


def test_sensitivity_specificity_at_threshold():
    # p >= 0.5 flags 0.6(neg), 0.5, 0.6, 0.8, 0.9 -> TP 4 of 5, TN 4 of 5.
    assert M.sensitivity_specificity(Y10, P10 >= 0.5) == pytest.approx((0.8, 0.8))


def test_ece_hand_computed():
    # 5 bins of width 0.2, two samples each: |mean y - mean p| = .1, .2, 0, .3, .1, each bin
    # holds 2/10 of the samples -> ECE = 0.2 * (.1 + .2 + 0 + .3 + .1) = 0.14.
    p = np.array([0.1, 0.1, 0.3, 0.3, 0.5, 0.5, 0.7, 0.7, 0.9, 0.9])
    y = np.array([0, 0, 0, 1, 1, 0, 1, 1, 1, 1])
    assert M.expected_calibration_error(y, p, n_bins=5) == pytest.approx(0.14, abs=1e-12)
    bins = M.reliability_bins(y, p, n_bins=5)
    assert bins["count"] == [2, 2, 2, 2, 2]
    assert bins["frequency"] == pytest.approx([0.0, 0.5, 0.5, 1.0, 1.0])


def test_ece_bins_are_left_closed_and_last_holds_one():
    assert M.bin_index(np.array([0.0, 0.2, 0.199, 1.0]), 5).tolist() == [0, 1, 0, 4]
    assert M.expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0


def test_kappa_hand_computed_binary_and_multiclass():
    # TP 3, FN 1, FP 1, TN 5: p_o = .8, p_e = (4*4 + 6*6)/100 = .52 -> (.8-.52)/.48 = 7/12.
    t = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    p = np.array([1, 1, 0, 0, 0, 1, 0, 0, 1, 0])
    assert M.cohen_kappa(t, p) == pytest.approx(7 / 12, abs=1e-12)
    # p_o = 4/6; true marginals (2,2,2), predicted (2,3,1): p_e = 12/36 -> (2/3-1/3)/(2/3) = 1/2.
    assert M.cohen_kappa([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]) == pytest.approx(0.5, abs=1e-12)
    w = np.ones((10, 1))
    assert B.weighted_kappa(t, p, w, 2)[0] == pytest.approx(7 / 12, abs=1e-12)


def test_multiclass_decision_is_argmax_and_macro_matches_sklearn():
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 3, 60)
    y = np.eye(3, dtype=int)[lab]
    z = rng.normal(size=(60, 3)) + 1.5 * y
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    pred = decisions(probs, "multiclass", np.full(3, 0.99))  # thresholds do not matter
    assert (pred.argmax(axis=1) == probs.argmax(axis=1)).all() and (pred.sum(axis=1) == 1).all()
    out = M.compute_metrics(y, probs, "multiclass", ["a", "b", "c"], np.full(3, 0.5))
    assert out[(None, "auroc_macro")] == pytest.approx(
        roc_auc_score(lab, probs, multi_class="ovr", average="macro")
    )
    assert out[(None, "kappa")] == pytest.approx(cohen_kappa_score(lab, probs.argmax(axis=1)))
    assert ("a", "kappa") not in out  # multiclass kappa is on the argmax only


def _random_case(task, n, rng, classes=3):
    c = 1 if task == "binary" else classes
    if task == "multiclass":
        y = np.eye(c, dtype=int)[rng.integers(0, c, n)]
        z = rng.normal(size=(n, c)) + 2 * y
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    else:
        y = rng.integers(0, 2, (n, c))
        p = 1 / (1 + np.exp(-(rng.normal(size=(n, c)) + y)))
    return y, np.round(p, 2), [f"c{i}" for i in range(c)]  # rounding creates ties


@pytest.mark.parametrize("task", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("mode", ["achievable", "interpolated"])
def test_vectorised_resample_metrics_equal_sklearn_on_the_resampled_data(task, mode):
    rng = np.random.default_rng(7)
    y, p, names = _random_case(task, 150, rng)
    thr = np.full(len(names), 0.5)
    w = rng.integers(0, 3, (len(y), 2)).astype(np.float32)  # the bootstrap's layout and dtype
    fast = B.resample_metrics(y, p, w, task, names, thr, [0.8, 0.6], [0.9], 10, mode)
    for b in range(2):
        idx = np.repeat(np.arange(len(y)), w[:, b].astype(int))
        slow = M.compute_metrics(y[idx], p[idx], task, names, thr, [0.8, 0.6], [0.9], 10, mode)
        assert slow.keys() == fast.keys()
        for key, value in slow.items():
            assert fast[key][b] == pytest.approx(value, abs=1e-10, nan_ok=True), key
    assert average_precision_score(y[:, 0], p[:, 0]) == pytest.approx(
        B.resample_metrics(y, p, np.ones((len(y), 1)), task, names, thr)[(names[0], "ap")][0]
    )


def test_patient_resample_keeps_all_images_of_each_drawn_patient():
    patients = np.array(["a"] * 10 + ["b"] * 3 + ["c"] + ["d"] * 6)
    w = B.patient_weights(patients, 200, np.random.default_rng(0))  # (images, resamples)
    for pid in np.unique(patients):
        block = w[patients == pid]
        assert (block == block[:1]).all()  # all images of a patient share its draw count
    # each resample draws exactly n_patients patients
    firsts = [np.flatnonzero(patients == pid)[0] for pid in np.unique(patients)]
    assert (w[firsts].sum(axis=0) == 4).all()
    assert (w == 0).any() and (w > 1).any()


def _clustered_case(n_patients=40, images=25, seed=1):
    """Few patients with many images each and a strong patient effect on the score."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), images)
    label = (np.arange(n_patients) % 2)[patient]
    score = 1.0 * label + rng.normal(0, 1.2, n_patients)[patient] + rng.normal(0, 0.3, len(patient))
    return label[:, None], (1 / (1 + np.exp(-score)))[:, None], patient


def test_patient_bootstrap_is_wider_than_image_bootstrap():
    y, p, patient = _clustered_case()
    kw = {
        "task": "binary",
        "class_names": ["f"],
        "thresholds": np.array([0.5]),
        "n_resamples": 400,
        "seed": 0,
    }
    by_patient = B.bootstrap_ci(y, p, patient, **kw)["ci"][(None, "auroc_macro")]
    by_image = B.bootstrap_ci(y, p, np.arange(len(y)), **kw)["ci"][(None, "auroc_macro")]
    width_patient, width_image = np.diff(by_patient)[0], np.diff(by_image)[0]
    # 25 correlated images per patient: the effective sample is the 40 patients, not 1000 images.
    assert width_patient > 2.0 * width_image
    point = M.roc_auc(y[:, 0], p[:, 0])
    assert by_patient[0] < point < by_patient[1]


def test_single_class_resamples_are_skipped_and_counted():
    # one positive patient among ten: P(not drawn in 10 draws) = 0.9**10 ~ 0.35
    patient = np.repeat(np.arange(10), 3)
    y = (patient == 0).astype(int)[:, None]
    p = np.linspace(0.01, 0.99, 30)[:, None]
    out = B.bootstrap_ci(y, p, patient, "binary", ["f"], np.array([0.5]), n_resamples=1000, seed=1)
    assert out["n_valid"] + out["n_skipped"] == 1000
    assert 0.25 < out["n_skipped"] / 1000 < 0.45


def test_bootstrap_is_reproducible_with_a_seed():
    y, p, patient = _clustered_case(seed=2)
    kw = {"task": "binary", "class_names": ["f"], "thresholds": np.array([0.5]), "n_resamples": 100}
    a = B.bootstrap_ci(y, p, patient, **kw, seed=5)["ci"]
    assert a == B.bootstrap_ci(y, p, patient, **kw, seed=5)["ci"]
    assert a != B.bootstrap_ci(y, p, patient, **kw, seed=6)["ci"]


def test_1000_resamples_of_10k_images_take_seconds_not_minutes():
    rng = np.random.default_rng(0)
    n = 10_000
    patient = rng.integers(0, 3_000, n)
    y = rng.integers(0, 2, (n, 1))
    p = 1 / (1 + np.exp(-(rng.normal(size=(n, 1)) + y)))
    start = time.perf_counter()
    out = B.bootstrap_ci(y, p, patient, "binary", ["f"], np.array([0.5]), n_resamples=1000, seed=0)
    elapsed = time.perf_counter() - start
    assert out["n_valid"] == 1000
    # ~0.6 s on 2 busy shared CPU cores (load 6); the bound leaves room for a busier machine.
    assert elapsed < 6.0, f"bootstrap took {elapsed:.2f} s"
