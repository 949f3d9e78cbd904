"""Batch inference into the prediction log, and the drift reference table.

One small champion is trained once per module (synthetic 64 px, test_resnet, 1 epoch): the
tests are about plumbing (every image scored once, de-identification, idempotent partitions,
recorded versions), not accuracy. A second registered version exists so "latest" != champion.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fracture_ops import storage
from fracture_ops.errors import BadInputError, ConfigError, ErrorBudgetExceeded
from fracture_ops.model import prediction_log as layout

SECRET = "inference-test-secret-0123456789abcdef"
MODEL = "fracture-classifier"
DATE = "2026-11-20"
ID_RE = re.compile(r"^I[0-9a-f]{16}$")
FRACATLAS_TRUNCATED = ("IMG0004084", "IMG0004189", "IMG0004255", "IMG0004278")


def _keys():
    from fracture_ops.deid.profile import DeidKeys

    return DeidKeys(SECRET.encode())


def _expected_id(path: Path) -> str:
    return _keys().image_id(path.resolve().as_posix())


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """synth (30 % DICOM with fake PHI) -> split -> train -> calibrate -> tune -> evaluate ->
    package -> register (v1, champion) + a second version v2 of the same model."""
    yield from registered_champion(tmp_path_factory)


def registered_champion(tmp_path_factory):
    """The ``champion`` fixture's work (a generator: set up, yield, restore the environment);
    other test modules build their own from it."""
    import mlflow

    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.synthetic import SynthConfig, synth_step
    from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
    from fracture_ops.evaluation.evaluate import EvaluateConfig, evaluate_step
    from fracture_ops.evaluation.thresholds import TuneThresholdsConfig, tune_thresholds_step
    from fracture_ops.registry.register import RegisterConfig, register_step
    from fracture_ops.training.package import PackageConfig, package_step
    from fracture_ops.training.train import TrainConfig, train_step

    tmp = tmp_path_factory.mktemp("inference")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "FRACTURE_OPS_DEID_SECRET")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["FRACTURE_OPS_DEID_SECRET"] = SECRET
    root = dict(artifact_root=str(tmp / "art"), run_id="train")
    synth_step(SynthConfig(out_dir=str(tmp / "syn"), n_patients=40, image_size=64, seed=0,
                           dicom_fraction=0.3))
    split = split_step(SplitConfig(manifest_uri=str(tmp / "syn" / "manifest.parquet"), **root))
    train = train_step(TrainConfig(split_uri=split["split_uri"], backbone="test_resnet",
                                   image_size=64, epochs=1, batch_size=16, **root))
    cal = calibrate_step(CalibrateConfig(predictions_uri=train["train_dir"], **root))
    th = tune_thresholds_step(TuneThresholdsConfig(predictions_uri=train["train_dir"],
                                                   calibration_uri=cal["calibration_uri"], **root))
    evaluate_step(EvaluateConfig(predictions_uri=train["train_dir"], n_bootstrap=20,
                                 calibration_uri=cal["calibration_uri"],
                                 thresholds_uri=th["thresholds_uri"], **root))
    pkg = package_step(PackageConfig(**root))
    reg = register_step(RegisterConfig(**root))
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(MODEL, "champion", reg["version"])
    latest = mlflow.register_model(pkg["model_uri"], MODEL).version  # newer, not the champion
    yield dict(tmp=tmp, art=tmp / "art", syn=tmp / "syn", split_uri=split["split_uri"],
               version=str(reg["version"]), latest=str(latest),
               threshold=storage.read_json(th["thresholds_uri"])["thresholds"]["fracture"])
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _phi_of(path: Path) -> dict:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {"name": str(ds.PatientName), "id": str(ds.PatientID)}


@pytest.fixture(scope="module")
def incoming(champion):
    """The synthetic images named like a careless export (patient names in DICOM file names),
    plus two broken files and one non-image."""
    folder = champion["tmp"] / "incoming"
    sub = folder / "site A"
    sub.mkdir(parents=True)
    phi = []
    for src in sorted((champion["syn"] / "images").iterdir()):
        if src.suffix == ".dcm":
            p = _phi_of(src)
            phi.append(p)
            name = f"{p['name'].replace('^', '_')}_{p['id']}_{src.stem[-2:]}.dcm"
            shutil.copy(src, sub / name)
        else:
            shutil.copy(src, folder / src.name)
    (folder / "SMITHERSON_ANNABELLE_broken.png").write_text("not an image")
    (sub / "empty_WOLFENDEN.dcm").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored")
    return dict(folder=folder, phi=phi, good=82 - 2, bad=2,
                names=["SMITHERSON", "ANNABELLE", "WOLFENDEN"])


def _infer(champion, incoming_uri, run_id, date=DATE, **kw):
    from fracture_ops.inference.infer import InferConfig, infer_step

    kw.setdefault("batch_size", 16)
    cfg = InferConfig(artifact_root=str(champion["art"]), run_id=run_id,
                      incoming_uri=str(incoming_uri), date=date, **kw)
    return infer_step(cfg)


@pytest.fixture(scope="module")
def first_run(champion, incoming):
    summary = _infer(champion, incoming["folder"], "infer1")
    return dict(summary=summary, rows=pd.read_parquet(summary["part_uri"]))


def test_every_input_scored_or_quarantined_once(champion, incoming, first_run):
    s, rows = first_run["summary"], first_run["rows"]
    assert s["inputs"] == 82 and s["rows"] == 80 and s["quarantined"] == 2
    assert s["rows"] + s["quarantined"] == s["inputs"]
    assert len(rows) == 80 and rows["image_id"].is_unique
    images = [p for p in incoming["folder"].rglob("*") if p.suffix in (".png", ".dcm")]
    good = {_expected_id(p) for p in images if p.stat().st_size > 100}
    assert set(rows["image_id"]) == good  # the keyed hash of each scored file, nothing else
    quarantine = pd.read_parquet(s["quarantine_uri"])
    assert sorted(quarantine["source_suffix"]) == [".dcm", ".png"]
    assert set(quarantine["image_id"]) == {_expected_id(p) for p in images} - good
    assert "empty file" in set(quarantine["reason"])
    assert sorted(q["image_id"] for q in s["quarantine"]) == sorted(quarantine["image_id"])


def test_rows_record_champion_version_date_and_batch(champion, first_run):
    s, rows = first_run["summary"], first_run["rows"]
    assert champion["latest"] != champion["version"]
    assert s["model_version"] == champion["version"]
    assert set(rows["model_version"]) == {champion["version"]} and set(rows["model_name"]) == {MODEL}
    assert set(rows["scored_date"]) == {DATE} and set(rows["batch_id"]) == {s["batch_id"]}
    expected = champion["art"] / "prediction_log" / f"date={DATE}" / f"part-{s['batch_id']}.parquet"
    assert Path(s["part_uri"]) == expected
    assert list(rows.columns) == layout.log_columns(["fracture"])
    assert rows["label"].isna().all()
    assert rows["prob_fracture"].between(0, 1).all()
    assert (rows["decision_fracture"] == (rows["prob_fracture"] >= champion["threshold"])).all()
    assert storage.is_complete(s["output_dir"])


def test_features_finite_and_match_the_files(first_run):
    rows = first_run["rows"]
    numeric = rows[layout.NUMERIC_FEATURES].to_numpy(float)
    assert np.isfinite(numeric).all()
    assert (rows["feat_height"] == 64).all() and (rows["feat_width"] == 64).all()
    assert np.allclose(rows["feat_aspect"], 1.0)
    assert (rows["feat_p01"] <= rows["feat_mean"]).all() and (rows["feat_mean"] <= rows["feat_p99"]).all()
    assert (rows["feat_std"] > 0).all() and (rows["feat_emb_norm"] > 0).all()
    dicom, png = rows[rows["source_format"] == "dicom"], rows[rows["source_format"] == "png"]
    assert len(dicom) + len(png) == len(rows) and len(dicom) > 0 and len(png) > 0
    assert set(png["feat_bit_depth"]) == {8} and set(dicom["feat_bit_depth"]) == {12}
    # write_phi_dicom writes ViewPosition PA, ImageLaterality L, BodyPartExamined HAND
    assert set(zip(dicom["view"], dicom["laterality"], dicom["body_region"])) == {("PA", "L", "hand")}
    assert set(zip(png["view"], png["laterality"], png["body_region"])) == {("UNKNOWN", "U", "unknown")}


def test_probabilities_equal_the_served_pyfunc_model(champion, incoming, first_run):
    import mlflow

    files = sorted(p for p in incoming["folder"].rglob("*") if p.suffix in (".png", ".dcm")
                   and p.stat().st_size > 100)[::10]
    assert any(p.suffix == ".dcm" for p in files) and any(p.suffix == ".png" for p in files)
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}/{champion['version']}").predict(
        pd.DataFrame({"image": [str(p) for p in files]}))
    logged = first_run["rows"].set_index("image_id").loc[[_expected_id(p) for p in files]]
    np.testing.assert_allclose(logged["prob_fracture"], served["prob_fracture"], atol=1e-5)
    assert (logged["decision_fracture"].to_numpy() == served["decision_fracture"].to_numpy()).all()


def test_rerun_replaces_its_part_and_new_inputs_add_one(champion, incoming, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(incoming["folder"], folder)
    date = "2026-11-21"
    first = _infer(champion, folder, "rerun", date=date)
    part = Path(first["part_uri"])
    before = (part.stat().st_ino, len(pd.read_parquet(part)))
    again = _infer(champion, folder, "rerun", date=date)
    assert again["batch_id"] == first["batch_id"] and again["part_uri"] == first["part_uri"]
    assert part.stat().st_ino != before[0]  # the file was replaced, not appended to
    partition = layout.partition_uri(layout.prediction_log_root(str(champion["art"])), date)
    assert layout.list_parts(partition) == [str(part)]
    assert len(pd.read_parquet(part)) == before[1] == 80
    # one new study arrives in the same folder: a new batch that scores only the new file
    shutil.copy(next(folder.glob("syn*.png")), folder / "new_study.png")
    third = _infer(champion, folder, "rerun2", date=date)
    assert third["batch_id"] != first["batch_id"]
    assert third["already_scored"] == 80 and third["rows"] == 1
    assert third["already_quarantined"] == 2 and third["quarantined"] == 0  # reported once
    assert len(layout.list_parts(partition)) == 2
    table = pd.concat(pd.read_parquet(p) for p in layout.list_parts(partition))
    assert len(table) == 81 and table["image_id"].is_unique
    # readers of the whole log see prediction rows only (side files start with "_")
    import pyarrow as pa
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(champion["art"] / "prediction_log"), format="parquet",
                         partitioning=ds.partitioning(pa.schema([("date", pa.string())]),
                                                      flavor="hive"))
    day = dataset.to_table(filter=ds.field("date") == date).to_pandas()
    assert len(day) == 81


def _written_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if p.is_file()]


def test_dicom_is_deidentified_and_no_phi_is_written(champion, incoming, first_run, tmp_path, caplog,
                                                     monkeypatch):
    import logging

    import pydicom

    from fracture_ops.inference import score

    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "dicom_only"
    dcms = sorted((incoming["folder"] / "site A").glob("*_*_*.dcm"))[:6]
    folder.mkdir()
    for p in dcms:
        shutil.copy(p, folder / p.name)
    decoded, real_decode = [], score._decode

    def spy(data, fmt, max_side=None):  # what the decoder (so the model and features) receives
        decoded.append(data)
        return real_decode(data, fmt, max_side)

    monkeypatch.setattr(score, "_decode", spy)
    summary = _infer(champion, folder, "phi", date="2026-11-22", cam_positives=True)
    assert len(decoded) == 6
    for data in decoded:
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.PatientIdentityRemoved == "YES" and str(ds.PatientName).startswith("P")
        assert not [p for p in incoming["phi"] if p["id"].encode() in data
                    or p["name"].encode() in data]
    rows = pd.read_parquet(summary["part_uri"])
    assert len(rows) == 6 and set(rows["source_format"]) == {"dicom"}
    assert summary["cam_overlays"] == int(rows["decision_fracture"].sum())
    cams = sorted(p.stem for p in (Path(summary["output_dir"]) / "cam").glob("*.png"))
    assert cams == sorted(rows.loc[rows["decision_fracture"] == 1, "image_id"])
    secrets = set(incoming["names"])
    for p in incoming["phi"]:
        secrets |= {p["id"]} | {part for part in p["name"].split("^") if len(part) >= 5}
    originals = b"".join(p.read_bytes() for p in dcms)
    assert all(s.encode() in originals for s in {_phi_of(dcms[0])["id"]}), "PHI control missing"
    files = _written_files(champion["art"] / "prediction_log", champion["art"] / "runs" / "infer1",
                           champion["art"] / "runs" / "phi")
    assert len(files) >= 8
    for path in files:
        data = path.read_bytes()
        leaked = [s for s in secrets if s.encode() in data or s.title().encode() in data]
        assert not leaked, f"{path.name} holds PHI {leaked}"
    for text in (caplog.text, json.dumps(summary), json.dumps(first_run["summary"])):
        assert not [s for s in secrets if s in text or s.title() in text]
    ids = set(rows["image_id"]) | set(first_run["rows"]["image_id"])
    assert all(ID_RE.match(i) for i in ids)


def test_deid_options_apply_to_the_scored_pixels(champion, incoming, tmp_path):
    folder = tmp_path / "blank"
    folder.mkdir()
    for p in sorted((incoming["folder"] / "site A").glob("*_*_*.dcm"))[:2]:
        shutil.copy(p, folder / p.name)
    shutil.copy(sorted(incoming["folder"].glob("syn*.png"))[0], folder / "a.png")
    s = _infer(champion, folder, "blank", date="2026-11-28",
               deid={"blank_regions": [{"box": [0, 0, 64, 64]}]})
    rows = pd.read_parquet(s["part_uri"]).set_index("source_format")
    assert (rows.loc[["dicom"], "feat_std"] == 0).all()  # the blanked, de-identified pixels
    assert rows.loc["png", "feat_std"] > 0  # PNG/JPEG carry no header to de-identify


def test_error_budget_fails_and_leaves_the_partition_untouched(champion, incoming, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for p in sorted(incoming["folder"].glob("syn*.png"))[:4]:
        shutil.copy(p, folder / p.name)
    for k in range(2):
        (folder / f"bad{k}.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    with pytest.raises(ErrorBudgetExceeded):
        _infer(champion, folder, "budget", date="2026-11-23", max_bad_fraction=0.2)
    assert not (champion["art"] / "prediction_log" / "date=2026-11-23").exists()
    run = champion["art"] / "runs" / "budget" / "infer"
    assert not storage.is_complete(str(run))
    assert len(json.loads((run / "quarantine.json").read_text())) == 2
    ok = _infer(champion, folder, "budget", date="2026-11-23", max_bad_fraction=0.5)
    assert ok["rows"] == 4 and ok["quarantined"] == 2


def test_config_and_registry_errors(champion, incoming, monkeypatch, tmp_path):
    from fracture_ops.config import load_config
    from fracture_ops.inference.infer import InferConfig

    with pytest.raises(ConfigError):
        load_config(InferConfig, overrides={"date": "20-11-2026"})
    assert InferConfig().date == time.strftime("%Y-%m-%d", time.gmtime())
    with pytest.raises(ConfigError):
        _infer(champion, incoming["folder"], "err", model_uri="runs:/abc/model")
    with pytest.raises(BadInputError):
        _infer(champion, incoming["folder"], "err", model_uri=f"models:/{MODEL}@nobody")
    with pytest.raises(BadInputError):
        _infer(champion, tmp_path / "missing", "err")
    with pytest.raises(ConfigError):
        _infer(champion, incoming["folder"], "err", deid={"no_such_option": 1})
    monkeypatch.delenv("FRACTURE_OPS_DEID_SECRET")
    with pytest.raises(ConfigError):
        _infer(champion, incoming["folder"], "err")


def test_empty_incoming_folder_is_a_no_op(champion, tmp_path):
    (tmp_path / "empty").mkdir()
    s = _infer(champion, tmp_path / "empty", "empty", date="2026-11-24")
    assert s["inputs"] == 0 and s["rows"] == 0 and s["part_uri"] is None
    assert not (champion["art"] / "prediction_log" / "date=2026-11-24").exists()


def test_reference_table_holds_the_val_split_with_labels(champion):
    from fracture_ops.inference.reference import ReferenceConfig, build_reference_step

    cfg = ReferenceConfig(artifact_root=str(champion["art"]), run_id="ref")
    s = build_reference_step(cfg)
    uri = champion["art"] / "reference" / MODEL / f"v{champion['version']}" / "reference.parquet"
    assert Path(s["reference_uri"]) == uri and storage.is_complete(str(uri.parent))
    ref = pd.read_parquet(uri)
    split = pd.read_parquet(champion["split_uri"])
    val = split[split["split"] == "val"].set_index("image_id")
    assert s["rows"] == len(ref) == len(val) > 0 and not s["skipped"]
    assert set(ref["image_id"]) == set(val.index)
    assert (ref.set_index("image_id")["label"] == val.loc[ref["image_id"], "label"]).all()
    assert list(ref.columns) == layout.log_columns(["fracture"])
    assert set(ref["model_version"]) == {champion["version"]}
    assert np.isfinite(ref[layout.NUMERIC_FEATURES].to_numpy(float)).all()
    stamp = uri.stat().st_mtime_ns
    again = build_reference_step(cfg)
    assert again["skipped"] and again["rows"] == s["rows"] and uri.stat().st_mtime_ns == stamp
    content = uri.read_bytes()
    forced = build_reference_step(cfg.model_copy(update={"force": True}))
    assert not forced["skipped"] and uri.read_bytes() == content  # deterministic rebuild


def test_cli_infer_and_reference(champion, incoming, tmp_path, capsys):
    from fracture_ops import cli

    folder = tmp_path / "cli"
    folder.mkdir()
    for p in sorted(incoming["folder"].glob("syn*.png"))[:3]:
        shutil.copy(p, folder / p.name)
    root = ["--artifact-root", str(champion["art"]), "--run-id", "cli"]
    assert cli.main(["infer", str(folder), "--date", "2026-11-25", *root]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rows"] == 3 and out["model_version"] == champion["version"]
    assert cli.main(["reference", *root]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model_version"] == champion["version"]
    assert cli.main(["infer", str(folder), "--date", "25/11/2026", *root]) == 2


@pytest.mark.realdata
def test_fracatlas_every_image_scored_or_quarantined(champion, realdata):
    from fracture_ops.data.images import read_image, read_image_size
    from fracture_ops.errors import ImageDecodeError

    folder = realdata / "fracatlas" / "images"
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 300
    t0 = time.perf_counter()
    s = _infer(champion, folder, "fracatlas", date="2026-11-26", batch_size=32)
    wall = time.perf_counter() - t0
    print(f"\nFracAtlas: {s['inputs']} images, infer loop {s['images_per_s']:.1f} img/s, "
          f"step wall {wall:.1f} s ({s['inputs'] / wall:.1f} img/s incl. model load)")
    rows = pd.read_parquet(s["part_uri"])
    assert s["inputs"] == 300 and s["rows"] + s["quarantined"] == 300 and len(rows) == s["rows"]
    rejected = set()
    for p in (f for f in files if f.stem in FRACATLAS_TRUNCATED):
        try:
            read_image(str(p))
        except ImageDecodeError:
            rejected.add(_expected_id(p))
    assert rejected and set(pd.read_parquet(s["quarantine_uri"])["image_id"]) == rejected
    assert s["decode_warnings"] == len(FRACATLAS_TRUNCATED) - len(rejected)
    by_id = rows.set_index("image_id")
    for p in files:
        if _expected_id(p) not in rejected:
            w, h = read_image_size(str(p))
            row = by_id.loc[_expected_id(p)]
            assert (row["feat_width"], row["feat_height"]) == (w, h)
    assert np.isfinite(rows[layout.NUMERIC_FEATURES].to_numpy(float)).all()
    assert set(rows["source_format"]) == {"jpeg"} and set(rows["view"]) == {"UNKNOWN"}


@pytest.mark.realdata
def test_real_dicom_with_names_in_file_names_leaks_nothing(champion, realdata):
    import pydicom

    folder = realdata / "dicom" / "dicom_files"
    dcms = sorted(folder.glob("*.dcm"))
    s = _infer(champion, folder, "realdicom", date="2026-11-27")
    rows = pd.read_parquet(s["part_uri"])
    assert s["rows"] + s["quarantined"] == s["inputs"] == len(dcms) + len(list(folder.glob("*.jpg")))
    assert (rows["source_format"] == "dicom").sum() + s["quarantined"] >= len(dcms)
    secrets = {"Davidson", "Douglas", "Kaufman"}  # in the file names
    for p in dcms:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        secrets |= {str(ds.PatientID)} | {x for x in str(ds.PatientName).split("^") if len(x) >= 5}
    assert all(s_.encode() in b"".join(p.read_bytes() for p in dcms) or s_ in "".join(p.name for p in dcms)
               for s_ in secrets)
    for path in _written_files(champion["art"] / "prediction_log" / "date=2026-11-27",
                               champion["art"] / "runs" / "realdicom"):
        data = path.read_bytes()
        assert not [x for x in secrets if x.encode() in data or x.upper().encode() in data], path.name
    assert (rows.loc[rows["source_format"] == "dicom", "body_region"] == "chest").all()


@pytest.mark.integration
def test_s3_incoming_and_s3_prediction_log(champion, incoming, s3):
    files = sorted(incoming["folder"].glob("syn*.png"))[:3] + sorted(
        (incoming["folder"] / "site A").glob("*_*_*.dcm"))[:2]
    for p in files:
        storage.write_bytes(f"s3://fo-infer/incoming/day1/{p.name}", p.read_bytes())
    kw = dict(prediction_log_uri="s3://fo-infer/log", date="2026-11-29")
    first = _infer(champion, "s3://fo-infer/incoming", "s3", **kw)
    assert first["rows"] == 5 and first["part_uri"].startswith("s3://fo-infer/log/date=2026-11-29/")
    ids = set(storage.read_parquet(first["part_uri"])["image_id"])
    assert ids == {_keys().image_id(f"s3://fo-infer/incoming/day1/{p.name}") for p in files}
    again = _infer(champion, "s3://fo-infer/incoming", "s3", **kw)
    assert again["batch_id"] == first["batch_id"]
    assert layout.list_parts("s3://fo-infer/log/date=2026-11-29") == [first["part_uri"]]


# ----------------------------------------------------------------------------- sharded inference

def _sharded(champion, incoming_uri, run_id, shards, log_root, date=DATE, only=None):
    """infer-plan, then each shard (or those in ``only``), then infer-merge (unless ``only``)."""
    from fracture_ops.inference.shards import (MergeConfig, PlanConfig, ShardConfig, merge_step,
                                               plan_step, shard_step)

    root = dict(artifact_root=str(champion["art"]), run_id=run_id)
    plan = plan_step(PlanConfig(incoming_uri=str(incoming_uri), date=date, shards=shards,
                                prediction_log_uri=str(log_root), batch_size=16, **root))
    done = [shard_step(ShardConfig(incoming_uri=str(incoming_uri), plan_uri=plan["plan_uri"],
                                   shard=k, batch_size=16, **root))
            for k in (plan["shards"] if only is None else only)]
    if only is not None:
        return plan, done, None
    return plan, done, merge_step(MergeConfig(plan_uri=plan["plan_uri"], **root))


def _partition(log_root: Path, date: str = DATE) -> dict[str, pd.DataFrame]:
    folder = log_root / f"date={date}"
    return {p.name: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}


def _assert_same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    probs = [c for c in a.columns if c.startswith("prob_") or c.startswith("feat_emb")]
    pd.testing.assert_frame_equal(a.drop(columns=probs), b.drop(columns=probs))
    np.testing.assert_allclose(a[probs].to_numpy(float), b[probs].to_numpy(float), atol=1e-6)


def test_sharded_inference_equals_one_run_and_a_shard_rerun_changes_nothing(champion, incoming,
                                                                             tmp_path):
    whole = _infer(champion, incoming["folder"], "unsharded", prediction_log_uri=str(tmp_path / "one"))
    plan, done, merged = _sharded(champion, incoming["folder"], "sharded", 4, tmp_path / "four")
    # four disjoint shards of near-equal size cover every input exactly once
    from fracture_ops.inference.shards import read_plan

    ids = read_plan(plan["plan_uri"])["shards"]
    flat = [i for s in ids for i in s]
    assert plan["shards"] == [0, 1, 2, 3] and len(flat) == len(set(flat)) == whole["inputs"]
    assert max(map(len, ids)) - min(map(len, ids)) <= 1
    assert sum(d["rows"] + d["quarantined"] for d in done) == whole["inputs"]
    assert {d["model_version"] for d in done} == {champion["version"]}
    # the merged partition is the unsharded run's: same batch, same part, same rows
    one, four = _partition(tmp_path / "one"), _partition(tmp_path / "four")
    assert sorted(one) == sorted(four) and merged["batch_id"] == whole["batch_id"]
    assert merged["rows"] == whole["rows"] and merged["quarantined"] == whole["quarantined"]
    for name in one:
        _assert_same_rows(one[name], four[name])
    # rerun shard 2 and the merge: nothing duplicated, nothing lost, same files
    _sharded(champion, incoming["folder"], "sharded", 4, tmp_path / "four", only=[2])
    from fracture_ops.inference.shards import MergeConfig, merge_step

    merge_step(MergeConfig(plan_uri=plan["plan_uri"], artifact_root=str(champion["art"]),
                           run_id="sharded"))
    again = _partition(tmp_path / "four")
    assert sorted(again) == sorted(four)
    for name in four:
        pd.testing.assert_frame_equal(again[name], four[name])
    # a whole new DAG run of the same day and files is the same batch: it replaces its own part
    plan2, _, merged2 = _sharded(champion, incoming["folder"], "sharded2", 2, tmp_path / "four")
    assert plan2["batch_id"] == plan["batch_id"] and merged2["rows"] == merged["rows"]
    again = _partition(tmp_path / "four")
    assert sorted(again) == sorted(four)
    for name in four:
        _assert_same_rows(again[name], four[name])
    # a file arriving later that day makes a new batch: only it is planned, the rest is logged
    extra = tmp_path / "extra"
    shutil.copytree(incoming["folder"], extra)
    _sharded(champion, extra, "late1", 4, tmp_path / "late")
    shutil.copy(next(champion["syn"].glob("images/*.png")), extra / "late_arrival.png")
    plan3, _, merged3 = _sharded(champion, extra, "late2", 4, tmp_path / "late")
    assert plan3["to_score"] == 1 and plan3["shards"] == [0] and merged3["rows"] == 1
    assert len(_partition(tmp_path / "late")) == 2 * 2  # two batches: a part and a quarantine each


def test_merge_refuses_an_unfinished_shard_and_a_shard_refuses_other_plans(champion, incoming,
                                                                           tmp_path):
    from fracture_ops.inference.shards import MergeConfig, ShardConfig, merge_step, shard_step

    plan, _, _ = _sharded(champion, incoming["folder"], "part", 3, tmp_path / "log", only=[0, 2])
    root = dict(artifact_root=str(champion["art"]), run_id="part")
    with pytest.raises(RuntimeError, match="shard 1"):
        merge_step(MergeConfig(plan_uri=plan["plan_uri"], **root))
    assert not (tmp_path / "log").exists() or not _partition(tmp_path / "log")  # nothing written
    with pytest.raises(ConfigError, match="shard 3 is not in the plan"):
        shard_step(ShardConfig(incoming_uri=str(incoming["folder"]), plan_uri=plan["plan_uri"],
                               shard=3, **root))
    with pytest.raises(ConfigError, match="no readable inference plan"):
        merge_step(MergeConfig(plan_uri=str(tmp_path / "nope.json"), **root))


@pytest.mark.realdata
def test_fracatlas_in_four_shards_gives_the_unsharded_rows(champion, realdata, tmp_path):
    """300 real FracAtlas JPEGs: four mapped shards and a merge give exactly the rows of one
    unsharded run (probabilities to 1e-6), truncated files quarantined the same way."""
    folder = realdata / "fracatlas" / "images"
    whole = _infer(champion, folder, "fa-one", date="2026-11-27", batch_size=32,
                   prediction_log_uri=str(tmp_path / "one"))
    _, done, merged = _sharded(champion, folder, "fa-four", 4, tmp_path / "four", date="2026-11-27")
    assert [d["inputs"] for d in done] == [75, 75, 75, 75]
    assert whole["inputs"] == 300 and merged["rows"] == whole["rows"] == 300 - whole["quarantined"]
    one, four = _partition(tmp_path / "one", "2026-11-27"), _partition(tmp_path / "four", "2026-11-27")
    assert sorted(one) == sorted(four)
    for name in one:
        _assert_same_rows(one[name], four[name])


def test_the_error_budget_is_the_whole_batch_s_not_each_shard_s(champion, tmp_path):
    """One broken file among eleven, in four shards: 1/11 is within the 10 % budget, although
    its shard of three is not; three broken files (27 %) fail the merge, the partition untouched."""
    src = sorted((champion["syn"] / "images").glob("*.png"))[:10]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in src:
        shutil.copy(p, folder / p.name)
    (folder / "broken_0.png").write_text("not an image")
    _, done, merged = _sharded(champion, folder, "budget1", 4, tmp_path / "log")
    assert merged["rows"] == 10 and merged["quarantined"] == 1
    assert sum(d["quarantined"] for d in done) == 1
    for i in (1, 2):
        (folder / f"broken_{i}.png").write_text("not an image")
    with pytest.raises(ErrorBudgetExceeded):
        _sharded(champion, folder, "budget2", 4, tmp_path / "log2")
    assert not (tmp_path / "log2").exists() or not _partition(tmp_path / "log2")
