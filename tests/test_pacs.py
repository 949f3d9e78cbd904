"""pacs-ingest against a running Orthanc (Debian's orthanc + orthanc-dicomweb, loopback, basic
auth): exactly the new CR/DX studies, de-identified on arrival (headers and burned-in text), no
duplicates after a second run, a kill, or the PACS going down mid-run; a 401 names the
connection."""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from fracture_ops.pacs import orthanc_local
from fracture_ops.pacs.dicomweb import PacsAuthError, PacsConnection, PacsUnavailable
from fracture_ops.pacs.ingest import PacsIngestConfig, pacs_ingest_step, query_start
from tests.test_deid import _leaks, _phi_values

pytestmark = pytest.mark.integration
NAME_PARTS = {"Douglas", "Davidson", "Scott", "Kaufman", "Chad", "Martin", "William", "Morales",
              "Michael", "James"}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    why = orthanc_local.missing()
    if why:
        pytest.skip(why)
    server = orthanc_local.LocalOrthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


def _clear(server) -> None:
    for study in server.rest("GET", "/studies"):
        server.rest("DELETE", f"/studies/{study}")


def _synthetic(folder: Path, n_studies: int, modality: str = "DX", start: int = 0,
               instances: int = 2) -> list[pydicom.Dataset]:
    """Synthetic studies full of fake PHI (two instances each); ``modality`` MR relabels a DX
    file as an MR study, which the ingest must leave alone."""
    from fracture_ops.data.synthetic_dicom import fake_patient, write_phi_dicom

    out = []
    for k in range(start, start + n_studies):
        rng = np.random.default_rng(100 + k)
        phi = fake_patient(rng)
        for i in range(instances):
            path = folder / f"syn-{modality}-{k}-{i}.dcm"
            pixels = (rng.random((96, 80)) * 4000).astype(np.uint16)
            write_phi_dicom(path, pixels, seed=i, modality="CR" if modality == "CR" else "DX",
                            patient_name=phi["patient_name"], patient_id=phi["patient_id"],
                            birth_date=phi["birth_date"], study_date=f"2024{1 + k % 12:02d}15",
                            accession=phi["accession"], institution=phi["institution"])
            ds = pydicom.dcmread(path)
            if modality == "MR":
                ds.Modality = "MR"
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            out.append(ds)
    return out


def _real(realdata: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted((realdata / "dicom" / "dicom_files").glob("*.dcm"))]


def _store(server, datasets) -> None:
    PacsConnection.from_env(server.env()).client().store_instances([copy.deepcopy(d) for d in datasets])


def _cfg(tmp: Path, run: str, dataset: str = "pacs", **kw) -> PacsIngestConfig:
    return PacsIngestConfig(artifact_root=str(tmp / "art"), run_id=run, dataset=dataset,
                            allow_dev_secret=True, backoff_s=0.5, **kw)


def _conn(server, **kw) -> PacsConnection:
    return PacsConnection.from_env(server.env(), **{"backoff_s": 0.5, **kw})


def _wanted(datasets) -> list[pydicom.Dataset]:
    return [d for d in datasets if d.Modality in ("CR", "DX")]


def _manifest(tmp: Path, dataset: str = "pacs") -> pd.DataFrame:
    return pd.read_parquet(tmp / "art" / "pacs" / dataset / "manifest.parquet")


@pytest.mark.realdata
def test_ingest_pulls_exactly_the_new_cr_dx_studies_once_and_without_phi(orthanc, realdata, tmp_path):
    """The 7 real DICOMs (6 CR/DX studies, 1 CT) and synthetic studies (3 DX, 1 CR, 1 MR) by
    STOW-RS: the manifest holds exactly the CR/DX instances; a second run adds nothing; a new DX
    study later adds exactly its 2 instances. No header PHI value of any uploaded file is in any
    file the ingest wrote, and burned-in text was blanked in every real radiograph."""
    from fracture_ops.deid.config import load_keys, DeidConfig

    _clear(orthanc)
    uploaded = _real(realdata) + _synthetic(tmp_path, 3) + _synthetic(tmp_path, 1, "CR", start=3) + \
        _synthetic(tmp_path, 1, "MR", start=4)
    _store(orthanc, uploaded)
    first = pacs_ingest_step(_cfg(tmp_path, "r1"), conn=_conn(orthanc))
    wanted = _wanted(uploaded)
    keys = load_keys(DeidConfig(artifact_root=str(tmp_path), allow_dev_secret=True))
    manifest = _manifest(tmp_path)
    assert sorted(manifest["image_id"]) == sorted(keys.image_id(d.SOPInstanceUID) for d in wanted)
    assert set(manifest["study_id"]) == {keys.uid(d.StudyInstanceUID) for d in wanted}
    assert first["studies_ingested"] == 6 + 4 and first["instances_written"] == len(wanted) == 6 + 8
    assert manifest["patient_id"].str.startswith("P").all() and manifest["label"].isna().all()
    real_ids = {keys.image_id(d.SOPInstanceUID) for d in _wanted(_real(realdata))}
    assert (manifest[manifest["image_id"].isin(real_ids)]["text_regions_blanked"] > 0).all()
    # nothing identifying anywhere the ingest wrote: images, parts, manifest, state, report
    phi = set().union(*(_phi_values(d) for d in uploaded)) | NAME_PARTS
    written = [p for p in (tmp_path / "art").rglob("*") if p.is_file()]
    assert len([p for p in written if p.suffix == ".dcm"]) == len(wanted)
    # the watermark is a real study date: raw zone only
    assert not [p for p in written if p.name == "state.json"]
    state = json.loads((tmp_path / "art-raw" / "pacs" / "pacs" / "state.json").read_text())
    assert state["watermark"] == max(d.StudyDate for d in wanted)
    for path in written:
        assert not _leaks(path.read_bytes(), phi), path.name
        assert not _leaks(str(path.relative_to(tmp_path)).encode(), phi)
    again = pacs_ingest_step(_cfg(tmp_path, "r2"), conn=_conn(orthanc))
    assert again["instances_written"] == 0 and again["studies_ingested"] == 0
    pd.testing.assert_frame_equal(_manifest(tmp_path), manifest)
    later = _synthetic(tmp_path, 1, "DX", start=7)
    _store(orthanc, later)
    third = pacs_ingest_step(_cfg(tmp_path, "r3"), conn=_conn(orthanc))
    assert third["instances_written"] == 2 and len(_manifest(tmp_path)) == len(manifest) + 2


def test_a_killed_run_resumes_to_the_same_manifest(orthanc, tmp_path):
    """SIGKILL of `fracture-ops pacs-ingest` after its first study, then a rerun: the manifest
    equals an uninterrupted run's (no duplicate, nothing missing), with one image file per row."""
    _clear(orthanc)
    uploaded = _synthetic(tmp_path, 6) + _synthetic(tmp_path, 2, "CR", start=6)
    _store(orthanc, uploaded)
    env = {**os.environ, **orthanc.env(), "FRACTURE_OPS_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "fracture_ops.cli", "pacs-ingest", "--artifact-root",
           str(tmp_path / "art"), "--allow-dev-secret", "--dataset", "killed"]
    proc = subprocess.Popen([*cmd, "--run-id", "k1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    parts = tmp_path / "art" / "pacs" / "killed" / "parts"
    deadline = time.monotonic() + 300
    while not (parts.is_dir() and any(parts.glob("*.parquet"))) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("*.parquet")))
    assert 1 <= done_before < 8
    assert not (tmp_path / "art" / "pacs" / "killed" / "manifest.parquet").exists()
    res = subprocess.run([*cmd, "--run-id", "k2"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # the task log names no original UID (dicomweb-client logs every request with them)
    originals = {str(getattr(d, k)) for d in uploaded for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                 "SOPInstanceUID")}
    assert not [u for u in originals if u in res.stderr + res.stdout]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["studies_already_ingested"] == done_before and summary["studies_ingested"] == 8 - done_before
    pacs_ingest_step(_cfg(tmp_path, "clean", dataset="clean"), conn=_conn(orthanc))
    killed, clean = _manifest(tmp_path, "killed"), _manifest(tmp_path, "clean")
    assert len(killed) == 16 and killed["image_id"].is_unique
    pd.testing.assert_frame_equal(killed.drop(columns="image_uri"), clean.drop(columns="image_uri"))
    images = sorted(p.stem for p in (tmp_path / "art" / "pacs" / "killed" / "images").glob("*.dcm"))
    assert images == sorted(killed["image_id"])


def test_pacs_down_mid_run_is_retried_and_the_run_completes(orthanc, tmp_path, caplog):
    """Orthanc stopped after the first study and started again 3 s later: the requests in
    between are retried with back-off, the run completes, nothing is duplicated."""
    _clear(orthanc)
    _store(orthanc, _synthetic(tmp_path, 5))
    parts = tmp_path / "art" / "pacs" / "outage" / "parts"
    events = []

    def outage():
        while not (parts.is_dir() and any(parts.glob("*.parquet"))):
            time.sleep(0.02)
        orthanc.stop()
        events.append("stopped")
        time.sleep(3)
        orthanc.start()
        events.append("started")

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    summary = pacs_ingest_step(_cfg(tmp_path, "o1", dataset="outage", retries=8), conn=_conn(orthanc, retries=8))
    t.join(timeout=60)
    assert events == ["stopped", "started"]
    retried = [r for r in caplog.records if r.name == "fracture_ops.pacs.dicomweb" and "failed" in r.getMessage()]
    assert retried, "the outage fell between requests: no request was retried"
    manifest = _manifest(tmp_path, "outage")
    assert summary["instances_written"] == len(manifest) == 10 and manifest["image_id"].is_unique


def test_pacs_down_for_good_fails_retryably_and_writes_no_watermark(orthanc, tmp_path):
    conn = PacsConnection(url="http://127.0.0.1:9/dicom-web", username="x", password="y",
                          name="site_pacs", retries=2, backoff_s=0.05)
    with pytest.raises(PacsUnavailable, match="site_pacs.*failed 3 times"):
        pacs_ingest_step(_cfg(tmp_path, "d1", dataset="down"), conn=conn)
    assert not (tmp_path / "art-raw" / "pacs" / "down" / "state.json").exists()


def test_wrong_password_names_the_connection(orthanc, tmp_path):
    env = {**os.environ, **orthanc.env(), "FRACTURE_OPS_PACS_PASSWORD": "wrong",
           "FRACTURE_OPS_PACS_CONNECTION": "radiology_pacs"}
    with pytest.raises(PacsAuthError, match="'radiology_pacs'.*401 unauthorised"):
        pacs_ingest_step(_cfg(tmp_path, "a1"), conn=PacsConnection.from_env(env))
    res = subprocess.run([sys.executable, "-m", "fracture_ops.cli", "pacs-ingest", "--artifact-root",
                          str(tmp_path / "art"), "--allow-dev-secret"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "radiology_pacs" in res.stderr and "401" in res.stderr
    assert "wrong" not in res.stderr  # never the password


def test_unreadable_instance_is_quarantined_and_the_rest_continues(orthanc, tmp_path):
    """A study whose one instance has pixel data cut short (the PACS stores it; it cannot be
    decoded): that instance is quarantined with its reason, its sibling and the other studies
    are ingested."""
    _clear(orthanc)
    good = _synthetic(tmp_path, 3)
    broken = good[0]
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]
    _store(orthanc, good)
    summary = pacs_ingest_step(_cfg(tmp_path, "q1", dataset="quarantine", max_bad_fraction=0.5),
                               conn=_conn(orthanc))
    assert summary["instances_written"] == 5 and summary["instances_quarantined"] == 1
    report = json.loads((tmp_path / "art" / "runs" / "q1" / "pacs_ingest" / "report.json").read_text())
    (bad,) = report["quarantined"]
    assert bad["reason"] and bad["image_id"].startswith("I")
    strict = pacs_ingest_step  # the same data past a stricter budget fails (exit 4)
    from fracture_ops.errors import ErrorBudgetExceeded

    with pytest.raises(ErrorBudgetExceeded):
        strict(_cfg(tmp_path, "q2", dataset="quarantine2", max_bad_fraction=0.1), conn=_conn(orthanc))
    # over the budget, the study with the refused instance is not recorded (a systemic fault is
    # fetched again once fixed); the two clean studies are
    assert len(list((tmp_path / "art" / "pacs" / "quarantine2" / "parts").glob("*.parquet"))) == 2
    state = json.loads((tmp_path / "art-raw" / "pacs" / "quarantine2" / "state.json").read_text())
    assert state["watermark"] <= broken.StudyDate


def test_capped_runs_catch_up_without_skipping(orthanc, tmp_path):
    """max_studies=2 over 5 studies: three runs ingest 2, 2, 1 and the watermark never passes a
    study not yet fetched."""
    _clear(orthanc)
    _store(orthanc, _synthetic(tmp_path, 5))
    got = [pacs_ingest_step(_cfg(tmp_path, f"c{i}", dataset="capped", max_studies=2), conn=_conn(orthanc))
           for i in range(3)]
    assert [g["studies_ingested"] for g in got] == [2, 2, 1] and got[0]["studies_left"] == 3
    assert len(_manifest(tmp_path, "capped")) == 10


def test_query_window():
    cfg = PacsIngestConfig(artifact_root="/tmp/x", lookback_days=3, since="20240101")
    assert query_start(cfg, {}) == "20240101"
    assert query_start(cfg, {"watermark": "20240310"}) == "20240307"
    with pytest.raises(ValueError):
        PacsIngestConfig(artifact_root="/tmp/x", since="2024-01-01")
    with pytest.raises(ValueError):
        PacsIngestConfig(artifact_root="/tmp/x", modalities=["C;R"])


def test_the_airflow_connection_fills_the_steps_environment(monkeypatch):
    """Under the local runner the pacs-ingest task takes the PACS from the Airflow connection
    fracture_ops_pacs (host as a whole URL, or host + schema + port + path); other steps get
    nothing from it."""
    from fracture_ops.orchestration.airflow_tasks import connection_env
    from fracture_ops.orchestration.specs import PACS_STEPS, TRAINING_STEPS
    from fracture_ops.pacs.dicomweb import env_from_connection

    monkeypatch.setenv("AIRFLOW_CONN_FRACTURE_OPS_PACS", json.dumps({
        "conn_type": "http", "host": "pacs.hospital.example", "schema": "https", "port": 8443,
        "login": "ingest", "password": "s3cret", "extra": {"path": "/wado/dicom-web/"}}))
    env = connection_env(PACS_STEPS["pacs_ingest"])
    assert env == {"FRACTURE_OPS_PACS_URL": "https://pacs.hospital.example:8443/wado/dicom-web",
                   "FRACTURE_OPS_PACS_USERNAME": "ingest", "FRACTURE_OPS_PACS_PASSWORD": "s3cret",
                   "FRACTURE_OPS_PACS_CONNECTION": "fracture_ops_pacs"}
    assert connection_env(TRAINING_STEPS["ingest"]) == {}
    conn = PacsConnection.from_env(env)
    assert "s3cret" not in repr(conn) and conn.name == "fracture_ops_pacs"
    assert env_from_connection("c", "http://orthanc:8042/dicom-web/")["FRACTURE_OPS_PACS_URL"] == \
        "http://orthanc:8042/dicom-web"
    with pytest.raises(Exception, match="no host"):
        env_from_connection("c", "")
    monkeypatch.delenv("AIRFLOW_CONN_FRACTURE_OPS_PACS")
    assert connection_env(PACS_STEPS["pacs_ingest"]) == {}
    with pytest.raises(Exception, match="FRACTURE_OPS_PACS_URL is not set"):
        PacsConnection.from_env({})


# ------------------------------------------------------------------ results back to the PACS

@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A registered champion, trained small (the inference tests' fixture)."""
    from tests.test_inference import registered_champion

    yield from registered_champion(tmp_path_factory)


def test_results_go_back_as_valid_sr_and_sc_under_the_original_study(orthanc, champion, tmp_path,
                                                                   capfd):
    """pacs-ingest then pacs-report: per radiograph, a Comprehensive SR (probability of the
    champion's own predict, decision, model version) and a Grad-CAM Secondary Capture reach the
    PACS under the original study and patient, pass dciodvfy, and a rerun sends nothing more."""
    import subprocess as sp

    import mlflow

    from fracture_ops.pacs.dicomweb import tag_value
    from fracture_ops.pacs.report import PacsReportConfig, pacs_report_step

    import logging
    import warnings

    _clear(orthanc)
    uploaded = _synthetic(tmp_path, 3)
    _store(orthanc, uploaded)
    # everything both steps say (log records at every level, Python warnings, stdout/stderr)
    # is kept and searched for the uploaded files' header values and UIDs below
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    before = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            pacs_ingest_step(_cfg(tmp_path, "i1", dataset="results"), conn=_conn(orthanc))
            cfg = PacsReportConfig(artifact_root=str(tmp_path / "art"), run_id="rep1",
                                   dataset="results")
            summary = pacs_report_step(cfg, conn=_conn(orthanc))
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(before)
    out = capfd.readouterr()
    said_text = "\n".join(records + [str(w.message) for w in said] + [out.out, out.err])
    phi_and_uids = set().union(*(_phi_values(d) for d in uploaded))
    assert not _leaks(said_text.encode("latin-1", "replace"), phi_and_uids)
    assert summary["model_version"] == champion["version"] and summary["studies_reported"] == 3
    assert summary["objects_sent"] == 2 * len(uploaded) and summary["images_skipped"] == 0
    client = _conn(orthanc).client()
    manifest = _manifest(tmp_path, "results")
    served = mlflow.pyfunc.load_model(f"models:/fracture-classifier/{champion['version']}")
    expected = served.predict(pd.DataFrame({"image": list(manifest["image_uri"])}))
    by_image = dict(zip(manifest["image_id"], expected["prob_fracture"]))
    links = pd.concat([pd.read_parquet(p) for p in (tmp_path / "art-raw" / "pacs" / "results" / "links").glob("*.parquet")])
    sop_to_image = dict(zip(links["sop_uid"], links["image_id"]))
    found_sr = 0
    for source in {d.StudyInstanceUID: d for d in uploaded}.values():  # one visit per study
        study = source.StudyInstanceUID
        results = client.search_for_instances(study_instance_uid=study, fields=["Modality", "SOPClassUID"])
        srs = [r for r in results if tag_value(r, "00080060") == "SR"]
        scs = [r for r in results if tag_value(r, "00080016") == "1.2.840.10008.5.1.4.1.1.7"]
        assert len(srs) == len(scs) == 2, study  # one of each per radiograph of the study
        for item in srs + scs:
            ds = client.retrieve_instance(study, tag_value(item, "0020000E"), tag_value(item, "00080018"))
            assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == study
            path = tmp_path / "result.dcm"
            ds.save_as(path, enforce_file_format=True)
            check = sp.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [x for x in (check.stdout + check.stderr).splitlines() if x.startswith("Error")]
            assert errors == [], errors
            if ds.Modality != "SR":
                assert "research" in ds.ImageComments and champion["version"] in ds.ImageComments
                continue
            items = {c.ConceptNameCodeSequence[0].CodeMeaning: c for c in ds.ContentSequence}
            assert items["Algorithm Version"].TextValue == champion["version"]
            assert "not for clinical use" in items["Comment"].TextValue
            ref = items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            prob = float(items["Probability of fracture"].MeasuredValueSequence[0].NumericValue)
            assert prob == pytest.approx(by_image[sop_to_image[ref]], abs=1e-6)
            found_sr += 1
    assert found_sr == len(uploaded)
    again = pacs_report_step(PacsReportConfig(artifact_root=str(tmp_path / "art"), run_id="rep2",
                                              dataset="results"), conn=_conn(orthanc))
    assert again["objects_sent"] == 0 and again["studies_already_reported"] == 3
    # the results sent back are not growth: the next ingest fetches and writes nothing
    third = pacs_ingest_step(_cfg(tmp_path, "i2", dataset="results"), conn=_conn(orthanc))
    assert third["studies_grown"] == 0 and third["instances_written"] == 0, third
    # the dataset store got PHI-free counts only: no SR/SC, no original UID, no name
    phi = set().union(*(_phi_values(d) for d in uploaded))
    for path in (tmp_path / "art").rglob("*"):
        if path.is_file() and "pacs_report" in path.parts:
            assert not _leaks(path.read_bytes(), phi), path


def test_date_window_and_body_part_filters(orthanc, tmp_path):
    """since=YYYYMMDD leaves older studies out; body_parts keeps only those series (the
    synthetic radiographs are HAND)."""
    _clear(orthanc)
    _store(orthanc, _synthetic(tmp_path, 4))  # study dates 2024-01-15 .. 2024-04-15
    recent = pacs_ingest_step(_cfg(tmp_path, "w1", dataset="window", since="20240301"), conn=_conn(orthanc))
    assert recent["studies_found"] == 2 and recent["instances_written"] == 4
    wrists = pacs_ingest_step(_cfg(tmp_path, "w2", dataset="wrists", body_parts=["WRIST"]), conn=_conn(orthanc))
    assert wrists["studies_ingested"] == 4 and wrists["instances_written"] == 0
    hands = pacs_ingest_step(_cfg(tmp_path, "w3", dataset="hands", body_parts=["hand"]), conn=_conn(orthanc))
    assert hands["instances_written"] == 8


def test_unreachable_pacs_exits_retryably(tmp_path):
    """The command's exit code tells Airflow to retry (1), not to give up (2, 3, 4)."""
    env = {**os.environ, "FRACTURE_OPS_PACS_URL": "http://127.0.0.1:9/dicom-web",
           "FRACTURE_OPS_PACS_USERNAME": "u", "FRACTURE_OPS_PACS_PASSWORD": "p"}
    res = subprocess.run([sys.executable, "-m", "fracture_ops.cli", "pacs-ingest", "--artifact-root",
                          str(tmp_path / "art"), "--allow-dev-secret", "--retries", "1", "--backoff-s", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "retry later" in res.stderr, res.stderr[-1000:]



def test_late_instances_are_fetched(orthanc, tmp_path):
    """A study that gains an instance after it was ingested (the modality still sending) is
    fetched again: the manifest then holds both, once each."""
    _clear(orthanc)
    first, second = _synthetic(tmp_path, 1)
    _store(orthanc, [first])
    pacs_ingest_step(_cfg(tmp_path, "l1", dataset="late"), conn=_conn(orthanc))
    assert len(_manifest(tmp_path, "late")) == 1
    _store(orthanc, [second])
    again = pacs_ingest_step(_cfg(tmp_path, "l2", dataset="late"), conn=_conn(orthanc))
    assert again["studies_grown"] == 1 and again["instances_written"] == 2
    manifest = _manifest(tmp_path, "late")
    assert len(manifest) == 2 and manifest["image_id"].is_unique
    assert pacs_ingest_step(_cfg(tmp_path, "l3", dataset="late"), conn=_conn(orthanc))["instances_written"] == 0


def test_watermark_rules():
    """Only real dates up to tomorrow move it; never past a study to fetch again; never
    backwards; not at all when the listing may be incomplete."""
    from datetime import date

    from fracture_ops.pacs.ingest import next_watermark

    today = date(2026, 12, 5)
    assert next_watermark(None, ["20261201", "20261130"], [], today=today) == "20261201"
    assert next_watermark("20261120", ["20991231", "20240231", ""], [], today=today) == "20261120"
    assert next_watermark("20261120", ["20261201"], ["20261125"], today=today) == "20261125"
    assert next_watermark("20261120", ["20261201"], ["20261110"], today=today) == "20261120"
    assert next_watermark("20261120", ["20261201"], [], complete=False, today=today) == "20261120"
    assert next_watermark(None, [], [], today=today) is None


def test_report_refuses_a_partial_store_and_non_binary_models(monkeypatch, tmp_path):
    """A STOW-RS answer listing refused objects fails the study (nothing recorded as sent, so it
    is sent again next run); a multi-class model is refused before anything is sent."""
    from types import SimpleNamespace

    from fracture_ops.pacs import report
    from fracture_ops.pacs.dicom_results import ImageResult
    from fracture_ops.pacs.dicomweb import PacsRequestError

    source = _synthetic(tmp_path, 1, instances=1)[0]
    answer = pydicom.Dataset()
    answer.FailedSOPSequence = [pydicom.Dataset()]
    reporter = report.Reporter.__new__(report.Reporter)
    reporter.conn = PacsConnection(url="http://pacs.invalid/dicom-web", retries=0)
    reporter.client = SimpleNamespace(retrieve_instance=lambda *a: source, store_instances=lambda objs: answer)
    reporter.explainer = None
    result = ImageResult(0.9, True, 0.5, "fracture", "fracture-classifier", "3")
    monkeypatch.setattr(reporter, "results", lambda rows: [({"image_id": "I1", "image_uri": "x"}, result, None)],
                        raising=False)
    link = {"I1": (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)}
    with pytest.raises(PacsRequestError, match="refused 1 of 1"):
        reporter.study(pd.DataFrame(), link)
    answer.FailedSOPSequence = []
    sent, skipped = reporter.study(pd.DataFrame(), link)
    assert list(sent) == ["I1"] and skipped == []

    class Multiclass:
        task, class_names = "multiclass", ["normal", "fracture"]

    monkeypatch.setattr("fracture_ops.registry.client.resolve_model",
                        lambda uri: SimpleNamespace(name="m", version="1", uri="models:/m/1"))
    monkeypatch.setattr("mlflow.artifacts.download_artifacts", lambda artifact_uri: "/nowhere")
    monkeypatch.setattr("fracture_ops.model.pyfunc.load_classifier_dir", lambda d: Multiclass())
    with pytest.raises(Exception, match="binary fracture models only"):
        report.Reporter(report.PacsReportConfig(artifact_root="/tmp/x"), reporter.conn)


def test_a_url_that_is_not_a_dicomweb_root_exits_2_naming_it(orthanc, tmp_path):
    """The server's root without its DICOMweb path (Orthanc: /dicom-web) answers the study
    search with 400/404: exit 2 (a setting to fix, not retried), naming the URL and the usual
    suffix."""
    root = orthanc.env()["FRACTURE_OPS_PACS_URL"].removesuffix("/dicom-web")
    env = {**os.environ, **orthanc.env(), "FRACTURE_OPS_PACS_URL": root}
    res = subprocess.run([sys.executable, "-m", "fracture_ops.cli", "pacs-ingest", "--artifact-root",
                          str(tmp_path / "art"), "--allow-dev-secret", "--retries", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-1500:]
    assert root in res.stderr and "/dicom-web" in res.stderr and "does not look like" in res.stderr
    # the failed run leaves its config and a report that says why
    reports = list((tmp_path / "art").rglob("pacs_ingest/report.json"))
    assert len(reports) == 1 and (reports[0].parent / "config.resolved.yaml").exists()
    report = json.loads(reports[0].read_text())
    assert report["run_failed"] and report["error"] == "PacsUrlError" and root in report["reason"]


def test_report_without_a_champion_exits_2_naming_what_to_do(tmp_path):
    """Right after `make demo` there is no champion: a setting to change (exit 2) that names
    --model-uri and the promote command, not 'bad input data'."""
    art = tmp_path / "art"
    (art / "pacs" / "pacs").mkdir(parents=True)
    pd.DataFrame({"image_id": ["I1"], "study_id": ["S1"], "image_uri": ["x.dcm"]}).to_parquet(
        art / "pacs" / "pacs" / "manifest.parquet")
    env = {**os.environ, "FRACTURE_OPS_PACS_URL": "http://127.0.0.1:9/dicom-web",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    res = subprocess.run([sys.executable, "-m", "fracture_ops.cli", "pacs-report", "--artifact-root",
                          str(art), "--retries", "0"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-1500:]
    assert "--model-uri" in res.stderr and "registry promote" in res.stderr


def test_make_pacs_starts_orthanc_alone_and_pacs_down_stops_it(tmp_path):
    """`make pacs` starts the bundled Orthanc alone and prints its URL and credentials file; its
    usual port taken (Debian's orthanc.service, here a socket of ours) moves it to free ports
    and says so; a QIDO-RS search with the printed account answers; `make pacs-down` leaves
    nothing running."""
    import re
    import socket

    import requests

    why = orthanc_local.missing()
    if why:
        pytest.skip(why)
    repo = Path(__file__).resolve().parents[1]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    env = {**os.environ, "FRACTURE_OPS_STACK_DIR": str(tmp_path / "stack"),
           "ORTHANC_PORT": str(taken), "ORTHANC_DICOM_PORT": str(orthanc_local.free_port())}
    try:
        res = subprocess.run(["make", "-s", "pacs"], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"port(s) {taken} already in use" in res.stdout
        url = re.search(r"DICOMweb (\S+),", res.stdout).group(1)
        creds = json.loads(Path(re.search(r"password in (\S+)\)", res.stdout).group(1)).read_text())
        assert f":{taken}/" not in url
        answer = requests.get(f"{url}/studies", auth=(creds["username"], creds["password"]),
                              headers={"Accept": "application/dicom+json"}, timeout=30)
        assert answer.status_code in (200, 204)
        again = subprocess.run(["make", "-s", "pacs"], cwd=repo, env=env, capture_output=True,
                               text=True, timeout=300)  # idempotent: the same server
        assert again.returncode == 0 and url in again.stdout
        pid = int((tmp_path / "stack" / "orthanc.pid").read_text())
    finally:
        down = subprocess.run(["make", "-s", "pacs-down"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)
        busy.close()
    assert down.returncode == 0 and "stopped the PACS" in down.stdout
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/studies", timeout=5)


def test_backfill_fetches_an_old_study_the_watermark_passed_exactly_once(orthanc, tmp_path):
    """A study dated a year before the watermark, stored after a run: the lookback window does
    not reach it, `--backfill FROM TO` does, once (a second backfill fetches nothing, and an
    instance added to that old study later is fetched exactly once); the watermark stays."""
    _clear(orthanc)
    _store(orthanc, _synthetic(tmp_path, 2))  # study dates 2024-01-15, 2024-02-15
    pacs_ingest_step(_cfg(tmp_path, "b1", dataset="back"), conn=_conn(orthanc))
    state = tmp_path / "art-raw" / "pacs" / "back" / "state.json"
    mark = json.loads(state.read_text())["watermark"]
    old, late = _synthetic(tmp_path / "old", 1, start=50)
    for ds in (old, late):
        ds.StudyDate = "20230210"
    _store(orthanc, [old])
    assert pacs_ingest_step(_cfg(tmp_path, "b2", dataset="back"),
                            conn=_conn(orthanc))["instances_written"] == 0  # outside the window
    res = subprocess.run(
        [sys.executable, "-m", "fracture_ops.cli", "pacs-ingest", "--artifact-root",
         str(tmp_path / "art"), "--allow-dev-secret", "--dataset", "back", "--backfill",
         "20230101", "20231231", "--run-id", "b3"],
        env={**os.environ, **orthanc.env()}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-1500:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["instances_written"] == 1
    again = pacs_ingest_step(_cfg(tmp_path, "b4", dataset="back", backfill=["20230101", "20231231"]),
                             conn=_conn(orthanc))
    assert again["instances_written"] == 0
    _store(orthanc, [late])  # one more instance of the old study
    grown = pacs_ingest_step(_cfg(tmp_path, "b5", dataset="back", backfill=["20230101", "20231231"]),
                             conn=_conn(orthanc))
    assert grown["studies_grown"] == 1 and grown["instances_written"] == 2
    manifest = _manifest(tmp_path, "back")
    assert len(manifest) == 2 * 2 + 2 and manifest["image_id"].is_unique
    assert json.loads(state.read_text())["watermark"] == mark  # backfill never moves it
    with pytest.raises(Exception, match="after TO"):
        _cfg(tmp_path, "b6", dataset="back", backfill=["20231231", "20230101"])


def test_a_record_from_before_the_wanted_series_rule_still_detects_growth(orthanc, tmp_path):
    """Datasets ingested before growth was counted over the wanted series hold study-level
    counts (other modalities and results included): past that count the study is fetched once
    more and recorded anew; then nothing."""
    _clear(orthanc)
    first, second = _synthetic(tmp_path, 1)
    _store(orthanc, [first])
    pacs_ingest_step(_cfg(tmp_path, "g1", dataset="legacy"), conn=_conn(orthanc))
    (record,) = (tmp_path / "art" / "pacs" / "legacy" / "parts").glob("*.json")
    record.write_text(json.dumps({"instances": 1}))  # the old format: no "counted"
    _store(orthanc, [second])
    again = pacs_ingest_step(_cfg(tmp_path, "g2", dataset="legacy"), conn=_conn(orthanc))
    assert again["studies_grown"] == 1 and again["instances_written"] == 2
    assert json.loads(record.read_text()) == {"instances": 2, "counted": "wanted_series"}
    assert pacs_ingest_step(_cfg(tmp_path, "g3", dataset="legacy"),
                            conn=_conn(orthanc))["instances_written"] == 0


def test_a_study_with_cr_and_dx_series_leaves_the_listing_complete(orthanc, tmp_path):
    """One study found by both the CR and the DX search is not mistaken for a PACS that ignores
    paging: the listing is complete and the watermark moves."""
    _clear(orthanc)
    dx, other = _synthetic(tmp_path, 1)
    other.Modality = "CR"
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    _store(orthanc, [dx, other])
    run = pacs_ingest_step(_cfg(tmp_path, "m1", dataset="mixed"), conn=_conn(orthanc))
    assert run["listing_complete"] and run["watermark_moved"] and run["instances_written"] == 2


def test_only_the_first_search_of_a_run_can_blame_the_url(monkeypatch):
    """A 404 on a later page or modality (a proxy hiccup, a PACS's paging cap) is a refused
    request, not 'this is not a DICOMweb root'."""
    import requests

    from fracture_ops.pacs.dicomweb import PacsRequestError, PacsUrlError

    conn = PacsConnection(url="http://pacs.invalid/dicom-web", retries=0)

    def not_found():
        response = requests.Response()
        response.status_code = 404
        raise requests.HTTPError(response=response)

    with pytest.raises(PacsUrlError, match="pacs.invalid/dicom-web.*does not look like"):
        conn.call("QIDO-RS first study search (CR)", not_found)
    with pytest.raises(PacsRequestError) as later:
        conn.call("QIDO-RS study search (DX)", not_found)
    assert not isinstance(later.value, PacsUrlError)


def test_each_failed_attempt_reports_its_own_error(tmp_path):
    """A retry (same run id) replaces the previous attempt's failure; an attempt that wrote its
    detailed report (an exceeded error budget) keeps it and adds its error."""
    from fracture_ops.errors import ErrorBudgetExceeded
    from fracture_ops.pacs.dicomweb import PacsAuthError, PacsUnavailable
    from fracture_ops.pacs.ingest import STEP, report_failure

    cfg = _cfg(tmp_path, "same")
    uri = Path(cfg.output_dir(STEP)) / "report.json"
    report_failure(cfg, PacsUnavailable("down"), "a1")
    report_failure(cfg, PacsAuthError("401 on the account"), "a2")
    report = json.loads(uri.read_text())
    assert report["error"] == "PacsAuthError" and report["attempt"] == "a2"
    uri.write_text(json.dumps({"run_id": "same", "attempt": "a3", "run_failed": True,
                               "instances_quarantined": 5}))
    report_failure(cfg, ErrorBudgetExceeded("5 of 6 quarantined"), "a3")
    report = json.loads(uri.read_text())
    assert report["instances_quarantined"] == 5 and report["error"] == "ErrorBudgetExceeded"
    assert report["reason"] == "5 of 6 quarantined"
    report_failure(cfg, KeyError("1.2.840.99999.1 PATIENT^NAME"), "a4")
    assert json.loads(uri.read_text())["reason"] == "KeyError"  # never a foreign message


def test_a_bad_deidentify_section_leaves_a_failure_report(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("pacs_ingest:\n  dataset: pacs\ndeidentify:\n  bogus: 1\n")
    res = subprocess.run([sys.executable, "-m", "fracture_ops.cli", "pacs-ingest", "--artifact-root",
                          str(tmp_path / "art"), "--run-id", "bad", "--config", str(config)],
                         env={**os.environ, "FRACTURE_OPS_PACS_URL": "http://127.0.0.1:9/dicom-web"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-1000:]
    (report,) = (tmp_path / "art").rglob("pacs_ingest/report.json")
    assert json.loads(report.read_text())["run_failed"]
    assert (report.parent / "config.resolved.yaml").exists()


def test_pacs_down_never_signals_a_process_that_reused_a_stale_pid(tmp_path):
    """The pid file outlived Orthanc and the pid now belongs to something else: `pacs-down`
    leaves it alone and says no PACS was running; `make pacs` would start a new one."""
    import signal

    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "stack").mkdir()
        (tmp_path / "stack" / "orthanc.pid").write_text(str(stranger.pid))
        env = {**os.environ, "FRACTURE_OPS_STACK_DIR": str(tmp_path / "stack")}
        res = subprocess.run([sys.executable, "-m", "fracture_ops.orchestration.devstack",
                              "pacs-down"], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "no PACS was running" in res.stdout
        assert stranger.poll() is None  # still running
        assert not (tmp_path / "stack" / "orthanc.pid").exists()
    finally:
        os.killpg(stranger.pid, signal.SIGKILL)
        stranger.wait()


def test_held_instances_wait_outside_the_dataset_until_deid_review_releases_them(orthanc, tmp_path):
    """Instances with letters in the body that no engine reads are held by pacs-ingest (not in
    the manifest, kept under held/ with the row they would have had); `deid review DATASET
    --approve` releases exactly the approved one into images/, its study's part and the
    manifest (bound to the reviewed bytes; its link to the original UIDs already in the raw
    zone), `--reject` marks the other rejected, and the next run fetches nothing again."""
    import hashlib

    import fracture_ops.deid.pixels as pixels
    from fracture_ops.cli import main as cli_main
    from fracture_ops.data.synthetic_dicom import fake_patient, write_phi_dicom
    from fracture_ops.deid.config import DeidConfig, load_keys
    from tests.test_deid_review import _film

    _clear(orthanc)
    datasets = []
    for k, body_text in enumerate([True, False, True]):  # studies A (held + clean), B (held)
        study, inst = (0, k) if k < 2 else (1, 0)
        film = np.asarray(Image.open(io.BytesIO(_film(k, body_text)))).astype(np.uint16) * 16
        phi = fake_patient(np.random.default_rng(300 + study))
        path = tmp_path / f"held-{k}.dcm"
        write_phi_dicom(path, film, seed=700 + study * 10 + inst, modality="DX",
                        patient_name=phi["patient_name"], patient_id=phi["patient_id"],
                        birth_date=phi["birth_date"], study_date="20240610",
                        accession=phi["accession"], institution=phi["institution"])
        datasets.append(pydicom.dcmread(path))
    _store(orthanc, datasets)
    keys = load_keys(DeidConfig(artifact_root=str(tmp_path), allow_dev_secret=True))
    ids = [keys.image_id(d.SOPInstanceUID) for d in datasets]
    assert datasets[0].StudyInstanceUID == datasets[1].StudyInstanceUID != datasets[2].StudyInstanceUID
    with pytest.MonkeyPatch.context() as mp:  # the recogniser never reads the body's letters
        real_reads = pixels._reads_as_text
        mp.setattr(pixels, "_reads_as_text", lambda box, text, *a: real_reads(box, text, *a)
                   and "W" not in text.upper() and "K" not in text.upper())
        summary = pacs_ingest_step(_cfg(tmp_path, "h1", dataset="held", max_bad_fraction=0.9),
                                   conn=_conn(orthanc))
    root = tmp_path / "art" / "pacs" / "held"
    assert summary["instances_written"] == 1 and summary["instances_quarantined"] == 2
    assert list(_manifest(tmp_path, "held")["image_id"]) == [ids[1]]
    held_bytes = (root / "held" / f"{ids[0]}.dcm").read_bytes()
    assert (root / "held" / f"{ids[2]}.dcm").exists() and not (root / "images" / f"{ids[0]}.dcm").exists()
    links = pd.concat(pd.read_parquet(p) for p in (tmp_path / "art-raw" / "pacs" / "held" / "links").glob("*.parquet"))
    assert set(links["image_id"]) == set(ids)  # held ones linked too, for their results later
    gallery = (tmp_path / "art" / "runs" / "h1" / "pacs_ingest" / "gallery.html").read_text()
    assert f"fracture-ops deid review {root} --approve {ids[0][:16]}" in gallery

    # a held instance whose bytes changed is refused
    tampered = root / "held" / f"{ids[2]}.dcm"
    original = tampered.read_bytes()
    tampered.write_bytes(original + b"\0")
    assert cli_main(["deid", "review", str(root), "--approve", ids[2][:12]]) == 3
    tampered.write_bytes(original)
    # so is a held record edited to name another file (a path out of the data set)
    record = root / "held" / f"{ids[2]}.json"
    kept = record.read_text()
    record.write_text(kept.replace(f'"held/{ids[2]}.dcm"', '"held/../../../outside.dcm"'))
    assert cli_main(["deid", "review", str(root), "--reject", ids[2][:12]]) == 3
    assert cli_main(["deid", "review", str(root), "--list"]) == 3 and tampered.exists()
    record.write_text(kept)

    # one refused id stops the whole batch before anything moves (the other stays held)
    tampered.write_bytes(original + b"\0")
    assert cli_main(["deid", "review", str(root), "--approve", ids[0][:12], ids[2][:12]]) == 3
    assert (root / "held" / f"{ids[0]}.dcm").exists() and not (root / "images" / f"{ids[0]}.dcm").exists()
    assert not (root / "review.jsonl").exists()
    tampered.write_bytes(original)

    with pytest.MonkeyPatch.context() as mp:  # a relative OUTPUT: the row keeps the data set's form
        mp.chdir(root.parent)
        assert cli_main(["deid", "review", "held", "--approve", ids[0][:12], "--reject",
                         ids[2][:12], "--reviewer", "privacy-officer"]) == 0
    assert cli_main(["deid", "review", str(root), "--approve", ids[0][:12]]) == 0  # the same: no-op
    assert cli_main(["deid", "review", str(root), "--reject", ids[0][:12]]) == 3  # final
    manifest = _manifest(tmp_path, "held")
    assert sorted(manifest["image_id"]) == sorted(ids[:2])
    released = manifest.set_index("image_id").loc[ids[0]]
    assert released["image_uri"] == str(root / "images" / f"{ids[0]}.dcm") and released["view"]
    assert manifest.set_index("image_id").loc[ids[1]]["image_uri"] == str(root / "images" / f"{ids[1]}.dcm")
    assert released["patient_id"] == manifest.set_index("image_id").loc[ids[1]]["patient_id"]
    assert (root / "images" / f"{ids[0]}.dcm").read_bytes() == held_bytes
    assert not (root / "held" / f"{ids[0]}.dcm").exists() and not tampered.exists()
    quarantine = [x for p in (root / "quarantine").glob("*.json") for x in json.loads(p.read_text())]
    assert [(x["image_id"], x["reason"]) for x in quarantine] == [(ids[2], "rejected in review")]
    sign_off = [json.loads(x) for x in (root / "review.jsonl").read_text().splitlines()]
    assert [(x["input"], x["decision"], x["reviewer"]) for x in sign_off] == [
        (ids[0], "approved", "privacy-officer"), (ids[2], "rejected", "privacy-officer")]
    assert sign_off[0]["sha256"] == hashlib.sha256(held_bytes).hexdigest()
    assert cli_main(["deid", "review", str(root), "--list"]) == 0
    again = pacs_ingest_step(_cfg(tmp_path, "h2", dataset="held"), conn=_conn(orthanc))
    assert again["studies_ingested"] == 0 and sorted(_manifest(tmp_path, "held")["image_id"]) == sorted(ids[:2])
    # study A grows: fetched again, the person's decisions stand (approved: released, not held
    # again; rejected B untouched), the new instance joins
    late = tmp_path / "held-late.dcm"
    phi = fake_patient(np.random.default_rng(300))
    film = np.asarray(Image.open(io.BytesIO(_film(5, False)))).astype(np.uint16) * 16
    write_phi_dicom(late, film, seed=705, modality="DX", patient_name=phi["patient_name"],
                    patient_id=phi["patient_id"], birth_date=phi["birth_date"],
                    study_date="20240610", accession=phi["accession"], institution=phi["institution"])
    extra = pydicom.dcmread(late)
    extra.StudyInstanceUID = datasets[0].StudyInstanceUID
    _store(orthanc, [extra])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pixels, "_reads_as_text", lambda box, text, *a: real_reads(box, text, *a)
                   and "W" not in text.upper() and "K" not in text.upper())
        grown = pacs_ingest_step(_cfg(tmp_path, "h3", dataset="held", max_bad_fraction=0.9),
                                 conn=_conn(orthanc))
    assert grown["studies_grown"] == 1 and grown["instances_quarantined"] == 0
    new_id = keys.image_id(extra.SOPInstanceUID)
    assert sorted(_manifest(tmp_path, "held")["image_id"]) == sorted([*ids[:2], new_id])
    assert json.loads((root / "held" / f"{ids[0]}.json").read_text())["status"] == "deidentified"
    assert not (root / "held" / f"{ids[0]}.dcm").exists()
    assert not list((root / "quarantine").glob(f"{keys.uid(datasets[0].StudyInstanceUID)}.json"))
