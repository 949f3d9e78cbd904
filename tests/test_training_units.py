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


@pytest.mark.parametrize("flags,quadrants", [({"hflip": True}, {(0, 0), (0, 1)}),
                                               ({"vflip": True}, {(0, 0), (1, 0)}),
                                               ({"rotate90": True}, {(0, 0), (0, 1), (1, 0), (1, 1)}),
                                               ({}, {(0, 0)})])
def test_orientation_augmentations_move_the_finding_and_its_mask_together(flags, quadrants):
    """A finding in the top-left corner lands in exactly the quadrants each orientation
    augmentation can send it to, and its box mask goes with it; evaluation never moves it."""
    img = np.full((64, 64), 0.1, np.float32)
    img[4:20, 6:22] = 1.0
    mask = np.zeros((64, 64), np.uint8)
    mask[4:20, 6:22] = 1
    kw = dict(rotate_limit=0, crop_scale=1.0, brightness_contrast=0.0, resize="squash")
    tf = build_transforms(64, True, seed=1, **kw, **flags)
    seen = set()
    for _ in range(40):
        out = tf(img, mask)
        bright = (out["image"][0] * 0.229 + 0.485 > 0.55)
        assert torch.equal(bright, out["mask"].bool())
        rows, cols = out["mask"].nonzero(as_tuple=True)
        seen.add((int(rows.float().mean() >= 32), int(cols.float().mean() >= 32)))
    assert seen == quadrants
    ev = build_transforms(64, False, **kw, **flags)(img, mask)["mask"]
    assert torch.equal(ev, torch.from_numpy(mask))


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
    real = datasets.read_model_input
    monkeypatch.setattr(datasets, "read_model_input",
                        lambda uri, size: calls.append(uri) or real(uri, size))
    ds = ManifestDataset(m, np.zeros((6, 1), np.float32), build_transforms(64, False),
                         cache=DecodeCache(tmp_path / "cache", 80))
    first = [ds[i][0] for i in range(len(ds))]
    assert len(calls) == 6
    second = [ds[i][0] for i in range(len(ds))]
    assert len(calls) == 6  # epoch 2 decoded nothing
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(first, second))  # float16 cache


@pytest.mark.parametrize("resize", ["letterbox", "squash"])
def test_training_geometry_is_the_served_geometry(resize):
    """With the random parts switched off, a training view is exactly the eval input: the model
    trains on the geometry it is served (a crop-only training view once met letterboxed eval)."""
    img = np.random.default_rng(1).random((40, 72), dtype=np.float32)
    train = build_transforms(48, True, resize=resize, crop_scale=1.0, rotate_limit=0.0,
                             brightness_contrast=0.0)
    served = build_transforms(48, False, resize=resize)
    assert torch.equal(train(img)["image"], served(img)["image"])
    pad_rows = served(img)["image"][0, :8].std()
    assert bool(pad_rows < 1e-4) == (resize == "letterbox")  # letterbox pads, squash fills
    with pytest.raises(ValueError, match="letterbox or squash"):
        build_transforms(48, False, resize="crop")


def test_crop_scale_and_brightness_are_random_in_training_only():
    img = np.random.default_rng(2).random((64, 64), dtype=np.float32)
    tf = build_transforms(48, True, crop_scale=0.5, rotate_limit=0.0, brightness_contrast=0.0,
                          seed=0)
    views = [tf(img)["image"] for _ in range(4)]
    assert not all(torch.equal(views[0], v) for v in views[1:])
    still = build_transforms(48, True, crop_scale=1.0, rotate_limit=0.0, brightness_contrast=0.3,
                             seed=0)
    assert not all(torch.equal(still(img)["image"], still(img)["image"]) for _ in range(4))
    served = build_transforms(48, False, crop_scale=0.5, brightness_contrast=0.3)
    assert all(torch.equal(served(img)["image"], served(img)["image"]) for _ in range(4))


def test_label_smoothing_moves_targets_toward_the_uniform_value():
    logits = torch.tensor([[2.0], [-1.0], [0.3]])
    y = torch.tensor([[1.0], [0.0], [1.0]])
    smooth = build_loss("bce", "binary", label_smoothing=0.2)
    expect = torch.nn.functional.binary_cross_entropy_with_logits(logits, y * 0.8 + 0.1)
    assert float(smooth(logits, y)) == pytest.approx(float(expect))
    assert float(smooth(logits, y)) != pytest.approx(float(build_loss("bce", "binary")(logits, y)))
    three = torch.tensor([[2.0, 0.1, -1.0]])
    ce = build_loss("ce", "multiclass", label_smoothing=0.3)
    want = torch.nn.functional.cross_entropy(three, torch.tensor([0]), label_smoothing=0.3)
    assert float(ce(three, torch.tensor([[1.0, 0.0, 0.0]]))) == pytest.approx(float(want))
    with pytest.raises(ConfigError, match="focal"):
        build_loss("focal", "multiclass", label_smoothing=0.1)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert float(smooth.unsmoothed(logits, y)) == pytest.approx(float(plain))  # validation loss


def test_ema_weights_are_validated_and_kept(tmp_path):
    """With ``ema_decay`` the loop validates the averaged weights and saves them beside the raw
    ones; the validation loss it records is the averaged model's, not the raw model's."""
    from fracture_ops.training.loop import Checkpointer, LoopConfig, fit

    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).float()[:, None]
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    val = torch.utils.data.DataLoader(data, batch_size=64)

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(4, 1))

    cfg = LoopConfig(epochs=3, lr=0.05, weight_decay=0.0, scheduler="none", warmup_epochs=0,
                     grad_clip=0.0, amp="off", patience=3, task="binary", ema_decay=0.9,
                     tta_hflip=False, box_weight=0.0, mixup=0.0, min_epochs=1,
                     backbone_lr_scale=1.0, layer_decay=1.0, head_warmup_epochs=0.0,
                     freeze_bn=False)
    loss = torch.nn.BCEWithLogitsLoss()
    model = net()
    state = fit(model, train, val, y.numpy(), loss, cfg, "cpu", Checkpointer(tmp_path), lambda s: None)
    blob = torch.load(tmp_path / "last.pt", weights_only=True)
    assert blob["ema"] is not None
    averaged, raw = net(), net()
    averaged.load_state_dict(blob["ema"])
    raw.load_state_dict(blob["model"])
    with torch.no_grad():
        ema_loss, raw_loss = float(loss(averaged.eval()(x), y)), float(loss(raw.eval()(x), y))
    assert ema_loss != pytest.approx(raw_loss, abs=1e-4)
    assert state.history[-1]["val_loss"] == pytest.approx(ema_loss, abs=1e-5)
    off = net()
    fit(off, train, val, y.numpy(), loss, LoopConfig(**{**cfg.__dict__, "ema_decay": 0.0}), "cpu",
        Checkpointer(tmp_path / "off"), lambda s: None)
    assert torch.load(tmp_path / "off" / "last.pt", weights_only=True)["ema"] is None


def test_test_time_flip_averages_the_mirror_image_everywhere_a_model_is_scored():
    from fracture_ops.model.network import tta_logits
    from fracture_ops.training.loop import predict_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 6, 1)).eval()
    x = torch.randn(5, 3, 4, 6)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
        assert torch.allclose(tta_logits(model, x, False), plain)
        assert torch.allclose(tta_logits(model, x, True), (plain + mirrored) / 2)
        assert not torch.allclose(plain, mirrored)
    loader = [(x, torch.zeros(5, 1))]
    got = predict_logits(model, loader, "cpu", tta_hflip=True)
    assert np.allclose(got, ((plain + mirrored) / 2).numpy(), atol=1e-6)


def test_a_flip_averaging_model_scores_the_same_in_pyfunc_batch_inference_and_grad_cam(tmp_path):
    """A model packaged with ``tta_hflip`` averages the mirror image wherever it is scored: the
    served pyfunc model, batch inference's scorer (which splits timm's forward for embeddings)
    and the score Grad-CAM reports; all three agree, and differ from the unflipped logits."""
    import json

    from fracture_ops.inference.score import Scorer
    from fracture_ops.model.gradcam import GradCamExplainer, load_classifier
    from fracture_ops.registry.client import ModelRef

    torch.manual_seed(0)
    net = build_model("test_resnet", "binary", 1, None, quiet=True).eval()
    info = {"task": "binary", "class_names": ["fracture"], "backbone": "test_resnet"}
    torch.save({"state_dict": net.state_dict(), "info": info,
                "transform": {"image_size": 64, "clahe": False, "resize": "squash",
                              "tta_hflip": True, "pre_size": 74}}, tmp_path / "model.pt")
    (tmp_path / "calibration.json").write_text(json.dumps({"method": "none", "task": "binary"}))
    (tmp_path / "thresholds.json").write_text(json.dumps({"thresholds": {"fracture": 0.5}}))
    (tmp_path / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        + "".join(f"      {k}:\n        path: {f}\n" for k, f in (
            ("model", "model.pt"), ("calibration", "calibration.json"),
            ("thresholds", "thresholds.json"))))
    img = np.zeros((90, 70), np.float32)
    img[10:40, 5:30] = 1.0  # not mirror-symmetric
    scorer = Scorer(ModelRef("fracture-classifier", "1"), str(tmp_path), "cpu")
    from fracture_ops.model.preprocess import preprocess

    small = preprocess(img, 74)
    served = scorer.clf.logits([small])[0, 0]
    x = scorer.clf.transform(small)["image"][None]
    with torch.no_grad():
        plain, mirrored = float(net(x)[0, 0]), float(net(x.flip(-1))[0, 0])
    assert served == pytest.approx((plain + mirrored) / 2, abs=1e-5)
    assert abs(plain - mirrored) > 1e-4
    prob = scorer.score([small])["probs"][0, 0]
    assert prob == pytest.approx(1 / (1 + np.exp(-served)), abs=1e-5)
    explainer = GradCamExplainer(load_classifier(str(tmp_path / "model.pt")))
    try:
        assert float(explainer.explain(img).logits[0]) == pytest.approx(served, abs=1e-4)
    finally:
        explainer.close()


def _toy_fit(folder, epochs: int, ema_decay: float = 0.9):
    from fracture_ops.training.loop import Checkpointer, LoopConfig, fit

    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).float()[:, None]
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 1))
    cfg = LoopConfig(epochs=epochs, lr=0.05, weight_decay=0.0, scheduler="none", warmup_epochs=0,
                     grad_clip=0.0, amp="off", patience=10, task="binary", ema_decay=ema_decay,
                     tta_hflip=False, box_weight=0.0, mixup=0.0, min_epochs=1,
                     backbone_lr_scale=1.0, layer_decay=1.0, head_warmup_epochs=0.0,
                     freeze_bn=False)
    fit(model, torch.utils.data.DataLoader(data, batch_size=8, shuffle=True),
        torch.utils.data.DataLoader(data, batch_size=48), y.numpy(), torch.nn.BCEWithLogitsLoss(),
        cfg, "cpu", Checkpointer(folder), lambda s: None)
    return torch.load(folder / "last.pt", weights_only=True)


def test_a_resumed_run_continues_the_weight_average():
    """Killed after two epochs and resumed for a third, the run ends with the same averaged (and
    raw) weights as one that ran three epochs straight: the average and its warm-up step count
    come back from the checkpoint."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        straight = _toy_fit(Path(tmp) / "straight", 3)
        _toy_fit(Path(tmp) / "killed", 2)
        resumed = _toy_fit(Path(tmp) / "killed", 3)
        fresh_ema = _toy_fit(Path(tmp) / "fresh", 1)["ema"]
    for key in straight["ema"]:
        assert torch.allclose(straight["ema"][key].float(), resumed["ema"][key].float(), atol=1e-6), key
        assert torch.allclose(straight["model"][key].float(), resumed["model"][key].float(), atol=1e-6)
    assert any(not torch.allclose(fresh_ema[k].float(), straight["ema"][k].float())
               for k in fresh_ema)


def test_squash_grad_cam_maps_the_whole_input_onto_the_image():
    from fracture_ops.model.gradcam import Letterbox, cam_to_original, letterbox_geometry

    cam = np.zeros((32, 32), np.float32)
    cam[:, :16] = 1.0  # left half of the model input
    squash = cam_to_original(cam, Letterbox(32, 40, 80, 32, 32, 0, 0))
    assert squash.shape == (40, 80)
    assert squash[:, :38].min() > 0.9 and squash[:, 42:].max() < 0.1  # left half of the image
    boxed = cam_to_original(cam, letterbox_geometry(40, 80, 32))  # padding rows cropped away
    assert boxed.shape == (40, 80) and boxed[:, :38].min() > 0.9


def test_training_serving_and_batch_inference_read_a_large_jpeg_identically(tmp_path):
    """Training (with and without the decode cache), the served model and batch inference all
    decode a multi-megapixel JPEG at reduced scale and get bit-identical model inputs."""
    from PIL import Image

    from fracture_ops.data.images import read_image
    from fracture_ops.inference.score import ScoreInput, decode_input
    from fracture_ops.model.pyfunc import FractureClassifier

    yy, xx = np.mgrid[0:1800, 0:2200]
    arr = ((np.sin(xx / 41.0) * np.cos(yy / 29.0)) * 90 + 128).clip(0, 255).astype(np.uint8)
    path = str(tmp_path / "big.jpg")
    Image.fromarray(arr).save(path, "JPEG", quality=90)
    table = pd.DataFrame({"image_uri": [path]})
    y = np.zeros((1, 1), np.float32)
    plain = ManifestDataset(table, y, lambda image: {"image": image}, pre_size=257).load(0)
    cache = DecodeCache(tmp_path / "cache", 257)
    cached = [ManifestDataset(table, y, lambda image: {"image": image}, cache=cache).load(0)
              for _ in range(2)]  # the first fills the cache, the second reads it
    served = FractureClassifier()
    served.pre_size, served.jpeg_draft = 257, True  # a model trained with reduced-scale decoding
    served_img, err = served._load(path)
    batch = decode_input(ScoreInput("x", path), open(path, "rb").read(), 257, None, None,
                         max_side=257).image
    assert err is None and plain.shape == (210, 257)  # 2200 x 1800 decoded at 1/8 (275 x 225), shrunk
    for other in (*cached, served_img, batch):
        assert np.array_equal(other, plain)
    # a model trained before reduced-scale decoding (no jpeg_draft in its model.pt) is served as
    # it was trained: full decoding, then the shrink
    from fracture_ops.model.preprocess import preprocess

    full = read_image(path)[0]
    assert full.shape == (1800, 2200)
    served.jpeg_draft = False
    old_img, _ = served._load(path)
    assert np.array_equal(old_img, preprocess(full, 257)) and not np.array_equal(old_img, plain)


def test_predict_keeps_every_row_on_its_own_image_beyond_the_decode_window(tmp_path):
    """More rows than the decode-ahead window (two batches) and a partial last batch: every row
    gets exactly the probability of its own image scored alone, in order."""
    import json
    from types import SimpleNamespace

    from PIL import Image

    from fracture_ops.model.pyfunc import BATCH_SIZE, FractureClassifier

    rng = np.random.default_rng(3)
    paths = []
    for i in range(2 * BATCH_SIZE + 7):
        path = tmp_path / f"im{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (40 + i % 5, 48), dtype=np.uint8)).save(path)
        paths.append(str(path))
    torch.manual_seed(0)
    net = build_model("test_resnet", "binary", 1, quiet=True).eval()
    torch.save({"state_dict": net.state_dict(),
                "info": {"task": "binary", "class_names": ["fracture"], "backbone": "test_resnet"},
                "transform": {"image_size": 32, "pre_size": 37, "jpeg_draft": True}},
               tmp_path / "model.pt")
    (tmp_path / "cal.json").write_text(json.dumps({"calibrator": {"method": "none", "task": "binary"}}))
    (tmp_path / "th.json").write_text(json.dumps({"thresholds": {"fracture": 0.5}}))
    clf = FractureClassifier()
    clf.load_context(SimpleNamespace(artifacts={"model": str(tmp_path / "model.pt"),
                                                "calibration": str(tmp_path / "cal.json"),
                                                "thresholds": str(tmp_path / "th.json")}))
    out = clf.predict(None, pd.DataFrame({"image": paths}))
    alone = np.array([clf.predict(None, pd.DataFrame({"image": [p]}))["prob_fracture"].iloc[0]
                      for p in paths])
    assert out["error"].isna().all() and len(out) == len(paths)
    np.testing.assert_allclose(out["prob_fracture"].to_numpy(float), alone, atol=1e-6)
    assert len(np.unique(alone.round(6))) > len(paths) // 2  # the images do score differently
