"""Patient-wise split: no leakage, stratified, deterministic, fixed test sets carried over."""

from __future__ import annotations

import pandas as pd
import pytest

from fracture_ops import storage
from fracture_ops.data.manifest import normalize_manifest
from fracture_ops.data.split import (
    SplitConfig,
    assert_patient_disjoint,
    split_by_patient,
    split_step,
)
from fracture_ops.errors import LeakageError, ManifestError


def _manifest(n_patients=200, images=3, seed=0) -> pd.DataFrame:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "fracture" if rng.random() < 0.3 else "normal"
        for k in range(int(rng.integers(1, images + 1))):
            rows.append({"image_id": f"p{p}_{k}", "image_uri": f"/x/p{p}_{k}.png",
                         "patient_id": f"P{p}", "study_id": f"P{p}", "label": label})
    return normalize_manifest(pd.DataFrame(rows))


@pytest.mark.realdata
def test_grazpedwri_full_csv_split(realdata):
    from fracture_ops.data.sources import from_grazpedwri

    df, _, _ = from_grazpedwri(str(realdata / "grazpedwri_dx/GRAZPEDWRI-DX"), require_images=False)
    assert len(df) == 20327 and df["patient_id"].nunique() == 6091
    result = split_by_patient(normalize_manifest(df), SplitConfig(seed=0))
    t = result.table
    assert (t.groupby("patient_id")["split"].nunique() == 1).all()
    whole = (t["label"] == "fracture").mean()
    for s in ("train", "val", "test"):
        part = t[t["split"] == s]
        assert abs((part["label"] == "fracture").mean() - whole) <= 0.02, s
        assert abs(len(part) / len(t) - {"train": .7, "val": .15, "test": .15}[s]) < 0.03


def test_deterministic_by_seed():
    m = _manifest()
    a = split_by_patient(m, SplitConfig(seed=1)).table
    b = split_by_patient(m.sample(frac=1, random_state=3), SplitConfig(seed=1)).table
    c = split_by_patient(m, SplitConfig(seed=2)).table
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_leakage_detected():
    t = pd.DataFrame({"patient_id": ["A", "A", "B"], "split": ["train", "test", "val"]})
    with pytest.raises(LeakageError, match="1 patient"):
        assert_patient_disjoint(t)


def test_fixed_test_set_carried_over():
    m = _manifest()
    first = split_by_patient(m, SplitConfig(seed=0)).table
    fixed = set(first.loc[first["split"] == "test", "patient_id"])
    grown = pd.concat([m, _manifest(60, seed=9).assign(
        patient_id=lambda d: "N" + d["patient_id"], image_id=lambda d: "n" + d["image_id"])])
    second = split_by_patient(normalize_manifest(grown), SplitConfig(seed=5), fixed).table
    assert fixed <= set(second.loc[second["split"] == "test", "patient_id"])
    assert_patient_disjoint(second)


def test_missing_patient_id_refused():
    m = _manifest(20)
    m.loc[0, "patient_id"] = None
    with pytest.raises(ManifestError, match="patient_id"):
        split_by_patient(m, SplitConfig())


def test_split_step_writes_report(tmp_path):
    uri = storage.write_parquet(str(tmp_path / "m.parquet"), _manifest())
    summary = split_step(SplitConfig(manifest_uri=uri, artifact_root=str(tmp_path), run_id="r"))
    report = storage.read_json(storage.join(str(tmp_path), "runs", "r", "split", "report.json"))
    assert report["train"]["images"] + report["val"]["images"] + report["test"]["images"] \
        == report["all"]["images"] == summary["train_images"] + summary["val_images"] + summary["test_images"]
    assert len(summary["split_hash"]) == 16
