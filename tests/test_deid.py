"""Tests for DICOM de-identification (PS3.15 Annex E): fracture_ops.deid (header profile and
synthetic_dicom, on synthetic PHI files and on the real pseudo-PHI DICOMs in ../shared/realdata."""

from __future__ import annotations

import io
import hashlib
import hmac
import json
import logging
import re
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from fracture_ops import storage
from fracture_ops.cli import main as cli_main
from fracture_ops.deid import config as deid_config
from fracture_ops.deid import dicom as deid
from fracture_ops.deid.config import (
    SECRET_ENV,
    BlankRegion,
    DeidConfig,
    SafePrivateTag,
    load_keys,
)
from fracture_ops.deid.folder import deidentify_folder
from fracture_ops.deid.images import strip_image_metadata
from fracture_ops.deid.manifest import deidentify_manifest_step
from fracture_ops.deid.profile import DeidKeys, shift_date, shift_datetime
from fracture_ops.data.synthetic_dicom import fake_patient, write_phi_dicom
from fracture_ops.errors import BadInputError, ConfigError, ErrorBudgetExceeded, FileRejected

SECRET = "unit-test-secret-0123456789abcdef-32+"
KEYS = DeidKeys(SECRET.encode())
TEXT_PHI_KEYWORDS = {
    "PatientID", "AccessionNumber", "InstitutionName", "InstitutionAddress", "PatientAddress",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PatientTelephoneNumbers",
    "Occupation", "StationName", "DeviceSerialNumber", "RequestedProcedureID", "StudyID",
    "ScheduledProcedureStepID",
}


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _cfg(tmp_path: Path, **kw) -> DeidConfig:
    return DeidConfig(artifact_root=str(tmp_path / "artifacts"), **kw)


# ----------------------------------------------------------------------------- PHI collection

def _phi_values(ds) -> set[str]:
    """The identifying strings of an input data set (names, ids, dates, UIDs, private values).

    Private values that merely repeat a public, non-identifying value (a vendor copy of the
    convolution kernel, say) are not counted.
    """
    out: set[str] = set()
    private: set[str] = set()
    public: set[str] = set()
    for elem in ds.iterall():
        value = elem.value
        if elem.tag == 0x7FE00010 or elem.VR == "SQ" or value in (None, "", b""):
            continue
        values = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            text = v.decode("latin-1") if isinstance(v, bytes) else str(v)
            text = text.strip(" \x00")
            if elem.tag.is_private:
                private.add(text)
                continue
            public.add(text)
            if elem.keyword in TEXT_PHI_KEYWORDS:
                out.add(text)
            elif elem.VR == "PN":
                out.update(p for p in re.split(r"[\^= ]", text) if p)
            elif elem.VR in ("DA", "DT"):
                out.add(text[:8])
            elif elem.VR == "UI" and not text.startswith("1.2.840.10008."):
                out.add(text)
    out |= private - (public - out)
    return {v for v in out if len(v) >= 4 and v != "ANONYMIZED"}


def _leaks(blob: bytes, phi: set[str]) -> list[str]:
    """PHI values found in ``blob`` as whole words (so MARY does not match PRIMARY)."""
    low = blob.lower()
    found = []
    for v in (v for v in phi if v.lower().encode("latin-1") in low):  # fast pre-filter
        pattern = re.escape(v.lower().encode("latin-1"))
        pattern = (rb"(?<![a-z0-9])" if v[0].isalnum() else b"") + pattern
        pattern += rb"(?![a-z0-9])" if v[-1].isalnum() else b""
        if re.search(pattern, low):
            found.append(v)
    return sorted(found)


def _assert_phi_free(blob: bytes, phi: set[str], what: str) -> None:
    leaked = _leaks(blob, phi)
    assert not leaked, f"{what} still holds PHI: {leaked}"


def _assert_elements_phi_free(ds, phi: set[str]) -> None:
    for elem in ds.iterall():
        if elem.tag != 0x7FE00010 and elem.VR != "SQ":
            text = str(elem.value).encode("latin-1", "replace")
            _assert_phi_free(text, phi, f"{elem.tag} {elem.keyword}")


def _days(a: str, b: str) -> int:
    to_date = lambda s: date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    return (to_date(b) - to_date(a)).days


def _output_for(out_dir: Path, src) -> Path:
    """The de-identified file of an input data set (named by its remapped SOP Instance UID)."""
    name = f"dicom/*/{KEYS.uid(src.SOPInstanceUID)}.dcm"
    hits = list(out_dir.glob(name)) + list(out_dir.glob(f"held/{name}"))  # held for review
    assert len(hits) == 1
    return hits[0]


# ----------------------------------------------------------------------------- synthetic set

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Five PHI DICOMs (patient 1: two files of one study plus a later study; two more patients),
    an unreadable .dcm and a text file, named with the patients' names like real exports."""
    root = tmp_path_factory.mktemp("phi_in")
    rng = np.random.default_rng(11)
    p1, p2, p3 = fake_patient(rng), fake_patient(rng), fake_patient(rng)
    px = lambda seed: np.random.default_rng(seed).integers(0, 4096, (48, 64), dtype=np.uint16)
    name = lambda p, tag: f"{p['patient_name'].replace('^', '_')}_{tag}.dcm"
    files = {"a": root / "p1" / name(p1, "a"), "b": root / "p1" / name(p1, "b"),
             "c": root / "p1" / name(p1, "c"), "d": root / name(p2, "d"), "e": root / name(p3, "e")}
    write_phi_dicom(files["a"], px(1), **p1, seed=1)
    sop_a = pydicom.dcmread(files["a"]).SOPInstanceUID
    write_phi_dicom(files["b"], px(2), **p1, seed=2, referenced_sop_uid=sop_a)
    first = datetime.strptime(p1["study_date"], "%Y%m%d")
    later = (first + timedelta(days=40)).strftime("%Y%m%d")
    next_day = (first + timedelta(days=41)).strftime("%Y%m%d")
    write_phi_dicom(files["c"], px(3), **{**p1, "study_date": later, "accession": "ACC900000001"},
                    seed=3, content_date=next_day, modality="CR", photometric="MONOCHROME1")
    write_phi_dicom(files["d"], px(4), **p2, seed=4, burned_in_annotation=None,
                    manufacturer="Watched Corp")
    write_phi_dicom(files["e"], px(5), **p3, seed=5, burned_in_annotation="YES")
    (root / f"{p2['patient_name'].replace('^', '_')}_broken.dcm").write_bytes(b"\x00" * 50)
    (root / "notes.txt").write_text("scan notes\n")
    datasets = {k: pydicom.dcmread(v) for k, v in files.items()}
    phi = set().union(*(_phi_values(ds) for ds in datasets.values()))
    phi |= {part for p in (p1, p2, p3) for part in p["patient_name"].split("^")}
    return {"root": root, "files": files, "ds": datasets, "phi": phi, "patients": (p1, p2, p3)}


@pytest.fixture(scope="module")
def folder_run(synthetic, tmp_path_factory) -> tuple[Path, dict]:
    """Folder mode over the synthetic set (module-scoped: one run serves several tests)."""
    out = tmp_path_factory.mktemp("phi_out") / "deid"
    cfg = DeidConfig(artifact_root=str(out.parent), max_bad_fraction=0.5,
                     watch_manufacturers=["Watched Corp"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET_ENV, SECRET)
        summary = deidentify_folder(str(synthetic["root"]), str(out), cfg)
    return out, summary


# ----------------------------------------------------------------------------- keys and dates

def test_uids_are_deterministic_valid_and_secret_dependent():
    uid = KEYS.uid("1.2.3.4.5")
    assert uid == DeidKeys(SECRET.encode()).uid("1.2.3.4.5")
    assert re.fullmatch(r"2\.25\.[1-9]\d*", uid) and len(uid) <= 64
    assert uuid.UUID(int=int(uid[5:])).version == 8
    assert DeidKeys(b"another-secret").uid("1.2.3.4.5") != uid
    assert KEYS.uid("1.2.3.4.6") != uid
    assert KEYS.patient("123") == KEYS.patient(" 123 ") != DeidKeys(b"x").patient("123")


def test_date_offsets_stay_in_range_and_vary_by_patient():
    offsets = {KEYS.date_offset_days(f"patient-{i}") for i in range(300)}
    assert min(offsets) >= -3650 and max(offsets) <= -1 and len(offsets) > 250
    assert DeidKeys(b"k", max_shift_days=5).date_offset_days("x") in range(-5, 0)


def test_date_shift_handles_da_dt_and_rejects_partial_or_bad_values():
    assert shift_date("20130713", -10) == "20130703"
    assert shift_date("2013.07.13", -13) == "20130630"
    assert shift_date("20130231", -1) is None and shift_date("junk", -1) is None
    assert shift_datetime("20200528101520.125+0100", -1) == "20200527101520.125"
    assert shift_datetime("20200301", -1) == "20200229"
    assert shift_datetime("2020", -1) is None and shift_datetime("202005", -1) is None


def test_missing_secret_is_a_clear_error_and_dev_secret_warns(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(ConfigError, match=SECRET_ENV):
        load_keys(_cfg(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fracture_ops.deid"):
        keys = load_keys(_cfg(tmp_path, allow_dev_secret=True))
    assert "DEV secret" in caplog.text and keys.patient("P1") != KEYS.patient("P1")


@pytest.mark.parametrize("length", [1, 31])
def test_short_secrets_are_refused(monkeypatch, tmp_path, length):
    monkeypatch.setenv(SECRET_ENV, "k" * length)
    with pytest.raises(ConfigError, match="at least 32.*token_urlsafe"):
        load_keys(_cfg(tmp_path))
    monkeypatch.setenv(SECRET_ENV, "k" * 32)
    assert load_keys(_cfg(tmp_path)).patient("P1")


def test_reports_hold_nothing_derived_from_the_key_alone(tmp_path):
    """No key fingerprint: a value computed from the key and public text would let a guessed
    key be confirmed offline."""
    from fracture_ops.deid.profile import DeidKeys
    from fracture_ops.deid.report import build_report

    report = json.dumps(build_report([], _cfg(tmp_path), KEYS, "folder"))
    secret = SECRET.encode()
    for purpose in ("fingerprint", "", "key", "secret"):
        digest = hmac.new(secret, f"{purpose}\x00".encode(), hashlib.sha256).hexdigest()
        assert digest[:12] not in report
    assert "fingerprint" not in report
    assert not hasattr(DeidKeys, "fingerprint")


# ----------------------------------------------------------------------------- folder mode

def test_no_phi_left_in_outputs_reports_or_names(synthetic, folder_run):
    out, _ = folder_run
    phi = synthetic["phi"]
    outputs = [p for p in out.rglob("*") if p.is_file()]
    assert len(list(out.glob("dicom/*/*.dcm"))) == 5
    for path in outputs:
        _assert_phi_free(path.read_bytes(), phi, path.name)
        _assert_phi_free(str(path.relative_to(out)).encode(), phi, "output name")
    for key, src in synthetic["ds"].items():
        res = pydicom.dcmread(_output_for(out, src))
        _assert_elements_phi_free(res, phi)
        assert not [e for e in res.iterall() if e.tag.is_private], key
        assert "SourceApplicationEntityTitle" not in res.file_meta
        assert res.file_meta.ImplementationClassUID == deid_config.IMPLEMENTATION_UID
        assert not any(res.get(k) for k in ("OtherPatientNames", "RequestAttributesSequence",
                                             "ReferencedPatientSequence", "PatientBirthDate"))


def test_pixels_identity_markers_and_nested_sequences(synthetic, folder_run):
    out, _ = folder_run
    for src in synthetic["ds"].values():
        res = pydicom.dcmread(_output_for(out, src))
        assert res.PixelData == src.PixelData
        assert res.PatientIdentityRemoved == "YES"
        assert res.PatientID == res.PatientName == KEYS.patient(src.PatientID)
        codes = [item.CodeValue for item in res.DeidentificationMethodCodeSequence]
        assert codes == ["113100", "113101", "113107"]  # basic, clean pixel data, dates
        assert res.BurnedInAnnotation == "NO"
        assert res.LongitudinalTemporalInformationModified == "MODIFIED"
        equipment = res.ContributingEquipmentSequence[0]  # kept sequence, cleaned inside
        assert equipment.Manufacturer == "ACME Relay" and not equipment.get("InstitutionName")
        assert "InstitutionAddress" not in equipment
        group = res.SourcePatientGroupIdentificationSequence[0]
        assert group.PatientID == KEYS.patient(src.PatientID) and "IssuerOfPatientID" not in group


def test_uids_stay_consistent_across_files_of_a_study(synthetic, folder_run):
    out, _ = folder_run
    src_a, src_b = synthetic["ds"]["a"], synthetic["ds"]["b"]
    a, b = (pydicom.dcmread(_output_for(out, s)) for s in (src_a, src_b))
    c = pydicom.dcmread(_output_for(out, synthetic["ds"]["c"]))
    assert a.StudyInstanceUID == b.StudyInstanceUID != src_a.StudyInstanceUID
    assert a.StudyInstanceUID.startswith("2.25.") and c.StudyInstanceUID != a.StudyInstanceUID
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert a.PatientID == b.PatientID == c.PatientID


def test_date_intervals_survive_per_patient(synthetic, folder_run):
    out, _ = folder_run
    src_a, src_c = synthetic["ds"]["a"], synthetic["ds"]["c"]
    a, c = (pydicom.dcmread(_output_for(out, s)) for s in (src_a, src_c))
    offset = _days(src_a.StudyDate, a.StudyDate)
    assert offset == KEYS.date_offset_days(src_a.PatientID) and -3650 <= offset <= -1
    assert _days(a.StudyDate, c.StudyDate) == _days(src_a.StudyDate, src_c.StudyDate) == 40
    assert _days(c.StudyDate, c.ContentDate) == 1
    assert a.AcquisitionDateTime[8:] == src_a.AcquisitionDateTime[8:18]  # time kept, tz dropped
    assert a.StudyTime == src_a.StudyTime


def test_flags_unreadable_and_skipped_files_are_reported(synthetic, folder_run):
    out, summary = folder_run
    report = json.loads((out / "report.json").read_text())
    assert summary["deidentified"] == 5 and summary["quarantined"] == 1 and summary["skipped"] == 1
    assert report["quarantined"][0]["reason"].startswith("not a DICOM instance")
    by_sop = {item["output"].split("/")[-1][:-4]: item["flags"] for item in report["flagged"]}
    flags = {k: by_sop.get(KEYS.uid(ds.SOPInstanceUID), []) for k, ds in synthetic["ds"].items()}
    assert flags["d"] == ["burned_in_annotation_absent", "watchlist_manufacturer"]
    assert flags["e"] == ["burned_in_annotation_yes"]
    assert flags["a"] == flags["b"] == flags["c"] == []
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 7 and all(len(r["input"]) == 24 for r in audit)
    assert (out / "_SUCCESS").exists()


def test_same_secret_gives_identical_bytes_other_secret_differs(synthetic, folder_run, tmp_path,
                                                               monkeypatch):
    first, _ = folder_run
    cfg = DeidConfig(artifact_root=str(first.parent), max_bad_fraction=0.5,
                     watch_manufacturers=["Watched Corp"])
    second = tmp_path / "second"
    deidentify_folder(str(synthetic["root"]), str(second), cfg)
    names = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(second)) for p in second.rglob("*") if p.is_file())
    for name in names:
        if name != "_SUCCESS":  # holds the output folder's path
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    monkeypatch.setenv(SECRET_ENV, "a-different-secret-0123456789abcdef")
    other = tmp_path / "other"
    deidentify_folder(str(synthetic["root"]), str(other), cfg)
    a_first = pydicom.dcmread(_output_for(first, synthetic["ds"]["a"]))
    a_other = pydicom.dcmread(next(other.glob("dicom/*/*.dcm")))
    assert not {p.name for p in other.rglob("*.dcm")} & set(names)
    assert a_other.PatientID != a_first.PatientID


def test_error_budget_and_folder_guards(synthetic, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ErrorBudgetExceeded):
        deidentify_folder(str(synthetic["root"]), str(out), _cfg(tmp_path, max_bad_fraction=0.0))
    assert (out / "report.json").exists() and not (out / "_SUCCESS").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(BadInputError, match="refusing"):
        deidentify_folder(str(synthetic["root"]), str(foreign), _cfg(tmp_path))
    with pytest.raises(BadInputError, match="inside"):
        deidentify_folder(str(synthetic["root"]), str(synthetic["root"] / "x"), _cfg(tmp_path))
    with pytest.raises(BadInputError, match="does not exist"):
        deidentify_folder(str(tmp_path / "missing"), str(tmp_path / "o2"), _cfg(tmp_path))


# ----------------------------------------------------------------------------- options

def test_blank_region_zeroes_only_the_matching_box(synthetic, tmp_path):
    src = synthetic["files"]["a"]
    region = BlankRegion(box=(5, 6, 20, 30), manufacturer="acme imaging", rows=48)
    elsewhere = BlankRegion(box=(0, 0, 64, 48), manufacturer="Other Vendor")
    cfg = _cfg(tmp_path, blank_regions=[region, elsewhere])
    out, result = deid.deidentify_dicom_bytes(src.read_bytes(), KEYS, cfg)
    before = pydicom.dcmread(src).pixel_array
    after = pydicom.dcmread(io.BytesIO(out)).pixel_array
    assert (after[6:30, 5:20] == before.min()).all()
    mask = np.ones_like(before, dtype=bool)
    mask[6:30, 5:20] = False
    assert (after[mask] == before[mask]).all() and (before[6:30, 5:20] != before.min()).any()
    assert "regions_blanked" in result.flags and result.counts["regions_blanked"] == 1
    res = pydicom.dcmread(io.BytesIO(out))
    codes = [i.CodeValue for i in res.DeidentificationMethodCodeSequence]
    assert "113101" in codes
    with pytest.raises(ValueError):
        BlankRegion(box=(10, 0, 5, 5))


def test_safe_private_and_patient_characteristics_options(synthetic, tmp_path):
    src = synthetic["ds"]["a"]
    cfg = _cfg(tmp_path, retain_patient_characteristics=True, shift_dates=False,
               safe_private_tags=[SafePrivateTag(creator="FRACOPS SYNTH PHI", group=0x11,
                                                 element=0x13)])
    out, _ = deid.deidentify_dicom_bytes(synthetic["files"]["a"].read_bytes(), KEYS, cfg)
    res = pydicom.dcmread(io.BytesIO(out))
    private = {e.tag: e.value for e in res if e.tag.is_private}
    assert private == {0x00110010: "FRACOPS SYNTH PHI", 0x00111013: src.AccessionNumber}
    assert res.PatientSex == src.PatientSex
    assert res.StudyDate == "" and res.SeriesDate == "19000101"  # no shift: Z empty, X/D dummy
    codes = [i.CodeValue for i in res.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113101", "113108", "113111"]
    assert res.LongitudinalTemporalInformationModified == "REMOVED"
    out, result = deid.deidentify_dicom_bytes(synthetic["files"]["a"].read_bytes(), KEYS,
                                              _cfg(tmp_path), patient_key="MANIFEST-7",
                                              study_key="MANIFEST-STUDY-1")
    res = pydicom.dcmread(io.BytesIO(out))
    assert res.PatientID == result.patient == KEYS.patient("MANIFEST-7")
    assert res.StudyInstanceUID == result.study_uid == KEYS.uid("MANIFEST-STUDY-1")
    assert result.counts["patient_id_from_manifest"] == 1
    assert result.counts["study_uid_from_manifest"] == 1


def test_png_and_jpeg_lose_metadata_but_keep_pixels():
    from PIL import PngImagePlugin

    arr = np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "OKONKWO^AURELIO")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", pnginfo=info)
    png, ext = strip_image_metadata(buf.getvalue())
    assert ext == ".png" and b"OKONKWO" not in png and b"OKONKWO" in buf.getvalue()
    assert (np.asarray(Image.open(io.BytesIO(png))) == arr).all()
    exif = Image.Exif()
    exif[0x013B] = "LINDQVIST^DELPHINE"  # Artist
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif, comment=b"patient MARCHETTI")
    jpg, ext = strip_image_metadata(buf.getvalue())
    assert ext == ".jpg" and b"LINDQVIST" not in jpg and b"MARCHETTI" not in jpg
    with Image.open(io.BytesIO(jpg)) as stripped, Image.open(buf) as original:
        assert not stripped.getexif() and (np.asarray(stripped) == np.asarray(original)).all()


# ----------------------------------------------------------------------------- manifest mode

def test_manifest_mode_keeps_patient_grouping_and_agrees_with_dicom(synthetic, tmp_path):
    ds = synthetic["ds"]
    png = tmp_path / "in" / "Okonkwo_scan.png"
    png.parent.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    rows = [{"image_id": f"{ds[k].PatientName}_{k}", "image_uri": str(synthetic["files"][k]),
             "patient_id": ds[k].PatientID, "study_id": ds[k].StudyInstanceUID, "label": "normal"}
            for k in ("a", "b")]
    rows.append({"image_id": f"{ds['d'].PatientName}_d", "image_uri": str(synthetic["files"]["d"]),
                 "patient_id": "SYN00002", "study_id": "SYN00002-S1", "label": "normal"})
    rows.append({"image_id": "Okonkwo_png", "image_uri": str(png), "patient_id": "PNG-PATIENT-1",
                 "study_id": "S-PNG", "label": "fracture", "original_path": str(png)})
    rows.append({"image_id": "missing", "image_uri": str(tmp_path / "gone.dcm"),
                 "patient_id": "X", "study_id": "Y", "label": "normal"})
    manifest_uri = tmp_path / "in" / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest_uri)
    boxes = pd.DataFrame({"image_id": [rows[0]["image_id"], "Okonkwo_png"],
                          "class_name": "fracture",
                          "x_min": 1.0, "y_min": 1.0, "x_max": 5.0, "y_max": 5.0,
                          "img_w": 64.0, "img_h": 48.0})
    boxes.to_parquet(tmp_path / "in" / "boxes.parquet")
    cfg = _cfg(tmp_path, manifest_uri=str(manifest_uri), max_bad_fraction=0.3)
    summary = deidentify_manifest_step(cfg)
    out = pd.read_parquet(summary["manifest_uri"]).set_index("image_id")
    assert len(out) == 4 and summary["quarantined"] == 1 and "original_path" not in out.columns
    new = {k: KEYS.image_id(f"{ds[k].PatientName}_{k}") for k in ("a", "b", "d")}
    assert out.loc[new["a"], "patient_id"] == out.loc[new["b"], "patient_id"]
    assert out.loc[new["a"], "patient_id"] != out.loc[new["d"], "patient_id"]
    # a manifest that carries the header's Study Instance UID gets the folder-mode remap
    assert out.loc[new["a"], "study_id"] == KEYS.uid(ds["a"].StudyInstanceUID)
    for k in ("a", "b", "d"):  # manifest ids differing from the header still agree with the file
        res = pydicom.dcmread(out.loc[new[k], "image_uri"])
        assert res.PatientID == out.loc[new[k], "patient_id"]
        assert res.StudyInstanceUID == out.loc[new[k], "study_id"]
    assert out.loc[new["d"], "patient_id"] == KEYS.patient("SYN00002")
    assert all(Path(u).exists() and "deidentify" in u for u in out["image_uri"])
    table = out.reset_index().astype(str).to_csv()
    _assert_phi_free(table.encode(), synthetic["phi"] | {"Okonkwo"}, "manifest")
    box_out = pd.read_parquet(summary["boxes_uri"])
    assert sorted(box_out["image_id"]) == sorted([new["a"], KEYS.image_id("Okonkwo_png")])
    first = Path(summary["manifest_uri"]).read_bytes()
    again = deidentify_manifest_step(cfg)  # idempotent rerun
    assert Path(again["manifest_uri"]).read_bytes() == first
    assert storage.is_complete(cfg.output_dir("deidentify"))


# ----------------------------------------------------------------------------- CLI

def test_cli_folder_mode_and_exit_codes(synthetic, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli_out"
    args = ["deidentify", str(synthetic["root"]), str(out), "--set", "max_bad_fraction=0.5"]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["deidentified"] == 5
    assert cli_main(["deidentify", str(tmp_path / "nope"), str(tmp_path / "o")]) == 3
    monkeypatch.delenv(SECRET_ENV)
    assert cli_main(["deidentify", str(synthetic["root"]), str(tmp_path / "o3")]) == 2
    assert cli_main(["deidentify", str(synthetic["root"]), str(tmp_path / "o4"),
                     "--allow-dev-secret", "--set", "max_bad_fraction=0.5"]) == 0


# ----------------------------------------------------------------------------- real DICOMs

@pytest.fixture(scope="module")
def real_run(realdata, tmp_path_factory) -> tuple[Path, Path]:
    src = realdata / "dicom" / "dicom_files"
    out = tmp_path_factory.mktemp("real_out") / "deid"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET_ENV, SECRET)
        deidentify_folder(str(src), str(out), DeidConfig(artifact_root=str(out.parent)))
    return src, out


@pytest.mark.realdata
def test_real_dicoms_lose_all_phi_and_keep_pixels(real_run):
    src, out = real_run
    name_parts = {"Douglas", "Davidson", "Scott", "Kaufman"}  # in the input file names
    outputs = [p for p in out.rglob("*") if p.is_file()]
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    blanked = {r["output"]: r["pixels"]["boxes"][0] for r in audit if r.get("output")}
    for path in src.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        phi = _phi_values(ds) | name_parts
        res_path = _output_for(out, ds)
        _assert_phi_free(res_path.read_bytes(), phi, res_path.name)
        res = pydicom.dcmread(res_path)
        _assert_elements_phi_free(res, phi)
        boxes = blanked[str(res_path.relative_to(out))]
        assert boxes, "burned-in text was found and blanked in every real file"
        before, after = ds.pixel_array, res.pixel_array.copy()
        for x0, y0, x1, y1 in boxes:
            assert (after[y0:y1, x0:x1] == before.min()).all()
        for x0, y0, x1, y1 in boxes:  # outside the blanked boxes: bit-identical
            after[y0:y1, x0:x1] = before[y0:y1, x0:x1]
        assert (after == before).all()
        assert res.BurnedInAnnotation == "NO"
        assert res.PatientID == KEYS.patient(ds.PatientID)
        for report in ("report.json", "audit.jsonl"):
            _assert_phi_free((out / report).read_bytes(), phi, report)
    for path in outputs:
        _assert_phi_free(str(path.relative_to(out)).encode(), name_parts, "output name")
    martin = [pydicom.dcmread(p) for p in out.glob(f"dicom/{KEYS.patient('339833062')}/*.dcm")]
    assert len(martin) == 2 and martin[0].FrameOfReferenceUID == martin[1].FrameOfReferenceUID


@pytest.mark.realdata
def test_real_dicoms_burned_in_flags_follow_header_and_watch_list(real_run, tmp_path):
    src, out = real_run
    report = json.loads((out / "report.json").read_text())
    flagged = {item["output"].split("/")[-1][:-4] for item in report["flagged"]}
    headers = {KEYS.uid(ds.SOPInstanceUID): ds.get("BurnedInAnnotation")
               for ds in (pydicom.dcmread(p) for p in src.glob("*.dcm"))}
    assert flagged == {uid for uid, value in headers.items() if value in (None, "YES")}
    # two DX files say NO although text is burned in: the header rule cannot catch them
    assert len(flagged) == 5
    watched = tmp_path / "watched"
    cfg = _cfg(tmp_path, watch_manufacturers=["Philips Medical Systems"])
    assert deidentify_folder(str(src), str(watched), cfg)["flagged"] == 7


@pytest.mark.realdata
def test_real_dicom_burned_in_text_region_is_blanked(realdata, tmp_path):
    path = next((realdata / "dicom" / "dicom_files").glob("7361647728*.dcm"))
    truth = json.loads(path.with_suffix(".json").read_text())["annotation"]
    boxes = [part["bbox"] for item in truth for part in (item["key"], item["value"])]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes) + 1, max(b[3] for b in boxes) + 1
    src = pydicom.dcmread(path)
    region = BlankRegion(box=(x0, y0, x1, y1), manufacturer=src.Manufacturer, rows=src.Rows,
                         columns=src.Columns)
    cfg = _cfg(tmp_path, blank_regions=[region], pixels={"enabled": False})
    out, _ = deid.deidentify_dicom_bytes(path.read_bytes(), KEYS, cfg)
    before, after = src.pixel_array, pydicom.dcmread(io.BytesIO(out)).pixel_array
    assert (before[y0:y1, x0:x1] != before.min()).any()  # the text was there
    assert (after[y0:y1, x0:x1] == before.min()).all()
    after[y0:y1, x0:x1] = before[y0:y1, x0:x1]
    assert (after == before).all()


def test_config_loads_from_yaml_section(tmp_path):
    from fracture_ops.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(
        "run_id: r1\n"
        "deidentify:\n"
        "  watch_manufacturers: [Philips Medical Systems]\n"
        "  blank_regions:\n"
        "    - {box: [0, 0, 100, 40], modality: DX, rows: 800}\n"
        "  safe_private_tags:\n"
        "    - {creator: GEMS_ACQU_01, group: 0x0019, element: 0x9C}\n")
    cfg = load_config(DeidConfig, str(path), ["max_bad_fraction=0.2"])
    assert cfg.run_id == "r1" and cfg.max_bad_fraction == 0.2
    assert cfg.blank_regions[0].matches("dx", "any", 800, 5) and not cfg.blank_regions[0].matches(
        "CR", "any", 800, 5)
    assert cfg.safe_private_tags[0].group == 0x19 and cfg.safe_private_tags[0].element == 0x9C
    with pytest.raises(ConfigError):
        load_config(DeidConfig, None, ["safe_private_tags=[{creator: X, group: 16, element: 1}]"])


def test_compressed_pixels_pass_through_but_cannot_be_blanked(synthetic, tmp_path):
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(synthetic["files"]["a"])
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out, _ = deid.deidentify_dicom_bytes(buf.getvalue(), KEYS, _cfg(tmp_path))
    res = pydicom.dcmread(io.BytesIO(out))
    assert res.file_meta.TransferSyntaxUID == RLELossless and res.PixelData == ds.PixelData
    cfg = _cfg(tmp_path, blank_regions=[BlankRegion(box=(0, 0, 4, 4))])
    with pytest.raises(FileRejected, match="compressed"):
        deid.deidentify_dicom_bytes(buf.getvalue(), KEYS, cfg)


def test_public_attributes_outside_the_dictionary_are_removed(synthetic, tmp_path):
    """Annex E: an attribute the profile cannot judge is not kept (a name in (0018,9999))."""
    from pydicom.datadict import dictionary_has_tag

    assert not dictionary_has_tag(0x00189999)
    ds = pydicom.dcmread(synthetic["files"]["a"])
    ds.add_new(0x00189999, "LO", "DOE JOHN")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    cfg = _cfg(tmp_path, pixels={"enabled": False})
    out, result = deid.deidentify_dicom_bytes(buf.getvalue(), KEYS, cfg)
    assert 0x00189999 not in pydicom.dcmread(io.BytesIO(out)) and b"DOE JOHN" not in out
    assert result.counts["unknown_removed"] == 1
    kept, _ = deid.deidentify_dicom_bytes(
        buf.getvalue(), KEYS, _cfg(tmp_path, pixels={"enabled": False},
                                   keep_unknown_tags=["00189999"]))
    assert pydicom.dcmread(io.BytesIO(kept))[0x00189999].value == "DOE JOHN"
    with pytest.raises(ValueError, match="8 hex digits"):
        _cfg(tmp_path, keep_unknown_tags=["0019abcd"])
