"""The evaluation report (``evaluation.html``): its tables hold the numbers a reader checks by
hand, its bands come from patient resamples, and every count in a confusion matrix is legible
against its own cell. (Rendering in Chromium: ``tests/test_html_render.py``.)"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fracture_ops.evaluation.report import curve_bands, operating_table, study_level


def test_operating_table_counts_and_rates_by_hand():
    y = np.array([[1], [1], [1], [0], [0], [0], [0]])
    p = np.array([[0.9], [0.6], [0.2], [0.7], [0.1], [0.3], [0.05]])
    (row,) = operating_table(y, (p >= 0.5).astype(int), ["fracture"], [0.5])
    assert (row["tp"], row["fn"], row["fp"], row["tn"]) == (2, 1, 1, 3)
    assert row["sensitivity"] == pytest.approx(2 / 3) and row["specificity"] == pytest.approx(3 / 4)
    assert row["ppv"] == pytest.approx(2 / 3) and row["npv"] == pytest.approx(3 / 4)
    (none,) = operating_table(np.zeros((3, 1)), np.zeros((3, 1), int), ["fracture"], [0.5])
    assert none["sensitivity"] is None and none["ppv"] is None and none["specificity"] == 1.0


def test_study_level_takes_any_positive_and_the_highest_score():
    y = np.array([[0], [1], [0], [0], [0], [1]])
    p = np.array([[0.1], [0.8], [0.3], [0.2], [0.6], [0.4]])
    studies = np.array(["a", "a", "b", "b", "c", "d"])
    (row,) = study_level(y, p, studies, ["fracture"], [0.5])
    # a: positive, 0.8 -> TP; b: negative, 0.3 -> TN; c: negative, 0.6 -> FP; d: positive, 0.4 -> FN
    assert row["studies"] == 4 and (row["tp"], row["tn"], row["fp"], row["fn"]) == (1, 1, 1, 1)
    assert row["auroc"] == pytest.approx(0.75)  # positives 0.8, 0.4 against negatives 0.3, 0.6


def test_bands_hold_the_curve_and_widen_with_fewer_patients():
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random(n) < 0.4).astype(int)
    p = 1 / (1 + np.exp(-(2.0 * y - 1 + rng.normal(0, 1, n))))
    wide = curve_bands(y[:60], p[:60], np.arange(60), n=100)
    narrow = curve_bands(y, p, np.arange(n), n=100)
    assert narrow["n"] == 100 and np.all(narrow["tpr_low"] <= narrow["tpr_high"])
    width = lambda b: float(np.mean(b["tpr_high"] - b["tpr_low"]))  # noqa: E731
    assert width(wide) > 1.5 * width(narrow)
    # patients, not images, are resampled: a patient's two images move together
    pairs = curve_bands(np.repeat(y[:60], 2), np.repeat(p[:60], 2), np.repeat(np.arange(60), 2), n=100)
    assert width(pairs) == pytest.approx(width(wide), rel=0.1)  # image-level: 22 % narrower


@pytest.mark.parametrize("matrix", [[[50, 1], [3, 48]], [[0, 0], [0, 7]], [[500, 2], [60, 61]],
                                    [[9, 10], [11, 12]]])
def test_every_confusion_count_is_legible_against_its_cell(matrix):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    from fracture_ops.evaluation.plots import contrast, text_colour

    m = np.asarray(matrix)
    norm, cmap = Normalize(m.min(), m.max()), colormaps["Blues"]
    for v in m.ravel():
        cell = cmap(norm(v))
        assert contrast(text_colour(cell), cell) >= 4.5, (v, cell)


def test_the_evaluate_step_writes_the_report_with_its_tables(tmp_path):
    from fracture_ops.evaluation.evaluate import EvaluateConfig, evaluate_step
    from fracture_ops.evaluation.synthetic import synthetic_predictions
    from fracture_ops.model.outputs import write_predictions

    df, task, names = synthetic_predictions("binary", n_patients=120, seed=3)
    df["study_id"] = df["patient_id"].astype(str) + "-s"
    df["body_region"] = np.where(np.arange(len(df)) % 2, "wrist", "ankle")
    write_predictions(str(tmp_path / "preds"), df, task, names)
    out = evaluate_step(EvaluateConfig(artifact_root=str(tmp_path / "art"), run_id="r",
                                       predictions_uri=str(tmp_path / "preds"), n_bootstrap=50))
    page = open(out["report_uri"]).read()
    assert "Research and education use only" in page and "not for clinical use" in page
    assert page.count("<img") == 3  # ROC+PR, calibration, confusion
    test = df[df.split == "test"]
    y, p = test["y_fracture"].to_numpy(), 1 / (1 + np.exp(-test["logit_fracture"].to_numpy()))
    tp, fn = int(((p >= 0.5) & (y == 1)).sum()), int(((p < 0.5) & (y == 1)).sum())
    row = re.search(r'<table class="thresholds">.*?</tr><tr>(.*?)</tr>', page).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[0] == "fracture" and int(cells[2]) == tp and int(cells[5]) == fn
    assert f"{tp / (tp + fn):.3f}" == cells[6]
    assert '<table class="studies">' in page and '<table class="regions">' in page
    assert ">wrist<" in page and ">ankle<" in page
    assert not re.search(r'src="(?!data:)', page)  # nothing is fetched
