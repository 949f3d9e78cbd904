"""Data-source adapters -> canonical manifest, on real data and on layouts built in tmp_path."""

from __future__ import annotations

import numpy as np
from pathlib import Path

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
from fracture_ops.errors import ConfigError, ManifestError

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
    with pytest.raises(ConfigError, match="missing column.*patient_id.*found image_id, image_uri, label"):
        load_source(str(tmp_path / "bad.csv"), "csv")


def test_folder_tree_labels_and_patient_regex(tmp_path):
    for name in ("fracture/P01_a.png", "fracture/P01_b.png", "normal/P02_a.png"):
        _png(tmp_path / name)
    # PNGs carry no patient id: refused rather than guessed, unless each image is a patient
    with pytest.raises(ConfigError, match="3 of 3 images have no patient id .*--patient-regex"):
        load_source(str(tmp_path), "folder")
    df, _, notes = load_source(str(tmp_path), "folder", one_image_per_patient=True)
    assert sorted(df["label"]) == ["fracture", "fracture", "normal"]
    assert df["patient_id"].nunique() == 3 and notes  # each image its own group, said so
    df, _, _ = load_source(str(tmp_path), "folder", patient_regex=r"^(P\d+)_")
    assert sorted(df["patient_id"].unique()) == ["P01", "P02"]


def test_folder_of_dicoms_takes_patients_from_the_headers_and_split_keeps_them_whole(
        tmp_path, monkeypatch, caplog):
    """3 patients x 2 DICOMs under class folders with meaningless file names: 3 patients in the
    manifest (PatientID, StudyInstanceUID from the header), each whole in one split; a DICOM
    without PatientID and no flag: exit 2 with the reason."""
    from fracture_ops.cli import main as cli_main
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.synthetic_dicom import fake_patient, write_phi_dicom

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    patients = []
    for p in range(3):
        phi = fake_patient(rng)
        patients.append(phi["patient_id"])
        for k in range(2):
            label = ("fracture", "normal")[(p + k) % 2]
            write_phi_dicom(src / label / f"img{p}{k}.dcm",
                            rng.integers(0, 4096, (64, 64), dtype=np.uint16), **phi, seed=k)
    df, _, notes = load_source(str(src), "folder")
    assert sorted(df["patient_id"].unique()) == sorted(patients) and df["study_id"].nunique() == 3
    assert any("from their headers" in n for n in notes)
    manifest = tmp_path / "m.parquet"
    df.to_parquet(manifest)
    split = storage.read_parquet(split_step(SplitConfig(
        manifest_uri=str(manifest), artifact_root=str(tmp_path / "a"), run_id="r",
        val_fraction=0.34, test_fraction=0.34))["split_uri"])
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    # one DICOM without a PatientID: refused at the command line with the reason
    import pydicom

    ds = pydicom.dcmread(src / "normal" / "img01.dcm")
    del ds.PatientID
    ds.save_as(src / "normal" / "img01.dcm")
    monkeypatch.setenv("FRACTURE_OPS_DATA_ROOTS", str(src))
    args = ["ingest", str(src), "--layout", "folder", "--artifact-root", str(tmp_path / "b"),
            "--run-id", "r2"]
    assert cli_main(args) == 2
    assert "1 of 6 images have no patient id" in caplog.text
    assert "img01" not in caplog.text  # counted, not named: export file names can be PHI
    assert cli_main([*args, "--one-image-per-patient"]) == 0


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


def _export(synthetic_small, tmp_path, header: list[str]) -> str:
    """The synthetic manifest as a hospital's exported list: four columns under its own names."""
    src = pd.read_csv(storage.join(synthetic_small.out_dir, "manifest.csv"), dtype=str)
    out = pd.DataFrame({header[0]: src["image_id"],
                        header[1]: [str(Path(synthetic_small.out_dir) / u) for u in src["image_uri"]],
                        header[2]: src["patient_id"], header[3]: src["label"]})
    path = tmp_path / "export.csv"
    out.to_csv(path, index=False)
    return str(path)


def test_four_column_csv_is_ingested_with_study_defaulting_to_patient(tmp_path, synthetic_small):
    uri = _export(synthetic_small, tmp_path, ["image", "path", "patient", "label"])
    cfg = IngestConfig(source_uri=uri, layout="csv", artifact_root=str(tmp_path / "a"), run_id="r",
                       data_roots=[str(tmp_path), synthetic_small.out_dir])
    result = ingest_step(cfg)
    df = pd.read_parquet(result["manifest_uri"])
    assert len(df) == 48 and result["patients"] == 24
    assert (df["study_id"] == df["patient_id"]).all()
    report = storage.read_json(storage.join(cfg.output_dir("ingest"), "report.json"))
    assert "no study_id column: each patient's images form one study" in report["notes"]
    assert "column 'path' used as image_uri" in report["notes"]
    # the images resolve: validation keeps every row
    from fracture_ops.data.validation import ValidateConfig, validate_step

    v = validate_step(ValidateConfig(manifest_uri=result["manifest_uri"], artifact_root=str(tmp_path / "a"),
                                     run_id="r", workers=1))
    assert v["quarantined"] == 0


def test_csv_columns_mapped_by_flag_or_refused_with_the_columns_named(tmp_path, synthetic_small):
    import subprocess
    import sys

    uri = _export(synthetic_small, tmp_path, ["Accession Image", "Location", "MRN", "Finding"])
    # no synonyms match: the error lists what was found and what is expected, exit 2
    cmd = [sys.executable, "-m", "fracture_ops.cli", "ingest", uri, "--artifact-root", str(tmp_path / "a"),
           "--set", f"data_roots=[{tmp_path},{synthetic_small.out_dir}]"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-800:]
    for name in ("Accession Image", "Location", "MRN", "Finding", "image_uri", "patient_id", "--col"):
        assert name in res.stderr
    # mapped by flags, it works
    res = subprocess.run(cmd + ["--col", "image_id=Accession Image", "--col", "image_uri=Location",
                                "--col", "patient_id=MRN", "--col", "label=Finding"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-800:]
    assert '"images": 48' in res.stdout
    # a misspelled column (and a mapping naming a column the CSV lacks) fail naming the columns
    uri = _export(synthetic_small, tmp_path, ["image_id", "image_uri", "patinet_id", "label"])
    res = subprocess.run([*cmd[:4], uri, *cmd[5:]], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "missing column(s) patient_id" in res.stderr
    assert "patinet_id" in res.stderr
    res = subprocess.run([*cmd[:4], uri, *cmd[5:], "--col", "patient_id=patient"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "not in the CSV" in res.stderr and "patinet_id" in res.stderr
