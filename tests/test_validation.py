"""Tests for the validate step: GX table checks, image checks, quarantine, budget, reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fracture_ops import storage
from fracture_ops.data.manifest import MANIFEST_COLUMNS
from fracture_ops.data.validation import (
    ValidateConfig,
    check_images,
    validate_manifest_table,
    validate_step,
)
from fracture_ops.errors import ErrorBudgetExceeded, ManifestError

OUTPUTS = ["summary.json", "report.html", "quarantine.parquet", "manifest.clean.parquet",
           "config.resolved.yaml"]


def _dicom(path: Path, stored: np.ndarray) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", *stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2047.5, 4095
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _bare_dataset(folder: Path, stored: np.ndarray) -> bytes:
    """A DICOM data set written without preamble, DICM marker or file meta (implicit VR)."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(_dicom(folder / "for-bare.dcm", stored))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _noise(seed: int, shape=(48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# image_id -> expected reason (None = clean)
EXPECTED = {
    "good_00": None, "good_01": None, "good_02": None, "good_03": None, "good_04": None,
    "good_05": None, "good_06": None, "good_07": None, "good_08": None, "good_09": None,
    "dcm_good_a": None, "dcm_good_b": None,
    "same_patient_copy_a": None, "same_patient_copy_b": None,  # duplicates within a patient: fine
    # a cross-patient duplicate: which patient the image belongs to is unknown, so every copy
    # is held for review (default quarantine_all)
    "dup_x_first": "duplicate_across_patients", "dup_x_second": "duplicate_across_patients",
    "corrupt": "decode_error", "truncated_dcm": "decode_error", "black": "blank_image",
    "no_patient": "missing_patient_id", "odd_label": "unknown_label", "gone": "missing_file",
    "tiny": "image_too_small",
    # DICOM without the 128-byte preamble (older PACS exports): kept, with a warning
    "dcm_no_preamble": None, "dcm_bare_dataset": None,
}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A manifest over small PNGs and DICOMs holding one case of each failure."""
    img = tmp_path / "img"
    img.mkdir()
    rows = []

    def add(image_id, patient, label, array=None, name=None, raw=None):
        path = img / (name or f"{image_id}.png")
        if array is not None:
            Image.fromarray(array).save(path)
        if raw is not None:
            path.write_bytes(raw)
        rows.append({"image_id": image_id, "image_uri": str(path), "patient_id": patient,
                     "study_id": f"s_{patient}", "label": label, "view": "AP",
                     "laterality": "L", "body_region": "wrist", "source": "test"})

    for i in range(10):
        add(f"good_{i:02d}", f"P{i // 2}", ("fracture", "normal")[i % 2], _noise(i))
    stored = np.tile(np.arange(64, dtype=np.uint16) * 4, (40, 1))
    _dicom(img / "a.dcm", stored)
    _dicom(img / "b.dcm", stored[:, ::-1] + 3)
    add("dcm_good_a", "P5", "fracture", name="a.dcm")
    add("dcm_good_b", "P5", "normal", name="b.dcm")
    add("same_patient_copy_a", "P6", "normal", _noise(100))
    add("same_patient_copy_b", "P6", "normal", _noise(100))
    add("dup_x_first", "P7", "fracture", _noise(200))
    add("dup_x_second", "P8", "fracture", _noise(200))
    add("corrupt", "P9", "normal", raw=b"\x89PNG\r\n\x1a\n" + b"\x00junk" * 50)
    _dicom(img / "t.dcm", stored)
    (img / "t.dcm").write_bytes((img / "t.dcm").read_bytes()[:-700])
    add("truncated_dcm", "P9", "normal", name="t.dcm")
    add("black", "P10", "normal", np.zeros((48, 40), np.uint8))
    add("no_patient", None, "normal", _noise(300))
    add("odd_label", "P11", "maybe", _noise(301))
    add("gone", "P12", "normal", name="gone.png")
    add("tiny", "P13", "fracture", _noise(302, (16, 16)))
    rng = np.random.default_rng(14)
    _dicom(img / "full.dcm", rng.integers(0, 4096, stored.shape).astype(np.uint16))
    (img / "np.dcm").write_bytes((img / "full.dcm").read_bytes()[128:])  # "DICM" + meta first
    add("dcm_no_preamble", "P14", "normal", name="np.dcm")
    (img / "bare").write_bytes(_bare_dataset(tmp_path, rng.integers(0, 4096, stored.shape).astype(np.uint16)))  # no meta, no suffix
    add("dcm_bare_dataset", "P14", "fracture", name="bare")
    df = pd.DataFrame(rows)
    storage.write_parquet(str(tmp_path / "manifest.parquet"), df)
    return tmp_path


def _cfg(root: Path, **kw) -> ValidateConfig:
    base = {"manifest_uri": str(root / "manifest.parquet"), "artifact_root": str(root / "art"),
            "run_id": "r1", "max_bad_fraction": 0.5, "workers": 2}
    return ValidateConfig(**{**base, **kw})


def _out(cfg: ValidateConfig) -> Path:
    return Path(cfg.raw_dir("validate"))  # the full outputs; the dataset store gets a view


def test_each_failure_is_quarantined_with_its_reason(dataset, caplog):
    cfg = _cfg(dataset)
    with caplog.at_level(logging.WARNING, logger="fracture_ops.data.validation"):
        result = validate_step(cfg)
    out = _out(cfg)
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    clean = pd.read_parquet(out / "manifest.clean.parquet")
    got = dict(zip(quarantine["image_id"], quarantine["reason"]))
    expected_bad = {k: v for k, v in EXPECTED.items() if v}
    assert set(got) == set(expected_bad)
    for image_id, reason in expected_bad.items():
        assert reason in got[image_id].split(";"), (image_id, got[image_id])
    assert set(clean["image_id"]) == {k for k, v in EXPECTED.items() if v is None}
    assert "truncated pixel data" in quarantine.set_index("image_id").at["truncated_dcm", "detail"]
    assert result["quarantined"] == len(expected_bad) and result["verdict"] == "ok"
    # every quarantined row is logged by its row number, naming neither the image nor a path
    assert caplog.text.count("quarantined row ") == len(expected_bad)
    for image_id in EXPECTED:
        assert image_id not in caplog.text
    assert str(dataset / "img") not in caplog.text
    # the dataset store's view names rows by number only
    public = Path(cfg.output_dir("validate"))
    assert sorted(p.name for p in public.iterdir()) == ["_SUCCESS", "report.html", "summary.json"]
    text = (public / "report.html").read_text() + (public / "summary.json").read_text()
    assert not [i for i in EXPECTED if i in text] and str(dataset) not in text


def test_clean_plus_quarantine_equals_input(dataset):
    cfg = _cfg(dataset)
    validate_step(cfg)
    out = _out(cfg)
    source = pd.read_parquet(dataset / "manifest.parquet")
    clean = pd.read_parquet(out / "manifest.clean.parquet")
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert list(clean.columns) == list(source.columns)  # no helper columns leak into the manifest
    assert {"reason", "detail"} <= set(quarantine.columns)
    both = pd.concat([clean, quarantine[list(source.columns)]], ignore_index=True)
    key = lambda d: d.sort_values("image_id").reset_index(drop=True).astype(str)
    pd.testing.assert_frame_equal(key(both), key(source))
    assert not both["image_id"].duplicated().any()


def test_outputs_and_summary(dataset):
    cfg = _cfg(dataset)
    validate_step(cfg)
    out = _out(cfg)
    for name in OUTPUTS + ["image_checks.parquet", "_SUCCESS"]:
        assert (out / name).is_file(), name
    last = max(OUTPUTS, key=lambda n: (out / n).stat().st_mtime_ns)
    assert (out / "_SUCCESS").stat().st_mtime_ns >= (out / last).stat().st_mtime_ns
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(EXPECTED)
    assert summary["reasons"]["decode_error"] == 2 and summary["reasons"]["blank_image"] == 1
    assert summary["verdict"] == "ok" and summary["failed_checks"] == []
    assert any(c["expectation"] == "expect_column_values_to_be_unique" for c in summary["table_checks"])
    html = (out / "report.html").read_text()
    assert "blank_image" in html and "dup_x_second" in html
    assert "src=" not in html and "href=" not in html and "<script" not in html  # self-contained
    facts = pd.read_parquet(out / "image_checks.parquet").set_index("image_id")
    assert facts.at["dcm_good_a", "bit_depth"] == 12 and facts.at["tiny", "width"] == 16
    assert "window fallback" in facts.at["dcm_good_a", "warnings"]
    from fracture_ops.data.images import NO_PREAMBLE

    for image_id in ("dcm_no_preamble", "dcm_bare_dataset"):
        assert NO_PREAMBLE in facts.at[image_id, "warnings"]
        assert facts.at[image_id, "width"] == 64 and facts.at[image_id, "bit_depth"] == 12
    assert NO_PREAMBLE not in facts.at["dcm_good_a", "warnings"]


def test_cross_patient_duplicates_policies(dataset):
    df = pd.read_parquet(dataset / "manifest.parquet")
    default = check_images(df, _cfg(dataset))
    flagged = {df.at[i, "image_id"]: i for i, r in default.failures.reasons.items()
               if "duplicate_across_patients" in r}
    assert set(flagged) == {"dup_x_first", "dup_x_second"}
    # both copies carry the same reason and a detail naming the whole group
    details = {"; ".join(default.failures.details[i]) for i in flagged.values()}
    (detail,) = details
    assert all(name in detail for name in flagged) and "2 patients" in detail
    # keep_first (opt-in) keeps one copy when the labels agree
    keep = check_images(df, _cfg(dataset, cross_patient_duplicates="keep_first"))
    assert {df.at[i, "image_id"] for i, r in keep.failures.reasons.items()
            if "duplicate_across_patients" in r} == {"dup_x_second"}
    # conflicting labels: no copy can be trusted, even with keep_first
    df.loc[df.image_id == "dup_x_second", "label"] = "normal"
    keep_first = check_images(df, _cfg(dataset, cross_patient_duplicates="keep_first"))
    flagged = {df.at[i, "image_id"] for i, r in keep_first.failures.reasons.items()
               if "duplicate_across_patients" in r}
    assert flagged == {"dup_x_first", "dup_x_second"}
    assert keep_first.hashes[int(df.index[df.image_id == "same_patient_copy_a"][0])] == \
        keep_first.hashes[int(df.index[df.image_id == "same_patient_copy_b"][0])]


def test_budget_exceeded_raises_after_writing_reports(dataset):
    cfg = _cfg(dataset, max_bad_fraction=0.1)
    with pytest.raises(ErrorBudgetExceeded, match="budget"):
        validate_step(cfg)
    out = _out(cfg)
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not (out / "_SUCCESS").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "error_budget_exceeded"
    assert "error_budget_exceeded" in (out / "report.html").read_text()


def test_rerun_is_idempotent(dataset):
    cfg = _cfg(dataset)
    validate_step(cfg)
    out = _out(cfg)
    first = {n: (out / n).read_bytes() for n in OUTPUTS + ["image_checks.parquet", "_SUCCESS"]}
    (out / "stale.txt").write_text("left over from an older run")
    validate_step(cfg)
    assert not (out / "stale.txt").exists()
    for name, data in first.items():
        assert (out / name).read_bytes() == data, name


def _table(labels, patients=None) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({
        "image_id": [f"i{k}" for k in range(n)], "image_uri": [f"/x/{k}.png" for k in range(n)],
        "patient_id": patients or [f"p{k}" for k in range(n)], "study_id": ["s"] * n,
        "label": labels, "view": ["AP"] * n, "laterality": ["L"] * n,
        "body_region": ["hand"] * n, "source": ["t"] * n})


def test_table_checks_row_mapping_and_prevalence(tmp_path):
    df = _table(["fracture"] * 3 + ["normal"] * 97,
                patients=["p 1", "", None] + [f"p{k}" for k in range(3, 100)])
    df.loc[5, "image_id"] = "i6"  # duplicate id: both copies flagged
    df.loc[7, "view"] = "SIDEWAYS"
    cfg = ValidateConfig(manifest_uri="unused", min_prevalence=0.05)
    res = validate_manifest_table(df, cfg)
    reasons = res.failures.reasons
    assert reasons[0] == ["malformed_patient_id"] and reasons[1] == ["malformed_patient_id"]
    assert reasons[2] == ["missing_patient_id"]
    assert reasons[5] == reasons[6] == ["duplicate_image_id"] and reasons[7] == ["unknown_view"]
    assert set(reasons) == {0, 1, 2, 5, 6, 7}
    failed = [c for c in res.checks if not c["success"] and c["level"] == "table"]
    assert len(failed) == 1 and failed[0]["value_set"] == ["fracture"]  # 3 % < 5 %


def test_any_label_set_for_multiclass():
    df = _table(["radius", "ulna", "scaphoid", "radius"])
    cfg = ValidateConfig(manifest_uri="unused", allowed_labels=None, max_prevalence=0.6)
    res = validate_manifest_table(df, cfg)
    assert res.failures.reasons == {}
    assert all(c["success"] for c in res.checks)
    with pytest.raises(ManifestError, match="label"):
        validate_manifest_table(df.drop(columns=["label"]), cfg)


def test_failed_prevalence_fails_step_after_reports(dataset):
    cfg = _cfg(dataset, min_prevalence=0.45)
    with pytest.raises(ManifestError, match="table checks failed"):
        validate_step(cfg)
    assert json.loads((_out(cfg) / "summary.json").read_text())["verdict"] == "table_checks_failed"
    assert validate_step(cfg.model_copy(update={"fail_on_table_checks": False}))["verdict"] == "ok"


def test_boxes_follow_their_images(dataset):
    boxes = pd.DataFrame([
        ["good_00", "fracture", 1, 1, 10, 10, 40, 48],
        ["black", "fracture", 1, 1, 10, 10, 40, 48],      # image quarantined
        ["good_01", "fracture", 5, 5, 2, 10, 40, 48],     # x_min > x_max
        ["nobody", "fracture", 1, 1, 10, 10, 40, 48],     # unknown image
    ], columns=["image_id", "class_name", "x_min", "y_min", "x_max", "y_max", "img_w", "img_h"])
    storage.write_parquet(str(dataset / "boxes.parquet"), boxes)
    cfg = _cfg(dataset, boxes_uri=str(dataset / "boxes.parquet"))
    validate_step(cfg)
    out = _out(cfg)
    assert pd.read_parquet(out / "boxes.clean.parquet")["image_id"].tolist() == ["good_00"]
    bad = pd.read_parquet(out / "boxes.quarantine.parquet").set_index("image_id")["reason"]
    assert bad.to_dict() == {"black": "image_quarantined", "good_01": "invalid_box",
                             "nobody": "unknown_image"}


def test_cli_exit_codes(dataset, capsys):
    from fracture_ops.cli import main

    common = ["--artifact-root", str(dataset / "art"), "--run-id", "cli"]
    assert main(["validate", str(dataset / "manifest.parquet"), *common,
                 "--set", "max_bad_fraction=0.5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verdict"] == "ok"
    assert main(["validate", "--manifest", str(dataset / "manifest.parquet"), *common,
                 "--max-bad-fraction", "0.1"]) == 4
    assert main(["validate", str(dataset / "nope.parquet"), *common]) == 3


def test_csv_manifest_and_table_only(dataset):
    df = pd.read_parquet(dataset / "manifest.parquet")
    df.to_csv(dataset / "manifest.csv", index=False)
    cfg = _cfg(dataset, manifest_uri=str(dataset / "manifest.csv"), check_images=False)
    result = validate_step(cfg)
    quarantine = pd.read_parquet(_out(cfg) / "quarantine.parquet")
    assert set(quarantine["image_id"]) == {"no_patient", "odd_label"}  # no image was opened
    assert result["rows"] == len(EXPECTED)
    assert not (_out(cfg) / "image_checks.parquet").exists()


# ----------------------------------------------------------------------------- real data

TRUNCATED = {"IMG0004084", "IMG0004189", "IMG0004255", "IMG0004278"}


@pytest.mark.realdata
def test_real_fracatlas_validates_and_reports_truncated(realdata, tmp_path):
    files = sorted((realdata / "fracatlas" / "images").rglob("*.jpg"))
    # FracAtlas has no patient ids: each image is its own group
    df = pd.DataFrame({
        "image_id": [f.stem for f in files], "image_uri": [str(f) for f in files],
        "patient_id": [f.stem for f in files], "study_id": [f.stem for f in files],
        "label": ["fracture" if f.parent.name == "Fractured" else "normal" for f in files],
        "view": "UNKNOWN", "laterality": "U", "body_region": "unknown", "source": "fracatlas"})
    storage.write_parquet(str(tmp_path / "m.parquet"), df[MANIFEST_COLUMNS])
    cfg = ValidateConfig(manifest_uri=str(tmp_path / "m.parquet"), artifact_root=str(tmp_path),
                         run_id="real")
    result = validate_step(cfg)
    out = _out(cfg)
    summary = json.loads((out / "summary.json").read_text())
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    warned = {w["image_id"] for w in summary["warnings"] if w["warning"].startswith("truncated")}
    refused = set(quarantine.loc[quarantine["reason"].str.contains("truncated_image"), "image_id"])
    assert warned | refused == TRUNCATED and not warned & refused  # all four reported, once
    assert warned == {"IMG0004189", "IMG0004255"}  # per the 10 % policy of images.py
    assert result["verdict"] == "ok" and result["clean"] + result["quarantined"] == 300
    assert set(quarantine["image_id"]) == refused  # nothing else in FracAtlas is bad
    html = (out / "report.html").read_text()
    assert all(t in html for t in TRUNCATED)


def test_unexpected_decoder_error_is_quarantined_not_fatal(dataset, monkeypatch):
    from fracture_ops.data import images

    real = images.read_image

    def flaky(uri, **kw):
        if uri.endswith("good_03.png"):
            raise ZeroDivisionError("decoder bug")
        return real(uri, **kw)

    monkeypatch.setattr(images, "read_image", flaky)
    df = pd.read_parquet(dataset / "manifest.parquet")
    res = check_images(df, _cfg(dataset))
    row = int(df.index[df.image_id == "good_03"][0])
    assert res.failures.reasons[row] == ["decode_error"]
    assert "ZeroDivisionError" in res.failures.details[row][0]


def test_config_rejects_inverted_bounds():
    from fracture_ops.config import load_config
    from fracture_ops.errors import ConfigError

    with pytest.raises(ConfigError, match="min_prevalence"):
        load_config(ValidateConfig, overrides={"manifest_uri": "m", "min_prevalence": 0.6,
                                               "max_prevalence": 0.4})
    # no manifest: this run's ingested one, refused by path when the run has none
    cfg = load_config(ValidateConfig, overrides={"artifact_root": "/nonexistent/art",
                                                 "run_id": "r9"})
    with pytest.raises(ConfigError, match="step 'ingest' of run 'r9' has not finished .*r9/ingest"):
        validate_step(cfg)
