"""The HTML a person reads renders in headless Chromium (Debian's package) with no console errors
and no request leaving loopback: Grad-CAM report, model card, evaluation report, a drift report
and the drift index.
Screenshots are saved beside the test's temporary files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from fracture_ops import storage

pytestmark = [pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A trained run's Grad-CAM report and model card, and drift reports for two dates."""
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.synthetic import SynthConfig, synth_step
    from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
    from fracture_ops.evaluation.evaluate import EvaluateConfig, evaluate_step
    from fracture_ops.evaluation.thresholds import TuneThresholdsConfig, tune_thresholds_step
    from fracture_ops.explain.cam import CamConfig, cam_step
    from fracture_ops.monitoring.drift_step import DriftConfig, drift_step
    from fracture_ops.registry.model_card import write_model_card
    from fracture_ops.training.train import TrainConfig, train_step
    from tests.test_drift import make_rows

    tmp = tmp_path_factory.mktemp("html")
    art = str(tmp / "art")
    root = dict(artifact_root=art, run_id="r")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        synth_step(SynthConfig(out_dir=str(tmp / "syn"), n_patients=40, image_size=64, seed=6))
        split = split_step(SplitConfig(manifest_uri=str(tmp / "syn" / "manifest.parquet"), **root))
        train_step(TrainConfig(split_uri=split["split_uri"], backbone="test_resnet", image_size=64,
                               epochs=2, batch_size=16, **root))
        calibrate_step(CalibrateConfig(**root))
        run = storage.join(art, "runs", "r")
        tune_thresholds_step(TuneThresholdsConfig(calibration_uri=f"{run}/calibrate", **root))
        evaluate_step(EvaluateConfig(calibration_uri=f"{run}/calibrate", thresholds_uri=f"{run}/tune_thresholds",
                                     n_bootstrap=50, **root))
        cam_step(CamConfig(top_k=3, max_errors=3, **root))
    _, _, card = write_model_card(run, str(tmp / "card"), "fracture-classifier", "1", "run0", "abc123")
    ref_dir = Path(art, "reference", "fracture-classifier", "v3")
    ref_dir.mkdir(parents=True)
    make_rows(300, seed=1, labelled=1.0).to_parquet(ref_dir / "reference.parquet")
    storage.mark_success(str(ref_dir))
    for date, shift in (("2026-11-04", 0.0), ("2026-11-05", 0.12)):
        part = Path(art, "prediction_log", f"date={date}")
        part.mkdir(parents=True)
        make_rows(200, seed=7, date=date, exposure=shift, resolution=0.5 if shift else 1.0).to_parquet(
            part / "part-test.parquet")
        drift = drift_step(DriftConfig(artifact_root=art, run_id="drift", date=date, log_mlflow=False))
    return {"cam": f"{run}/cam/report.html", "card": card, "drift": drift["report_uri"],
            "evaluation": f"{run}/evaluate/evaluation.html",
            "index": drift["index_uri"], "out": tmp}


CASES = {
    "cam": ["Top positive predictions", "False negatives", "False positives"],
    "card": ["Intended use", "Test metrics (95% CI, bootstrap resampling patients)", "Known limitations"],
    "drift": ["Drift detected"],
    "evaluation": ["Metrics", "Operating points at the tuned thresholds", "ROC and precision-recall",
                   "Calibration before and after", "Confusion", "Study level", "By body region"],
    "index": ["Drift reports"],
}


@pytest.mark.parametrize("page", sorted(CASES))
def test_page_renders_offline_without_errors(browser, pages, page):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = ctx.new_page()
    errors, outside = [], []
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(str(e)))

    def check(request):
        url = urlparse(request.url)
        if url.scheme not in ("file", "data", "about", "blob") and url.hostname not in ("127.0.0.1", "localhost"):
            outside.append(request.url)

    tab.on("request", check)
    tab.route("**/*", lambda route: route.abort() if urlparse(route.request.url).scheme in ("http", "https")
              and urlparse(route.request.url).hostname not in ("127.0.0.1", "localhost") else route.continue_())
    tab.goto(Path(pages[page]).resolve().as_uri(), wait_until="load")
    tab.wait_for_timeout(1500)  # let scripts (Evidently's plots) run
    shot = pages["out"] / f"{page}.png"
    tab.screenshot(path=str(shot), full_page=page != "drift")
    for heading in CASES[page]:
        assert tab.get_by_role("heading", name=heading).first.is_visible(), heading
    ctx.close()
    assert outside == [], f"{page} requested {outside[:5]}"
    assert errors == [], f"{page} console errors: {errors[:5]}"
    assert shot.stat().st_size > 5000
