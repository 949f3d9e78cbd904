"""Box supervision (``box_weight``) and the global pool (``global_pool``) of the train step."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from fracture_ops.data.manifest import BOX_COLUMNS
from fracture_ops.errors import ConfigError
from fracture_ops.model.network import build_model
from fracture_ops.model.preprocess import build_transforms
from fracture_ops.training.datasets import ManifestDataset, box_mask, box_regions


def _boxes(rows):
    return pd.DataFrame(rows, columns=BOX_COLUMNS)


def test_box_regions_know_negatives_and_boxed_positives_only():
    table = pd.DataFrame({"image_id": ["a", "b", "c", "d"]})
    y = np.array([[1], [1], [0], [1]], np.float32)
    boxes = _boxes([("a", "fracture", 10, 20, 30, 60, 100, 200),
                    ("a", "fracture", 0, 0, 120, 10, 100, 200),  # past the edge: clipped
                    ("d", "metal", 1, 1, 5, 5, 10, 10),  # another class: not a fracture box
                    ("c", "fracture", 1, 1, 5, 5, 10, 10),  # on a negative: ignored
                    ("b", "fracture", 1, 1, 5, 5, 0, None)])  # no image size: unusable
    got = box_regions(table, y, boxes, "fracture")
    assert np.allclose(got[0], [[0.1, 0.1, 0.3, 0.3], [0.0, 0.0, 1.0, 0.05]])
    assert got[1] is None  # positive without a (usable) box: not known
    assert got[2].shape == (0, 4)  # negative: boxes nowhere
    assert got[3] is None


def test_box_mask_covers_the_box_and_at_least_one_pixel():
    m = box_mask(np.array([[0.25, 0.5, 0.5, 1.0]], np.float32), (8, 4))
    assert m.sum() == 4 and m[4:8, 1].all() and not m[:4].any()
    tiny = box_mask(np.array([[0.5, 0.5, 0.5, 0.5]], np.float32), (10, 10))
    assert tiny.sum() == 1


@pytest.mark.parametrize("resize", ["letterbox", "squash"])
def test_the_box_mask_follows_the_image_through_every_augmentation(resize):
    """The finding (bright in the image) stays under the mask through the resize, random crop,
    rotation and flip of training."""
    img = np.full((120, 80), 0.1, np.float32)
    img[30:50, 10:30] = 1.0  # the finding, off-centre so a flip moves it
    table = pd.DataFrame({"image_id": ["x"] * 12, "image_uri": ["unused"] * 12})
    y = np.ones((12, 1), np.float32)
    regions = box_regions(table, y, _boxes([("x", "fracture", 10, 30, 30, 50, 80, 120)]), "fracture")
    tf = build_transforms(64, True, seed=3, hflip=True, resize=resize, crop_scale=0.6,
                          rotate_limit=10, brightness_contrast=0.0)
    ds = ManifestDataset(table, y, tf, regions=regions)
    ds.load = lambda i: img
    seen_left = seen_right = 0
    for i in range(12):
        x, _, mask, known = ds[i]
        assert float(known) == 1.0 and mask.shape == (64, 64)
        bright = (x[0] * 0.229 + 0.485 > 0.55).float()  # the finding (1.0), not the rest (0.1)
        inside = float((bright * mask).sum() / mask.sum().clamp(min=1))
        outside = float((bright * (1 - mask)).sum() / (1 - mask).sum())
        assert inside > 0.8 and outside < 0.1, (i, inside, outside)
        cols = mask.nonzero()[:, 1].float().mean()
        seen_left += int(cols < 32)
        seen_right += int(cols >= 32)
    assert seen_left and seen_right  # some views flipped, some not: the mask went with them


def test_cell_loss_counts_known_images_only():
    from fracture_ops.training.loop import cell_loss

    cells = torch.tensor([[[[3.0, -3.0], [-3.0, -3.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    mask = torch.zeros(2, 8, 8)
    mask[0, 0, 0] = 1  # one pixel in the top-left cell of the first image
    both = cell_loss(cells, mask, torch.tensor([1.0, 1.0]))
    first = cell_loss(cells, mask, torch.tensor([1.0, 0.0]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        cells[0], torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    assert float(first) == pytest.approx(float(expected))
    assert float(both) > float(first)  # the second (all cells wrongly positive) adds its error
    assert float(cell_loss(cells, mask, torch.zeros(2))) == 0.0


def test_cell_logits_are_the_classifier_on_every_cell():
    """With average pooling the image logit is the mean of the cell logits (the head is
    linear): the cells are the model's own evidence map, not a second head."""
    from fracture_ops.training.loop import CellLogits

    torch.manual_seed(0)
    model = build_model("test_resnet", "binary", 1, quiet=True).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        logits, cells = CellLogits(model)(x)
        assert cells.shape[:2] == (2, 1) and cells.shape[-1] > 1
        assert torch.allclose(cells.mean(dim=(2, 3)), logits, atol=1e-5)
        assert torch.allclose(logits, model(x), atol=1e-6)
    assert sum(p.numel() for p in CellLogits(model).parameters()) == \
        sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backbone,pool", [("test_resnet", "catavgmax"), ("test_resnet", "max"),
                                           ("test_convnext", "avg"), ("test_efficientnet", "avg")])
def test_cell_logits_go_through_the_whole_head(backbone, pool):
    """Heads with more than a classifier (both pools side by side, a norm layer, a convolution)
    score each cell as they score a one-cell image."""
    from fracture_ops.training.loop import CellLogits

    torch.manual_seed(0)
    model = build_model(backbone, "binary", 1, quiet=True, global_pool=pool).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, cells = CellLogits(model)(x)
        feats = model.forward_features(x)
        corner = model.forward_head(feats[:, :, :1, :1])
    assert logits.shape == (2, 1) and cells.shape == (2, 1, *feats.shape[-2:])
    assert torch.allclose(cells[:, :, 0, 0], corner, atol=1e-5)


def test_cell_logits_need_a_feature_map():
    from fracture_ops.training.loop import CellLogits

    model = build_model("test_vit", "binary", 1, quiet=True)
    with pytest.raises(ConfigError, match="B x C x h x w"):
        CellLogits(model)(torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:]))


def test_a_view_that_loses_every_box_trains_on_its_label_alone():
    """A random crop that takes a positive's only box out of view must not teach "no fracture
    anywhere": that view is not known; a negative stays known whatever the crop."""
    img = np.full((100, 100), 0.2, np.float32)
    table = pd.DataFrame({"image_id": ["p", "n"], "image_uri": ["unused"] * 2})
    y = np.array([[1.0], [0.0]], np.float32)
    regions = box_regions(table, y, _boxes([("p", "fracture", 0, 0, 4, 4, 100, 100)]), "fracture")
    tf = build_transforms(32, True, seed=0, crop_scale=0.3, rotate_limit=0, brightness_contrast=0)
    ds = ManifestDataset(table, y, tf, regions=regions)
    ds.load = lambda i: img
    lost = kept = 0
    for _ in range(40):
        _, _, mask, known = ds[0]
        if mask.any():
            kept += 1
            assert float(known) == 1.0
        else:
            lost += 1
            assert float(known) == 0.0
        assert float(ds[1][3]) == 1.0
    assert lost and kept


def test_the_box_loss_is_added_only_for_known_images():
    """One epoch over the same batch: with no image known the loss is the label loss exactly;
    with the images known it is the label loss plus ``box_weight`` times the cell loss."""
    from fracture_ops.training.loop import CellLogits, cell_loss, train_one_epoch

    def run(known, weight):
        torch.manual_seed(0)
        model = build_model("test_resnet", "binary", 1, quiet=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        x = torch.randn(4, 3, 64, 64)
        y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
        mask = torch.zeros(4, 64, 64)
        mask[0, 10:20, 10:20] = 1
        batch = [(x, y, mask, torch.full((4,), known))]
        stats = train_one_epoch(CellLogits(model), batch, torch.nn.BCEWithLogitsLoss(), opt, None,
                                "none", None, "cpu", None, 0.0, lambda it: it, box_weight=weight)
        model.train()
        with torch.no_grad():
            logits, cells = CellLogits(model)(x)
            label = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
            extra = float(cell_loss(cells, mask, torch.full((4,), known)))
        return stats["train_loss"], label, extra

    loss, label, _ = run(0.0, 2.0)
    assert loss == pytest.approx(label, rel=1e-4)
    loss, label, extra = run(1.0, 2.0)
    assert extra > 0.1 and loss == pytest.approx(label + 2.0 * extra, rel=1e-4)


def test_mixup_blends_the_batch_and_both_images_losses():
    """Under mixup the network sees ``lam * x + (1 - lam) * x[perm]`` and the loss is the same
    blend of the label and cell losses against each image's own targets."""
    from fracture_ops.training.loop import CellLogits, cell_loss, train_one_epoch

    torch.manual_seed(0)
    model = CellLogits(build_model("test_resnet", "binary", 1, quiet=True))
    seen = []
    forward = model.forward
    model.forward = lambda inp: seen.append(inp.clone()) or forward(inp)
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    mask = torch.zeros(4, 64, 64)
    mask[0, 10:20, 10:20] = 1
    mask[2, 40:60, 5:25] = 1
    known = torch.tensor([1.0, 1.0, 0.0, 1.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    bce = torch.nn.BCEWithLogitsLoss()
    torch.manual_seed(5)
    stats = train_one_epoch(model, [(x, y, mask, known)], bce, opt, None, "none", None, "cpu", None,
                            0.0, lambda it: it, box_weight=2.0, mixup=0.4)
    torch.manual_seed(5)  # the same draws as the loop's
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(4)
    assert 0.0 < lam < 1.0 and not torch.equal(perm, torch.arange(4))
    assert torch.allclose(seen[0], lam * x + (1 - lam) * x[perm])
    with torch.no_grad():
        logits, cells = forward(seen[0])
        expected = (lam * bce(logits, y) + (1 - lam) * bce(logits, y[perm])
                    + 2.0 * (lam * cell_loss(cells, mask, known)
                             + (1 - lam) * cell_loss(cells, mask[perm], known[perm])))
        unblended = bce(logits, y) + 2.0 * cell_loss(cells, mask, known)
    assert stats["train_loss"] == pytest.approx(float(expected), rel=1e-4)
    assert float(unblended) != pytest.approx(float(expected), rel=1e-2)


def _split(tmp_path, synthetic_small):
    from fracture_ops.data.split import SplitConfig, split_step

    return split_step(SplitConfig(manifest_uri=f"{synthetic_small.out_dir}/manifest.parquet",
                                  artifact_root=str(tmp_path / "art"), run_id="r1"))["split_uri"]


def _train(tmp_path, split_uri, **kw):
    from fracture_ops.training.train import TrainConfig, train_step

    cfg = TrainConfig(split_uri=split_uri, backbone="test_resnet", image_size=64, epochs=1,
                      batch_size=16, device="cpu", artifact_root=str(tmp_path / "art"),
                      run_id="r1", **kw)
    return train_step(cfg)


def test_train_with_boxes_keeps_a_plain_servable_model(tmp_path, synthetic_small, caplog,
                                                       monkeypatch):
    """On the synthetic set (every fracture has its box) the step says how many positives have
    boxes, trains through the cell loss, and keeps a model that loads in pyfunc as any other,
    with its global pool."""
    from fracture_ops.model.checkpoint import load_weights
    from fracture_ops.training import loop

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    split_uri = _split(tmp_path, synthetic_small)
    seen = []
    real = loop.cell_loss
    monkeypatch.setattr(loop, "cell_loss", lambda *a: seen.append(float(a[2].sum())) or real(*a))
    with caplog.at_level(logging.INFO, logger="fracture_ops.training.train"):
        out = _train(tmp_path, split_uri, box_weight=1.0, global_pool="max",
                     boxes_uri=f"{synthetic_small.out_dir}/boxes.parquet")
    split = pd.read_parquet(split_uri)
    train = split[split["split"] == "train"]
    positives = int((train["label"] == "fracture").sum())
    assert f"{positives} of {positives} positive training images have 'fracture' boxes" in caplog.text
    assert seen and sum(seen) == len(train)  # every training image known, once per epoch
    blob = load_weights(f"{out['train_dir']}/model.pt", "model.pt")
    assert blob["info"]["global_pool"] == "max"
    assert not any(k.startswith("model.") for k in blob["state_dict"])  # the network, unwrapped
    model = build_model("test_resnet", "binary", 1, quiet=True, global_pool="max")
    model.load_state_dict(blob["state_dict"])  # same keys and shapes as a plain network


def test_train_without_a_box_table_says_so_and_trains_on_labels(tmp_path, synthetic_small, caplog,
                                                                 monkeypatch):
    from fracture_ops.training import loop

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    split_uri = _split(tmp_path, synthetic_small)
    monkeypatch.setattr(loop, "cell_loss", lambda *a: pytest.fail("no boxes: no cell loss"))
    with caplog.at_level(logging.WARNING):
        _train(tmp_path, split_uri, box_weight=1.0, boxes_uri=str(tmp_path / "absent.parquet"))
    assert "no box table" in caplog.text and "absent.parquet" in caplog.text


def test_box_supervision_is_for_the_binary_task(tmp_path, synthetic_small, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    split_uri = _split(tmp_path, synthetic_small)
    with pytest.raises(ConfigError, match="binary task"):
        _train(tmp_path, split_uri, box_weight=1.0, task="multiclass",
               class_names=["normal", "fracture"],
               boxes_uri=f"{synthetic_small.out_dir}/boxes.parquet")


@pytest.mark.parametrize("pool", ["max", "avgmax", "catavgmax"])
def test_the_global_pool_is_rebuilt_wherever_the_model_is_loaded(tmp_path, pool):
    """A model trained with another pool is stored with it and rebuilt with it by Grad-CAM's
    loader (and pyfunc's, through the same ``info``): same logits as the trained network."""
    from fracture_ops.model.gradcam import load_classifier

    torch.manual_seed(0)
    net = build_model("test_resnet", "binary", 1, quiet=True, global_pool=pool).eval()
    torch.save({"state_dict": net.state_dict(),
                "info": {"task": "binary", "class_names": ["fracture"], "backbone": "test_resnet",
                         "global_pool": pool},
                "transform": {"image_size": 64, "resize": "squash"}}, tmp_path / "model.pt")
    loaded = load_classifier(str(tmp_path / "model.pt"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x), atol=1e-6)
        if pool != "catavgmax":  # the same weights under the default pool score otherwise
            avg = build_model("test_resnet", "binary", 1, quiet=True)
            avg.load_state_dict(net.state_dict())
            assert not torch.allclose(avg.eval()(x), net(x), atol=1e-4)
    with pytest.raises(ConfigError, match="global_pool"):
        build_model("test_resnet", "binary", 1, quiet=True, global_pool="median")


def test_cv_folds_the_refit_and_the_training_dag_keep_box_supervision():
    """The cv step's fold configs and fit's refit carry the box fields; the training DAG hands
    the train task the run's de-identified boxes and the trigger form's weight and pool."""
    from fracture_ops.orchestration.params import dag_fields
    from fracture_ops.orchestration.specs import TRAINING_STEPS
    from fracture_ops.training.train import TrainConfig
    from fracture_ops.workflows.cv import CVConfig, _fold_config
    from fracture_ops.workflows.fit import FitConfig, _train_fields

    box = {"box_weight": 2.0, "boxes_uri": "boxes.parquet", "global_pool": "max"}
    fold = _fold_config(CVConfig(split_uri="s", **box), 0, "fold.parquet", "parent")
    refit = TrainConfig(**{**_train_fields(FitConfig(split_uri="s", **box)), "refit": True})
    for cfg in (fold, refit):
        assert (cfg.box_weight, cfg.boxes_uri, cfg.global_pool) == (2.0, "boxes.parquet", "max")
    args = list(TRAINING_STEPS["train"].args)
    assert args[args.index("--boxes-uri") + 1].endswith("/deidentify/boxes.deid.parquet")
    assert args[args.index("--box-weight") + 1] == "{{ params.box_weight }}"
    assert args[args.index("--global-pool") + 1] == "{{ params.global_pool }}"
    assert "deidentify" in TRAINING_STEPS["train"].reads
    fields = dag_fields()["fracture_training"]
    assert fields["box_weight"][1] == "box_weight" and fields["global_pool"][1] == "global_pool"
