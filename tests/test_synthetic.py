"""The synthetic data set: deterministic, well-formed, and learnable."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from fracture_ops import storage
from fracture_ops.data.synthetic import SynthConfig, generate, render_image, synth_step


def _digest(folder) -> str:
    h = hashlib.sha256()
    # images and the relocatable CSVs (the Parquet manifest holds absolute URIs)
    for uri in storage.list_files(str(folder), (".png", ".dcm", ".csv")):
        h.update(storage.read_bytes(uri))
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = SynthConfig(out_dir=str(tmp_path / "a"), n_patients=4, image_size=96, seed=3)
    synth_step(a)
    synth_step(a.model_copy(update={"out_dir": str(tmp_path / "b")}))
    synth_step(a.model_copy(update={"out_dir": str(tmp_path / "c"), "seed": 4}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_manifest_views_patients_and_boxes(synthetic_small):
    m = storage.read_parquet(storage.join(synthetic_small.out_dir, "manifest.parquet"))
    boxes = storage.read_parquet(storage.join(synthetic_small.out_dir, "boxes.parquet"))
    assert len(m) == 48 and m["patient_id"].nunique() == 24
    assert (m.groupby("patient_id")["view"].apply(set) == {"AP", "LAT"}).all()
    # a patient's fracture shows in every view: labels agree within a patient
    assert (m.groupby("patient_id")["label"].nunique() == 1).all()
    boxed = set(boxes["image_id"])
    assert boxed == set(m.loc[m["label"] == "fracture", "image_id"])
    assert (boxes["x_min"] < boxes["x_max"]).all() and (boxes["y_min"] < boxes["y_max"]).all()
    assert boxes[["x_min", "y_min"]].min().min() >= 0
    assert boxes[["x_max", "y_max"]].max().max() <= synthetic_small.image_size - 1
    prevalence = (m["label"] == "fracture").mean()
    assert 0.3 < prevalence < 0.6


def test_fracture_is_a_dark_gap_inside_its_box():
    rng = np.random.default_rng(11)
    img, boxes = render_image("femur", True, "L", 160, rng)
    assert len(boxes) == 1
    x0, y0, x1, y1 = (int(round(v)) for v in boxes[0])
    inside = img[y0:y1 + 1, x0:x1 + 1]
    # the gap cuts the bright bone: the box holds both bone-bright and gap-dark pixels
    assert inside.max() - inside.min() > 0.25
    _, no_boxes = render_image("femur", False, "L", 160, np.random.default_rng(11))
    assert no_boxes == []


def test_csv_manifest_is_ingestible(synthetic_small):
    from fracture_ops.data.sources import load_source

    df, boxes, _ = load_source(storage.join(synthetic_small.out_dir, "manifest.csv"), "csv")
    assert len(df) == 48 and all(storage.exists(u) for u in df["image_uri"])
    assert len(boxes) == len(pd.read_csv(storage.join(synthetic_small.out_dir, "boxes.csv")))


@pytest.mark.slow
def test_small_cnn_separates_classes_quickly(tmp_path):
    """Later issues rely on this: a tiny CNN trained for seconds must separate the classes."""
    torch = pytest.importorskip("torch")
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    cfg = SynthConfig(out_dir=str(tmp_path), n_patients=300, image_size=128, seed=1)
    manifest, _ = generate(cfg)
    from PIL import Image

    x = np.stack([np.asarray(Image.open(u), np.float32) / 255 for u in manifest["image_uri"]])[:, None]
    y = (manifest["label"] == "fracture").to_numpy(np.float32)
    pid = manifest["patient_id"].str[3:].astype(int).to_numpy()
    train, test = pid % 5 != 0, pid % 5 == 0  # patient-wise hold-out
    def block(i: int, o: int) -> list:
        return [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

    net = torch.nn.Sequential(
        *block(1, 16), torch.nn.MaxPool2d(2), *block(16, 32), torch.nn.MaxPool2d(2), *block(32, 32),
        torch.nn.MaxPool2d(2), *block(32, 64), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(15):
        net.train()
        for idx in torch.randperm(len(xt)).split(32):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx])[:, 0], yt[idx])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        scores = net(torch.from_numpy(x[test]))[:, 0].numpy()
    assert roc_auc_score(y[test], scores) >= 0.9
