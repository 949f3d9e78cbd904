"""The real-data benchmark's reference arm: image statistics alone, on the benchmark's folds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_realdata.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_realdata", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not module.REALDATA.is_dir():
        pytest.skip(f"{module.REALDATA} is absent (the shared real-data folder)")
    return module


def test_image_statistics_alone_separate_the_fracatlas_subset(bench):
    """Image statistics that show no fracture (size, aspect ratio, colour mode, brightness)
    already separate fractured from not on the subset: the floor the README compares both arms
    with."""
    from sklearn.metrics import roc_auc_score

    from fracture_ops.workflows.cv import CVConfig, assign_folds, outcome_strata

    table, _, bad = bench.fracatlas_manifest(bench.REALDATA)
    assert len(table) == 298 and len(bad) == 2
    y = (table["label"] == "fracture").to_numpy(int)
    fold = assign_folds(table, outcome_strata(table, CVConfig(split_uri="x")), 5, 0)
    feats = np.array([bench.image_stats(u) for u in table["image_uri"]])
    assert feats.shape == (298, 6) and (feats[:, 0] > 100).all() and (feats[:, 2] > 0).all()
    pooled = roc_auc_score(y, bench.reference_scores(feats, y, fold))
    shuffled = np.random.default_rng(0).permutation(y)  # the same model on labels it cannot know
    chance = bench.reference_scores(feats, shuffled, fold)
    assert pooled > 0.62, pooled
    assert abs(roc_auc_score(shuffled, chance) - 0.5) < 0.1
