"""Training building blocks: models, losses, transforms, the decode cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fracture_ops.errors import ConfigError, ManifestError
from fracture_ops.training.datasets import DecodeCache, ManifestDataset, targets_for
from fracture_ops.training.losses import FocalLoss, build_loss, class_weights
from fracture_ops.model.network import build_model, cam_target_layer
from fracture_ops.model.preprocess import build_transforms


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "efficientnet_b3", "densenet121",
                                      "resnet18", "resnet50", "convnext_nano"])
@pytest.mark.parametrize("task,n,expected", [("binary", 1, 1), ("multiclass", 3, 3), ("multilabel", 4, 4)])
def test_build_model_heads(backbone, task, n, expected):
    model = build_model(backbone, task, n, quiet=True).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, expected)
    assert isinstance(cam_target_layer(model, backbone), torch.nn.Module)


def test_pretrained_from_local_file_only(tmp_path, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    source = build_model("resnet18", "binary", 1, quiet=True)
    weights = tmp_path / "resnet18.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, weights)
    model = build_model("resnet18", "binary", 1, pretrained_path=str(weights))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    hf_dir = tmp_path / "hf" / "snapshots" / "abc"
    hf_dir.mkdir(parents=True)
    (hf_dir / "pytorch_model.bin").write_bytes(weights.read_bytes())
    model = build_model("resnet18", "binary", 1, pretrained_path=str(tmp_path / "hf"))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("resnet18", "binary", 1, pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_model("resnet_does_not_exist", "binary", 1)


def test_focal_loss_reduces_to_bce_and_downweights_easy_examples():
    logits, y = torch.tensor([[3.0], [-2.0], [0.1]]), torch.tensor([[1.0], [0.0], [1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert torch.isclose(FocalLoss(gamma=0.0)(logits, y), bce)
    assert FocalLoss(gamma=2.0)(logits, y) < bce


def test_class_weights_from_prevalence():
    y = np.array([[1], [0], [0], [0]], np.float32)
    assert class_weights(y, "binary") == pytest.approx([3.0])
    onehot = np.eye(3)[[0, 0, 0, 1, 1, 2]]
    assert class_weights(onehot, "multiclass") == pytest.approx([6 / 9, 1.0, 2.0])
    with pytest.raises(ConfigError, match="multiclass"):
        build_loss("bce", "multiclass")
    with pytest.raises(ConfigError, match="multilabel"):
        build_loss("ce", "multilabel")


def test_hflip_only_when_allowed():
    img = np.zeros((64, 64), np.float32)
    img[:, :16] = 1.0  # a bright band on the left, like a laterality marker
    for allowed, expect_flip in ((False, False), (True, True)):
        tf = build_transforms(64, True, hflip=allowed)
        torch.manual_seed(0)
        np.random.seed(0)
        lefts = [float(tf(img)["image"][0, :, :20].mean() > tf(img)["image"][0, :, -20:].mean())
                 for _ in range(20)]
        flipped_once = min(lefts) == 0.0
        assert flipped_once == expect_flip


def test_eval_transform_is_deterministic_and_pads():
    tf = build_transforms(48, False)
    img = np.random.default_rng(0).random((30, 60), dtype=np.float32)
    a, b = tf(img)["image"], tf(img)["image"]
    assert a.shape == (3, 48, 48) and torch.equal(a, b)
    from fracture_ops.model.preprocess import IMAGENET_MEAN, IMAGENET_STD

    raw = [a[k] * IMAGENET_STD[k] + IMAGENET_MEAN[k] for k in range(3)]
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)


def test_targets_for_tasks():
    df = pd.DataFrame({"label": ["fracture", "normal", "hand"], "lbl_a": [1, 0, 1], "lbl_b": [0, 0, 1]})
    assert targets_for(df.iloc[:2], "binary", ["fracture"]).ravel().tolist() == [1, 0]
    mc = targets_for(df, "multiclass", ["fracture", "hand", "normal"])
    assert mc.argmax(1).tolist() == [0, 2, 1]
    assert targets_for(df, "multilabel", ["a", "b"]).tolist() == [[1, 0], [0, 0], [1, 1]]
    with pytest.raises(ManifestError, match="hand"):
        targets_for(df, "multiclass", ["fracture", "normal"])


def test_decode_cache_skips_decoding_after_first_epoch(tmp_path, monkeypatch, synthetic_small):
    from fracture_ops import storage
    from fracture_ops.training import datasets

    m = storage.read_parquet(storage.join(synthetic_small.out_dir, "manifest.parquet")).head(6)
    calls = []
    real = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda uri: calls.append(uri) or real(uri))
    ds = ManifestDataset(m, np.zeros((6, 1), np.float32), build_transforms(64, False),
                         cache=DecodeCache(tmp_path / "cache", 80))
    first = [ds[i][0] for i in range(len(ds))]
    assert len(calls) == 6
    second = [ds[i][0] for i in range(len(ds))]
    assert len(calls) == 6  # epoch 2 decoded nothing
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(first, second))  # float16 cache
