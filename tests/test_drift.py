"""Drift monitoring: Evidently reports of prediction-log windows vs the reference table.

Synthetic prediction-log partitions and reference tables are built per the issue-6 contract
(columns image_id .. source_format, label) with numpy; shifts are injected on purpose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fracture_ops import storage
from fracture_ops.errors import BadInputError, ConfigError
from fracture_ops.monitoring.drift import DriftSettings, analyse_drift, classification_quality
from fracture_ops.monitoring.index import make_self_contained, remote_references
from fracture_ops.monitoring.drift_step import DriftConfig, drift_step, select_model_rows

REMOTE = re.compile(r"""\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def make_rows(n: int, seed: int, *, date: str = "2026-11-05", version: str = "3",
              exposure: float = 0.0, new_region: bool = False, resolution: float = 1.0,
              prob_shift: bool = False, labelled: float = 0.0) -> pd.DataFrame:
    """Prediction-log rows (the contract's columns) from a fixed population, with optional shifts."""
    rng = np.random.default_rng(seed)
    height = (rng.integers(1800, 2600, n) * resolution).astype(int)
    aspect = rng.uniform(0.7, 0.9, n)
    prob = rng.beta(5, 2, n) if prob_shift else rng.beta(2, 3, n)
    regions = ["wrist", "hand", "elbow"] + (["shoulder"] * 3 if new_region else [])
    truth = np.where(rng.random(n) < prob, "fracture", "normal")
    label = np.where(rng.random(n) < labelled, truth, None)
    return pd.DataFrame({
        "image_id": [f"img{seed}_{i}" for i in range(n)], "batch_id": f"b{seed}",
        "scored_date": date, "model_name": "fracture-classifier", "model_version": version,
        "prob_fracture": prob, "decision_fracture": (prob >= 0.5).astype(int),
        "feat_mean": rng.normal(0.45, 0.05, n) + exposure,
        "feat_std": rng.normal(0.2, 0.02, n), "feat_p01": rng.normal(0.02, 0.01, n),
        "feat_p99": rng.normal(0.93, 0.02, n) + exposure,
        "feat_height": height, "feat_width": (height * aspect).astype(int), "feat_aspect": aspect,
        "feat_bit_depth": rng.choice([8, 12], n, p=[0.7, 0.3]),
        "feat_emb_mean": rng.normal(0, 0.1, n), "feat_emb_std": rng.normal(1, 0.1, n),
        "feat_emb_norm": rng.normal(30, 3, n),
        "view": rng.choice(["AP", "LAT", "OBL"], n), "laterality": rng.choice(["L", "R", None], n),
        "body_region": rng.choice(regions, n), "source_format": rng.choice(["png", "dicom"], n),
        "label": label,
    })


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return make_rows(300, seed=1, labelled=1.0)


def drifted(outcome) -> set[str]:
    return {c for c, r in outcome.features.items() if r["drifted"]}


def test_unshifted_window_reports_no_drift(reference):
    out = analyse_drift(reference, make_rows(200, seed=2), DriftSettings())
    assert not out.drift_detected, out.reasons
    assert out.drift_share < 0.3
    assert not out.predictions["prob_fracture"]["drifted"]
    # Evidently's share and its per-column verdicts agree
    assert out.n_drifted == len(drifted(out))
    assert out.drift_share == pytest.approx(out.n_drifted / len(out.features))
    assert len(out.features) == 15  # 11 feat_* + 4 categorical


def test_shifted_window_names_the_shifted_features(reference):
    window = make_rows(200, seed=3, exposure=0.1, new_region=True, resolution=0.5)
    out = analyse_drift(reference, window, DriftSettings())
    got = drifted(out)
    assert {"feat_mean", "feat_p99", "body_region", "feat_height", "feat_width"} <= got
    assert not got & {"feat_bit_depth", "feat_aspect", "feat_std", "view", "source_format"}
    assert out.drift_detected
    assert any("share of drifted feature columns" in r for r in out.reasons)
    assert out.features["feat_mean"]["score_kind"] == "p_value"
    assert out.features["feat_mean"]["score"] < out.features["feat_mean"]["threshold"]


def test_prediction_drift_is_flagged_by_critical_columns(reference):
    window = make_rows(200, seed=4, prob_shift=True)
    out = analyse_drift(reference, window, DriftSettings())
    assert out.predictions["prob_fracture"]["drifted"]
    assert out.predictions["decision_fracture"]["drifted"]
    assert out.decision_rate["fracture"]["window"] > out.decision_rate["fracture"]["reference"] + 0.3
    assert out.drift_share < 0.3  # the images did not change ...
    assert out.drift_detected  # ... but prob_* is critical by default
    assert any("prob_fracture" in r for r in out.reasons)
    quiet = analyse_drift(reference, window, DriftSettings(critical_features=[]))
    assert not quiet.drift_detected


def test_a_critical_feature_flags_drift_alone(reference):
    window = make_rows(200, seed=5, resolution=0.5)
    plain = analyse_drift(reference, window, DriftSettings())
    assert {"feat_height", "feat_width"} <= drifted(plain) and not plain.drift_detected
    strict = analyse_drift(reference, window, DriftSettings(critical_features=["feat_h*"]))
    assert strict.drift_detected and "feat_height" in strict.reasons[0]


def test_stattest_and_threshold_are_configurable(reference):
    window = make_rows(200, seed=3, exposure=0.1)
    out = analyse_drift(reference, window, DriftSettings(
        num_stattest="wasserstein", stattest_threshold=0.2,
        per_column_threshold={"feat_p99": 5.0}))
    assert out.features["feat_mean"]["method"].startswith("Wasserstein")
    assert out.features["feat_mean"]["score_kind"] == "distance"
    assert out.features["feat_mean"]["threshold"] == 0.2 and out.features["feat_mean"]["drifted"]
    assert not out.features["feat_p99"]["drifted"]  # its own, far higher threshold
    with pytest.raises(ConfigError, match="num_stattest"):
        analyse_drift(reference, window, DriftSettings(num_stattest="no-such-test"))


def test_quality_section_only_when_labels_exist(reference):
    unlabelled = analyse_drift(reference, make_rows(200, seed=2), DriftSettings())
    assert unlabelled.performance["status"] == "skipped"
    assert "no labels" in unlabelled.performance["note"]
    assert len(unlabelled.snapshots) == 1

    window = make_rows(200, seed=2, labelled=0.5)
    out = analyse_drift(reference, window, DriftSettings())
    perf = out.performance
    rows = window[window["label"].notna()]
    target = (rows["label"] == "fracture").astype(int)
    assert perf["status"] == "ok" and perf["window"]["n"] == len(rows)
    assert perf["window"]["accuracy"] == pytest.approx((target == rows["decision_fracture"]).mean())
    assert perf["reference"]["n"] == 300 and perf["window"]["auroc"] is not None
    assert "label_drift" in perf and len(out.snapshots) == 2


def test_auroc_left_out_when_one_class_is_labelled():
    q = classification_quality(np.array([0, 0, 0]), np.array([0, 1, 0]), np.array([.1, .7, .2]))
    assert q["auroc"] is None and q["specificity"] == pytest.approx(2 / 3)


def test_select_model_rows_picks_the_common_version():
    window = pd.concat([make_rows(150, 6, version="3"), make_rows(50, 7, version="2")])
    rows, version, notes = select_model_rows(window, "fracture-classifier", None)
    assert version == "3" and len(rows) == 150 and "50 rows of other versions" in notes[0]
    rows, version, _ = select_model_rows(window, "fracture-classifier", "2")
    assert version == "2" and len(rows) == 50


def test_self_contained_rewrites_remote_references():
    page = ('<script src="https://cdn.example/x.js"></script><a href="https://plotly.com/">p</a>'
            "<style>a{background:url(https://x/y.png)}</style><a href=\"#local\">ok</a>"
            'v.href="https://plotly.com/",topojsonURL:{dflt:"https://cdn.plot.ly/"}')
    assert len(remote_references(page)) == 4
    fixed, n = make_self_contained(page)
    assert remote_references(fixed) == [] and not REMOTE.search(fixed) and n == 5
    assert "https://cdn.plot.ly/" not in fixed and 'href="#local"' in fixed


# --- the step: files, index page, MLflow -----------------------------------------------------

def write_log(root: Path, date: str, rows: pd.DataFrame, batch: str = "b1") -> None:
    storage.write_parquet(root / "prediction_log" / f"date={date}" / f"part-{batch}.parquet",
                          rows.assign(scored_date=date))


def write_reference(root: Path, table: pd.DataFrame, version: str = "3") -> None:
    folder = root / "reference" / "fracture-classifier" / f"v{version}"
    storage.write_parquet(folder / "reference.parquet", table)
    storage.mark_success(str(folder))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, reference):
    """An artifact root with three days of log and a reference, and a private MLflow store."""
    root = tmp_path_factory.mktemp("artifacts")
    write_reference(root, reference)
    write_log(root, "2026-11-01", make_rows(200, seed=11))
    write_log(root, "2026-11-02", make_rows(120, seed=12, exposure=0.1, new_region=True,
                                            resolution=0.5))
    write_log(root, "2026-11-02", make_rows(80, seed=13, exposure=0.1, labelled=0.5), batch="b2")
    write_log(root, "2026-11-03", make_rows(10, seed=14))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield root


def run(root: Path, date: str, **kw) -> dict:
    return drift_step(DriftConfig(artifact_root=str(root), date=date, **kw))


def test_step_writes_reports_index_and_one_mlflow_run_per_date(stack):
    import mlflow

    first = run(stack, "2026-11-02")
    run(stack, "2026-11-01")
    again = run(stack, "2026-11-02")  # rerun: same run, same single index entry
    out = stack / "monitoring" / "drift"
    summary = json.loads((out / "2026-11-02" / "summary.json").read_text())
    assert again["drift_detected"] and summary["drift_detected"] and summary["status"] == "ok"
    assert {"feat_height", "body_region"} <= set(again["drifted_features"])
    assert summary["rows"] == {"window": 200, "window_all_models": 200, "partition_files": 2,
                               "window_labelled": summary["rows"]["window_labelled"],
                               "reference": 300}
    assert summary["performance"]["status"] == "ok" and summary["model_version"] == "3"
    assert (out / "2026-11-02" / "_SUCCESS").exists()
    html = (out / "2026-11-02" / "report.html").read_text()
    assert "<h1>Drift detected</h1>" in html and "Model quality on labelled rows" in html
    assert "No drift detected" in (out / "2026-11-01" / "report.html").read_text()

    index = (out / "index.html").read_text()
    assert "<h1>Drift reports</h1>" in index
    links = re.findall(r'href="(\d{4}-\d{2}-\d{2})/report.html"', index)
    assert links == ["2026-11-02", "2026-11-01"]  # newest first, the rerun listed once

    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{stack / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fracture-drift"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["drift-2026-11-01", "drift-2026-11-02"]
    data = mlflow.get_run(first["mlflow_run_id"]).data
    assert data.metrics["drift_detected"] == 1.0 and "drift_score/feat_height" in data.metrics
    assert data.tags["report_date"] == "2026-11-02"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(first["mlflow_run_id"], "drift")}
    assert arts == {"drift/report.html", "drift/summary.json"}


def test_reports_are_self_contained(stack):
    run(stack, "2026-11-01", log_mlflow=False)
    out = stack / "monitoring" / "drift"
    for page in (out / "2026-11-01" / "report.html", out / "index.html"):
        text = page.read_text()
        assert not REMOTE.search(text), REMOTE.search(text)
        assert not re.search(r"url\(\s*['\"]?https?:", text)
        assert "<script src=" not in text


def test_small_window_says_so_without_failing(stack):
    res = run(stack, "2026-11-03", log_mlflow=False)
    assert res["status"] == "insufficient_data" and res["drift_detected"] is False
    html = (stack / "monitoring" / "drift" / "2026-11-03" / "report.html").read_text()
    assert "Not enough data" in html and "min_rows=30" in html


def test_window_days_spans_partitions(stack):
    res = run(stack, "2026-11-02", window_days=2, log_mlflow=False)
    summary = json.loads(Path(res["summary_uri"]).read_text())
    assert summary["window"] == {"start": "2026-11-01", "end": "2026-11-02", "days": 2}
    assert summary["rows"]["window"] == 400


def test_missing_reference_and_bad_config_fail_clearly(stack, tmp_path):
    write_log(tmp_path, "2026-11-05", make_rows(50, seed=20, version="9"))
    with pytest.raises(BadInputError, match="reference"):
        run(tmp_path, "2026-11-05", log_mlflow=False)
    from fracture_ops.config import load_config

    with pytest.raises(ConfigError, match="date"):
        load_config(DriftConfig, overrides={"date": "2026-11-31"})
    # YAML turns date=2026-11-05 into a date object: still accepted, as text
    assert load_config(DriftConfig, overrides=["date=2026-11-05"]).date == "2026-11-05"


def test_cli_runs_the_step_and_defaults_to_the_newest_partition(stack, capsys):
    from fracture_ops import cli

    code = cli.main(["drift", "--artifact-root", str(stack), "--no-mlflow",
                     "--set", "min_rows=5"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["report_date"] == "2026-11-03" and result["status"] == "ok"
