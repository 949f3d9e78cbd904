"""Data-source adapters -> canonical manifest, on real data and on layouts built in tmp_path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fracture_ops import storage
from fracture_ops.data.manifest import MANIFEST_COLUMNS
from fracture_ops.data.sources import (
    IngestConfig,
    from_grazpedwri,
    ingest_step,
    load_source,
    read_yolo_boxes,
)
from fracture_ops.errors import ManifestError

GRAZ = "grazpedwri_dx/GRAZPEDWRI-DX"


def _png(path, size=(40, 30), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


@pytest.mark.realdata
def test_fracatlas_real_subset(realdata):
    df, boxes, notes = load_source(str(realdata / "fracatlas"), "fracatlas")
    assert len(df) == 300 and list(df.columns[:len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert (df["label"].value_counts() == 150).all()
    assert (df["patient_id"] == df["image_id"]).all()  # no patient ids in FracAtlas
    assert any("no patient ids" in n for n in notes)
    assert set(df["body_region"]) <= {"hand", "leg", "hip", "shoulder", "mixed", "unknown"}
    assert set(boxes["image_id"]) <= set(df.loc[df["label"] == "fracture", "image_id"])
    assert len(boxes) >= 150
    inside = (boxes["x_min"] >= -1) & (boxes["y_min"] >= -1) & \
        (boxes["x_max"] <= boxes["img_w"] + 1) & (boxes["y_max"] <= boxes["img_h"] + 1)
    assert inside.all()


@pytest.mark.realdata
def test_grazpedwri_real(realdata):
    df, boxes, notes = load_source(str(realdata / GRAZ), "grazpedwri")
    assert len(df) == 3 and df["patient_id"].str.startswith("GRAZ").all()
    assert set(boxes["class_name"]) <= {"fracture", "text", "periostealreaction", "metal",
                                        "boneanomaly", "bonelesion", "foreignbody",
                                        "pronatorsign", "softtissue"}
    assert len(boxes) > 0 and {"lbl_fracture", "lbl_text"} <= set(df.columns)
    full, _, _ = from_grazpedwri(str(realdata / GRAZ), require_images=False)
    assert len(full) == 20327 and full["patient_id"].nunique() == 6091
    assert (full["label"] == "fracture").sum() == 13550
    assert set(full["view"]) == {"AP", "LAT", "OBL"}


def test_grazpedwri_patient_from_file_name(tmp_path):
    root = tmp_path / "graz"
    _png(root / "data/images/train/0042_123_01_WRI-L1_M010.png")
    (root / "dataset.csv").write_text(
        "\ufefffilestem,patient_id,study_number,laterality,projection,fracture_visible\n"
        "0042_123_01_WRI-L1_M010,,1,L,1,1\n", encoding="utf-8")
    df, _, _ = load_source(str(root), "grazpedwri")
    assert df.loc[0, "patient_id"] == "GRAZ00042" and df.loc[0, "label"] == "fracture"


def test_generic_csv_relative_paths_and_missing_column(tmp_path):
    _png(tmp_path / "img/a.png")
    (tmp_path / "m.csv").write_text("image_id,image_uri,patient_id,study_id,label\n"
                                    "a,img/a.png,P1,S1,fracture\n")
    df, _, _ = load_source(str(tmp_path / "m.csv"), "csv")
    assert df.loc[0, "image_uri"] == str(tmp_path / "img/a.png") and df.loc[0, "view"] == "UNKNOWN"
    (tmp_path / "bad.csv").write_text("image_id,image_uri,label\na,img/a.png,fracture\n")
    with pytest.raises(ManifestError, match="patient_id"):
        load_source(str(tmp_path / "bad.csv"), "csv")


def test_folder_tree_labels_and_patient_regex(tmp_path):
    for name in ("fracture/P01_a.png", "fracture/P01_b.png", "normal/P02_a.png"):
        _png(tmp_path / name)
    df, _, notes = load_source(str(tmp_path), "folder")
    assert sorted(df["label"]) == ["fracture", "fracture", "normal"]
    assert df["patient_id"].nunique() == 3 and notes  # each image its own group, said so
    df, _, _ = load_source(str(tmp_path), "folder", patient_regex=r"^(P\d+)_")
    assert sorted(df["patient_id"].unique()) == ["P01", "P02"]


def test_mura_layout(tmp_path):
    base = tmp_path / "MURA-v1.1/train"
    _png(base / "XR_WRIST/patient00001/study1_positive/image1.png")
    _png(base / "XR_WRIST/patient00001/study2_negative/image1.png")
    _png(base / "XR_HAND/patient00002/study1_negative/image2.png")
    df, _, notes = load_source(str(tmp_path), "mura")
    assert len(df) == 3 and df["patient_id"].nunique() == 2
    assert sorted(df["label"]) == ["abnormal", "normal", "normal"]
    assert set(df["body_region"]) == {"wrist", "hand"} and df["study_id"].nunique() == 3
    _png(tmp_path / "stray.png")
    with pytest.raises(ManifestError, match="stray.png"):
        load_source(str(tmp_path), "mura")


def test_yolo_boxes_to_pixels_and_malformed_line(tmp_path):
    img = _png(tmp_path / "x.png", size=(200, 100))
    lbl = tmp_path / "x.txt"
    lbl.write_text("0 0.5 0.5 0.2 0.4\n")
    (box,) = read_yolo_boxes(str(lbl), str(img), ["fracture"], "x")
    assert (box["x_min"], box["y_min"], box["x_max"], box["y_max"]) == pytest.approx((80, 30, 120, 70))
    lbl.write_text("0 0.5 0.5 0.2 0.4\n0 nope\n")
    with pytest.raises(ManifestError, match="x.txt:2"):
        read_yolo_boxes(str(lbl), str(img), ["fracture"], "x")


def test_ingest_step_outputs_and_idempotent(tmp_path, synthetic_small):
    cfg = IngestConfig(source_uri=storage.join(synthetic_small.out_dir, "manifest.csv"), layout="csv",
                       artifact_root=str(tmp_path), run_id="r1")
    first = ingest_step(cfg)
    out = cfg.output_dir("ingest")
    before = {u: storage.read_bytes(u) for u in storage.list_files(out)}
    assert ingest_step(cfg) == first
    assert {u: storage.read_bytes(u) for u in storage.list_files(out)} == before
    assert storage.is_complete(out) and first["images"] == 48
    assert isinstance(pd.read_parquet(first["manifest_uri"]), pd.DataFrame)
