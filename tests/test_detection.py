"""Detection track (YOLOv8 via ultralytics): export, coordinates, metrics, report, offline use,
training on synthetic data and an end-to-end run on real FracAtlas radiographs."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fracture_ops import storage
from fracture_ops.config import load_config
from fracture_ops.data.manifest import BOX_COLUMNS
from fracture_ops.data.split import SplitConfig, split_by_patient
from fracture_ops.detection import metrics as M
from fracture_ops.detection import yolo
from fracture_ops.detection.dataset import (export_yolo_dataset, linkable, parse_label_lines,
                                            yolo_label_lines)
from fracture_ops.detection.report import ReportItem, render_report
from fracture_ops.detection.yolo import DetectConfig, ImagePrediction
from fracture_ops.errors import ConfigError, ErrorBudgetExceeded, LeakageError

REPO = Path(__file__).resolve().parents[1]
# Settings that make a from-scratch YOLOv8n learn the synthetic fractures in few CPU epochs: no
# mosaic (it shrinks the few-pixel cracks), one optimizer step per batch (nbs = batch; the default
# nbs=64 accumulates 4 batches, leaving ~3 steps per epoch), and a higher AdamW learning rate.
SYNTH_TRAIN_ARGS = {"mosaic": 0.0, "scale": 0.25, "nbs": 16, "optimizer": "AdamW", "lr0": 0.004}


@pytest.fixture(scope="module", autouse=True)
def _yolo_config_dir(tmp_path_factory):
    """Keep ultralytics' settings and font out of ~/.config and the repo."""
    if not os.environ.get("YOLO_CONFIG_DIR"):
        os.environ["YOLO_CONFIG_DIR"] = str(tmp_path_factory.mktemp("yolo_config"))


@pytest.fixture
def no_network(monkeypatch):
    """Fail (and record) any socket to a non-loopback address or any DNS lookup of a remote host."""
    attempts: list[tuple[str, str]] = []

    def remote(host) -> bool:
        if host in (None, "", "localhost"):
            return False
        try:
            return not ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return True  # a host name other than localhost

    def guard(kind, host):
        if remote(host):
            attempts.append((kind, str(host)))
            raise OSError(f"network access blocked in tests: {kind} {host}")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create, real_gai = socket.create_connection, socket.getaddrinfo

    def connect(self, address):
        if isinstance(address, tuple):
            guard("connect", address[0])
        return real_connect(self, address)

    def connect_ex(self, address):
        if isinstance(address, tuple):
            guard("connect", address[0])
        return real_connect_ex(self, address)

    def create_connection(address, *a, **k):
        guard("create_connection", address[0])
        return real_create(address, *a, **k)

    def getaddrinfo(host, *a, **k):
        guard("getaddrinfo", host)
        return real_gai(host, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return attempts


def test_network_guard_blocks_remote_hosts(no_network):
    with pytest.raises(OSError):
        socket.getaddrinfo("github.com", 443)
    with pytest.raises(OSError):
        socket.create_connection(("8.8.8.8", 53), timeout=1)
    assert [k for k, _ in no_network] == ["getaddrinfo", "create_connection"]


# --------------------------------------------------------------------------- coordinates

def _box_table(rows, w, h):
    return pd.DataFrame([dict(zip(BOX_COLUMNS, ("img", "fracture", *b, float(w), float(h))))
                         for b in rows])


@pytest.mark.parametrize("w,h", [(192, 192), (454, 373), (2304, 2880)])
def test_yolo_label_lines_round_trip_within_a_pixel(w, h):
    rng = np.random.default_rng(w)
    x0, y0 = rng.uniform(0, w * 0.8, 20), rng.uniform(0, h * 0.8, 20)
    boxes = np.stack([x0, y0, x0 + rng.uniform(3, w * 0.2, 20), y0 + rng.uniform(3, h * 0.2, 20)], 1)
    lines = yolo_label_lines(_box_table(boxes, w, h), ["fracture"])
    assert len(lines) == 20 and all(ln.startswith("0 ") for ln in lines)
    for line in lines:
        assert all(0.0 <= float(v) <= 1.0 for v in line.split()[1:])
    back = np.array([b["box"] for b in parse_label_lines(lines, ["fracture"], w, h)])
    assert np.abs(back - boxes).max() <= 1.0


def test_label_lines_clip_to_image_and_drop_degenerate_boxes():
    lines = yolo_label_lines(_box_table([(-10, -5, 50, 40), (90, 10, 120, 30), (60, 60, 60, 70)],
                                        100, 80), ["fracture"])
    assert len(lines) == 2  # the zero-width box is dropped
    boxes = [b["box"] for b in parse_label_lines(lines, ["fracture"], 100, 80)]
    np.testing.assert_allclose(boxes[0], (0, 0, 50, 40), atol=0.01)
    np.testing.assert_allclose(boxes[1], (90, 10, 100, 30), atol=0.01)


def _letterbox_placement(shape_hw, imgsz, auto):
    """Where ultralytics' LetterBox puts an image: (left, top, new_w, new_h, out_shape).

    Found from LetterBox's own output (the image is 0, the padding 114), not re-derived."""
    from ultralytics.data.augment import LetterBox

    out = LetterBox(new_shape=(imgsz, imgsz), auto=auto, stride=32)(image=np.zeros((*shape_hw, 3), np.uint8))
    ys, xs = np.nonzero(out[..., 0] != 114)
    return xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min(), out.shape[:2]


@pytest.mark.parametrize("shape_hw,auto", [((373, 454), False), ((2880, 2304), True), ((192, 192), True)])
def test_boxes_survive_labels_letterbox_and_json(shape_hw, auto):
    """manifest box -> YOLO label -> network (letterboxed) coordinates -> ultralytics'
    DetectionPredictor.construct_result (scale_boxes) -> result_boxes -> JSON: within 1 px."""
    import torch
    from ultralytics.models.yolo.detect.predict import DetectionPredictor

    h, w = shape_hw
    manifest_boxes = np.array([[0.1 * w, 0.2 * h, 0.35 * w, 0.3 * h], [0.6 * w, 0.55 * h, 0.9 * w, 0.97 * h]])
    lines = yolo_label_lines(_box_table(manifest_boxes, w, h), ["fracture"])
    from_labels = np.array([b["box"] for b in parse_label_lines(lines, ["fracture"], w, h)])
    left, top, new_w, new_h, net_shape = _letterbox_placement(shape_hw, 640, auto)
    net = from_labels * [new_w / w, new_h / h, new_w / w, new_h / h] + [left, top, left, top]
    pred = torch.tensor(np.c_[net, [0.9, 0.6], [0, 0]], dtype=torch.float32)
    stub = SimpleNamespace(model=SimpleNamespace(names={0: "fracture"}))
    result = DetectionPredictor.construct_result(stub, pred, torch.zeros(1, 3, *net_shape),
                                                 np.zeros((h, w, 3), np.uint8), "img.png")
    boxes = yolo.result_boxes(result)
    doc = json.loads(json.dumps(ImagePrediction("img", w, h, boxes).to_json()))
    got = np.array([[b[k] for k in ("x_min", "y_min", "x_max", "y_max")] for b in doc["boxes"]])
    assert np.abs(got - manifest_boxes).max() <= 1.0
    assert [b["class_name"] for b in doc["boxes"]] == ["fracture", "fracture"]
    assert doc["score"] == pytest.approx(0.9)


# --------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def synth_mixed(tmp_path_factory):
    """12 patients, 16-bit PNGs with a third of the patients as DICOM, plus a split table."""
    from fracture_ops.data.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth_mixed")
    manifest, boxes = generate(SynthConfig(out_dir=str(out), n_patients=12, image_size=96, seed=3,
                                           bit_depth=16, dicom_fraction=0.34))
    table = split_by_patient(manifest, SplitConfig(val_fraction=0.25, test_fraction=0.25)).table
    return table, boxes


def test_export_converts_dicom_and_16bit_writes_labels_and_negatives(synth_mixed, tmp_path):
    from PIL import Image

    table, boxes = synth_mixed
    assert table["image_uri"].str.endswith(".dcm").any()
    ds = export_yolo_dataset(table, boxes, tmp_path / "yolo")
    assert set(ds.files) == set(table["image_id"]) and not ds.quarantined
    for image_id, path in ds.files.items():
        assert path.suffix == ".png" and not path.is_symlink()  # 16-bit / DICOM -> 8-bit PNG
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (96, 96)
        label = path.parent.parent.parent / "labels" / ds.splits[image_id] / f"{path.stem}.txt"
        n_lines = len(label.read_text().splitlines())
        assert n_lines == int((boxes["image_id"] == image_id).sum())  # empty file for negatives
    assert sum(c["negatives"] for c in ds.counts.values()) == int((table["label"] == "normal").sum())
    data = __import__("yaml").safe_load(ds.data_yaml.read_text())
    assert Path(data["path"]).is_absolute() and data["names"] == {0: "fracture"}
    assert {data["train"], data["val"], data["test"]} == {"images/train", "images/val", "images/test"}


def test_export_links_8bit_images_and_quarantines_unreadable(synthetic_small, tmp_path):
    manifest = storage.read_parquet(storage.join(synthetic_small.out_dir, "manifest.parquet"))
    boxes = storage.read_parquet(storage.join(synthetic_small.out_dir, "boxes.parquet"))
    table = split_by_patient(manifest, SplitConfig()).table
    broken = table.index[table["split"] == "train"][0]
    table.loc[broken, "image_uri"] = str(tmp_path / "missing.png")
    ds = export_yolo_dataset(table, boxes, tmp_path / "yolo", max_bad_fraction=0.1)
    assert [q["image_id"] for q in ds.quarantined] == [table.loc[broken, "image_id"]]
    assert "not found" in ds.quarantined[0]["reason"]
    assert all(p.is_symlink() for p in ds.files.values())  # 8-bit PNGs are linked, not copied
    with pytest.raises(ErrorBudgetExceeded):
        export_yolo_dataset(table, boxes, tmp_path / "yolo2", max_bad_fraction=0.0)


def test_export_refuses_a_leaking_split(synthetic_small, tmp_path):
    manifest = storage.read_parquet(storage.join(synthetic_small.out_dir, "manifest.parquet"))
    table = split_by_patient(manifest, SplitConfig()).table
    pid = table["patient_id"].iloc[0]
    rows = table.index[table["patient_id"] == pid]
    table.loc[rows[0], "split"], table.loc[rows[1], "split"] = "train", "test"
    with pytest.raises(LeakageError):
        export_yolo_dataset(table, pd.DataFrame(columns=BOX_COLUMNS), tmp_path / "yolo")


def test_truncated_or_rotated_jpeg_is_not_linked(tmp_path):
    from PIL import Image

    img = Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    good, cut, rotated = tmp_path / "good.jpg", tmp_path / "cut.jpg", tmp_path / "rot.jpg"
    img.save(good)
    cut.write_bytes(good.read_bytes()[:-200])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: OpenCV would turn it, read_image would not
    img.save(rotated, exif=exif)
    assert linkable(str(good)) and not linkable(str(cut)) and not linkable(str(rotated))


# --------------------------------------------------------------------------- config, offline

def test_config_rejects_reserved_train_args_and_bad_imgsz():
    with pytest.raises(ConfigError, match="train_args"):
        load_config(DetectConfig, overrides={"train_args": {"amp": True}})
    with pytest.raises(ConfigError, match="imgsz"):
        load_config(DetectConfig, overrides={"imgsz": 200})
    assert load_config(DetectConfig, overrides=["epochs=3"]).epochs == 3


def test_device_and_amp_choices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert yolo.resolve_device("auto") == "cpu" and yolo.resolve_device("1") == "1"
    assert yolo.amp_mode("cpu", True) is False  # the AMP check would download weights
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert yolo.resolve_device("auto") == "0" and yolo.amp_mode("0", True) == "bf16"


def test_import_ultralytics_is_offline_with_integrations_off(no_network):
    yolo.import_ultralytics()
    from ultralytics.utils import ONLINE, SETTINGS, USER_CONFIG_DIR

    assert ONLINE is False and SETTINGS["mlflow"] is False and SETTINGS["sync"] is False
    assert (USER_CONFIG_DIR / "Arial.ttf").stat().st_size > 100_000  # no font download needed
    assert no_network == []


def test_missing_weights_fail_fast_before_ultralytics(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        yolo.check_weights(str(tmp_path / "nope.pt"), required=True)
    with pytest.raises(ConfigError, match="local"):
        yolo.check_weights("https://example.org/yolov8n.pt", required=True)
    with pytest.raises(ConfigError, match="architecture|yaml"):
        yolo.check_architecture("yolov8x.pt")
    code = ("import sys; from fracture_ops.cli import main; "
            f"rc = main(['detect', 'predict', {str(tmp_path)!r}, '--weights', "
            f"{str(tmp_path / 'missing.pt')!r}, '--artifact-root', {str(tmp_path / 'art')!r}]); "
            "print('ULTRALYTICS_IMPORTED', 'ultralytics' in sys.modules); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert proc.returncode == 2  # ConfigError
    assert "weights file not found" in proc.stderr
    assert "ULTRALYTICS_IMPORTED False" in proc.stdout


def test_cli_parser_has_three_actions():
    from fracture_ops.cli import build_parser

    parser = build_parser("detect")
    args = parser.parse_args(["detect", "train", "--split-uri", "s.parquet", "--epochs", "3",
                              "--no-mlflow"])
    assert (args.detect_command, args.split_uri, args.epochs, args.mlflow) == ("train", "s.parquet", 3, False)
    assert parser.parse_args(["detect", "predict", "img.png", "--weights", "w.pt"]).source == "img.png"
    with pytest.raises(SystemExit):
        parser.parse_args(["detect"])


# --------------------------------------------------------------------------- metrics, report

def test_image_level_metrics_match_sklearn_and_roc_reading():
    from sklearn.metrics import roc_auc_score

    y = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    s = [0.0, 0.1, 0.2, 0.3, 0.9, 0.0, 0.4, 0.5, 0.8, 0.95]
    m = M.image_level_metrics(y, s, spec=0.80)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    # specificity >= 0.8 allows one false positive (0.9): threshold 0.4 -> 4 of 5 positives
    assert m["sens_at_spec_0.80"] == pytest.approx(0.8) and m["threshold_at_spec_0.80"] == pytest.approx(0.4)
    assert (m["n_pos"], m["n_neg"]) == (5, 5)
    assert np.isnan(M.image_level_metrics([1, 1], [0.2, 0.3])["auroc"])


def test_det_metrics_summary_reads_ultralytics_metric():
    from ultralytics.utils.metrics import DetMetrics

    det = DetMetrics(names={0: "fracture"})
    # two GT boxes; predictions: one TP at every IoU threshold (conf 0.9), one FP (conf 0.3)
    det.update_stats({"tp": np.array([[True] * 10, [False] * 10]), "conf": np.array([0.9, 0.3]),
                      "pred_cls": np.array([0.0, 0.0]), "target_cls": np.array([0.0, 0.0]),
                      "target_img": np.array([0.0]), "im_name": "a"})
    det.process()
    out = M.det_metrics_summary(det, ["fracture"])
    assert 0.3 < out["map50"] < 0.7 and out["map50"] == pytest.approx(out["map50_95"])
    assert set(out["per_class"]) == {"fracture"}
    assert out["per_class"]["fracture"]["ap50"] == pytest.approx(out["map50"])


def test_report_is_self_contained_and_worst_first():
    gt = np.array([[10, 10, 30, 30]])
    found = [{"x_min": 11, "y_min": 10, "x_max": 30, "y_max": 31, "confidence": 0.9, "class_name": "fracture"}]
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    cases = {"hit": (gt, found), "miss": (gt, []), "clean": (np.zeros((0, 4)), [])}
    items = []
    for name, (g, p) in cases.items():
        pb = np.array([[b["x_min"], b["y_min"], b["x_max"], b["y_max"]] for b in p]).reshape(-1, 4)
        items.append(ReportItem(name, img, [tuple(b) for b in g], p, M.match_image(g, pb),
                                max([b["confidence"] for b in p], default=0.0)))
    items.sort(key=lambda it: M.severity_key(it.match, it.score))
    assert [it.image_id for it in items] == ["miss", "hit", "clean"]
    page = render_report("t", {"map50": 0.5, "per_class": {"fracture": {
        "ap50": 0.5, "ap50_95": 0.2, "precision": 0.6, "recall": 0.4}}}, items)
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.index(">miss<") < page.index(">hit<") < page.index(">clean<")


# --------------------------------------------------------------------------- training (slow)

@pytest.mark.slow
def test_train_on_synthetic_evaluates_reports_and_registers(tmp_path, no_network, monkeypatch):
    """The detect_train step's contract on CPU, from scratch (40 patients, 128 px, 2 epochs):
    test metrics, report, predictions, MLflow run and registered version, a rerun that finds
    its version. How well it learns is a measurement, not a test: ``benchmarks/bench_detection.py``
    trains 16 epochs on 120 patients and checks test mAP@0.5 >= 0.5 (measured ~0.85)."""
    from mlflow import MlflowClient

    from fracture_ops.data.synthetic import SynthConfig, synth_step
    from fracture_ops.detection import tracking as det_tracking
    from fracture_ops.detection.steps import detect_train_step
    from fracture_ops.tracking import tracking_uri

    monkeypatch.setenv("FRACTURE_OPS_MLFLOW_DIR", str(tmp_path / "mlflow"))
    monkeypatch.chdir(tmp_path)  # anything MLflow puts under ./mlruns stays out of the repo

    syn = SynthConfig(out_dir=str(tmp_path / "syn"), n_patients=40, image_size=128, seed=0,
                      regions=["femur", "forearm"])
    synth_step(syn)
    manifest = storage.read_parquet(storage.join(syn.out_dir, "manifest.parquet"))
    split = split_by_patient(manifest, SplitConfig(val_fraction=0.15, test_fraction=0.2)).table
    storage.write_parquet(tmp_path / "split.parquet", split)
    cfg = DetectConfig(artifact_root=str(tmp_path / "art"), run_id="synth",
                       split_uri=str(tmp_path / "split.parquet"),
                       boxes_uri=storage.join(syn.out_dir, "boxes.parquet"), imgsz=128, epochs=2,
                       batch=16, device="cpu", workers=2, train_args=SYNTH_TRAIN_ARGS)
    t0 = time.perf_counter()
    summary = detect_train_step(cfg)
    print(f"\nsynthetic detect train: {time.perf_counter() - t0:.0f} s wall, summary {summary}")
    out = Path(cfg.output_dir("detect_train"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and 0.0 <= metrics["map50"] <= 1.0, metrics
    assert metrics["map50_95"] <= metrics["map50"] and 0.0 <= metrics["image_level"]["auroc"] <= 1.0
    assert {"map50_95", "precision", "recall", "per_class"} <= set(metrics)
    assert (out / "_SUCCESS").exists() and (out / "weights" / "best.pt").is_file()
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "https://" not in page
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == metrics["images"] and all("boxes" in p for p in preds)
    # MLflow: run with weights and samples, model registered as its own registered model
    client = MlflowClient(tracking_uri())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["map50"] == pytest.approx(metrics["map50"])
    assert run.data.params["train_args.mosaic"] == "0.0"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"weights", "samples", "metrics.json", "report.html"} <= artifacts
    versions = client.search_model_versions("name='fracture-detector'")
    assert [str(v.version) for v in versions] == [summary["model_version"]]
    assert client.get_model_version_by_alias("fracture-detector", "challenger").run_id == run.info.run_id
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    assert det_tracking.register(cfg, run.info.run_id, out / "weights" / "best.pt", metrics) \
        == summary["model_version"]  # a rerun finds the version instead of creating one
    det_tracking.ensure_registered_model(client, "fracture-detector")  # exists: no error
    assert len(client.search_model_versions("name='fracture-detector'")) == 1
    # the registered pyfunc model predicts boxes in original pixels from a URI or base64 bytes
    model = mlflow.pyfunc.load_model("models:/fracture-detector@challenger")
    test_rows = split[split["split"] == "test"]
    uri = test_rows.loc[test_rows["label"] == "fracture", "image_uri"].iloc[0]
    b64 = __import__("base64").b64encode(Path(uri).read_bytes()).decode()
    got = model.predict(pd.DataFrame({"image": [uri, b64, str(tmp_path / "missing.png")]}))
    assert list(got["width"]) == [128, 128, 0] and got["error"].iloc[2] != ""
    # the same image as a path and as bytes: the same prediction, boxes inside the image
    assert got["score"].iloc[0] == pytest.approx(got["score"].iloc[1]) and 0 <= got["score"].iloc[0] <= 1
    assert got["boxes"].iloc[0] == got["boxes"].iloc[1]
    assert all(0 <= b["x_min"] <= b["x_max"] <= 128 for b in json.loads(got["boxes"].iloc[0]))
    assert no_network == []


@pytest.mark.slow
@pytest.mark.realdata
def test_fracatlas_train_val_predict_end_to_end_offline(realdata, tmp_path, no_network, capsys,
                                                       monkeypatch):
    """Real radiographs through the CLI: 1 epoch at imgsz 256 (a smoke run; mAP stays ~0)."""
    monkeypatch.setenv("FRACTURE_OPS_MLFLOW_DIR", str(tmp_path / "mlflow"))
    monkeypatch.chdir(tmp_path)  # anything MLflow puts under ./mlruns stays out of the repo
    from fracture_ops.cli import main
    from fracture_ops.data.sources import load_source

    manifest, boxes, _ = load_source(str(realdata / "fracatlas"), "fracatlas")
    split = split_by_patient(manifest, SplitConfig(seed=0)).table
    storage.write_parquet(tmp_path / "split.parquet", split)
    storage.write_parquet(tmp_path / "boxes.parquet", boxes)
    common = ["--artifact-root", str(tmp_path / "art"), "--imgsz", "256", "--device", "cpu",
              "--batch", "16"]
    data = ["--split-uri", str(tmp_path / "split.parquet"), "--boxes-uri", str(tmp_path / "boxes.parquet")]
    assert main(["detect", "train", *data, *common, "--epochs", "1"]) == 0
    train = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    weights = train["weights_uri"]
    assert main(["detect", "val", *data, *common, "--weights", weights, "--split", "val"]) == 0
    val = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    folder = tmp_path / "to_predict"
    folder.mkdir()
    picks = split[split["split"] == "test"].head(3)
    for uri in picks["image_uri"]:
        (folder / Path(uri).name).symlink_to(uri)
    assert main(["detect", "predict", str(folder), *common, "--weights", weights, "--conf", "0.001"]) == 0
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(f"\nFracAtlas 1 epoch: test mAP50 {train['map50']} mAP50-95 {train['map50_95']}; "
          f"val mAP50 {val['map50']}; train {train['train_seconds']} s")
    out = Path(pred["out_dir"])
    docs = json.loads((out / "predictions.json").read_text())
    assert pred["images"] == 3 and len(docs) == 3 and len(list((out / "overlays").glob("*.png"))) == 3
    sizes = {Path(u).stem: __import__("PIL.Image", fromlist=["Image"]).open(u).size for u in picks["image_uri"]}
    for d in docs:
        assert (d["width"], d["height"]) == sizes[d["image_id"]]  # original pixels, not the 256 input
        for b in d["boxes"]:
            assert 0 <= b["x_min"] <= b["x_max"] <= d["width"] and 0 <= b["y_min"] <= b["y_max"] <= d["height"]
    train_metrics = json.loads((Path(train["out_dir"]) / "metrics.json").read_text())
    quarantined = {q["image_id"] for q in train_metrics["dataset"]["quarantined"]}
    assert quarantined <= {"IMG0004084", "IMG0004189", "IMG0004255", "IMG0004278"}  # truncated upstream
    assert no_network == []
