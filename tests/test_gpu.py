"""The GPU code paths (AMP bf16/fp16, GradScaler, pinned memory, CUDA scoring) on a real device.

Marked ``gpu``: skipped (with the reason) where torch sees no CUDA device; ``make gpu-check``
runs them on a GPU machine, beside its throughput figures. The CPU tests that check the GPU
check script itself run everywhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_and_runs_nothing():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu-check would run its parts")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA device" in res.stdout and "nothing was run" in res.stdout
    assert "[train]" not in res.stdout and "[yolo]" not in res.stdout


def test_make_gpu_check_target_runs_the_script():
    text = (REPO / "Makefile").read_text()
    target = text.split("\ngpu-check:", 1)[1].split("\n\n", 1)[0]
    assert "benchmarks/gpu_check.py" in target
    assert "gpu-check" in (REPO / "README.md").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_training_steps_on_cuda(amp):
    """A few steps of the platform loop under autocast (fp16 with a GradScaler, or bf16): the
    loss stays finite, the weights move, and they stay float32."""
    import torch

    from fracture_ops.model.network import build_model
    from fracture_ops.training.loop import amp_dtype, train_one_epoch

    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(0)
    model = build_model("resnet18", "binary", 1, quiet=True).cuda().to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = amp_dtype(amp, "cuda")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    batches = [(torch.randn(8, 3, 96, 96), torch.randint(0, 2, (8, 1)).float()) for _ in range(4)]
    stats = train_one_epoch(model, batches, torch.nn.BCEWithLogitsLoss(), opt, None, "none",
                            scaler, "cuda", dtype, 1.0, lambda it: it)
    assert np.isfinite(stats["train_loss"]) and stats["images_per_s"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
def test_cuda_loader_pins_memory(synthetic_small):
    import torch

    from fracture_ops import storage
    from fracture_ops.model.preprocess import build_transforms
    from fracture_ops.training.datasets import ManifestDataset, make_loader

    m = storage.read_parquet(storage.join(synthetic_small.out_dir, "manifest.parquet")).head(8)
    ds = ManifestDataset(m, np.zeros((8, 1), np.float32), build_transforms(64, False), pre_size=74)
    x, _ = next(iter(make_loader(ds, 4, False, 0, "cuda")))
    assert x.is_pinned()
    assert x.to("cuda", non_blocking=True).is_cuda
    del torch


@pytest.mark.gpu
def test_train_step_on_cuda_with_amp_scores_like_a_cpu_rescoring(synthetic_small, tmp_path,
                                                                  monkeypatch):
    """One epoch of the train step on the GPU (AMP auto: bf16 or fp16); the logits it writes
    for a test image equal a float32 CPU re-scoring of the saved model to AMP precision."""
    import torch

    from fracture_ops import storage
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.model.gradcam import load_classifier
    from fracture_ops.model.preprocess import read_model_input, served_transform
    from fracture_ops.training.train import TrainConfig, train_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = dict(artifact_root=str(tmp_path / "art"), run_id="gpu")
    split = split_step(SplitConfig(manifest_uri=str(Path(synthetic_small.out_dir) / "manifest.parquet"),
                                   **root))
    out = train_step(TrainConfig(split_uri=split["split_uri"], backbone="resnet18", image_size=96,
                                 epochs=1, batch_size=16, device="cuda", **root))
    preds = storage.read_parquet(storage.join(out["train_dir"], "predictions.parquet"))
    uris = storage.read_parquet(split["split_uri"]).set_index("image_id")["image_uri"]
    row = preds[preds["split"] == "test"].iloc[0]
    loaded = load_classifier(storage.join(out["train_dir"], "model.pt"))
    tf = served_transform(loaded.transform_spec())
    x = tf(read_model_input(uris[row["image_id"]], loaded.pre_size))["image"][None]
    with torch.no_grad():
        cpu_logit = float(loaded.model.cpu().eval()(x)[0, 0])
    logit_col = next(c for c in preds.columns if c.startswith("logit"))
    assert abs(float(row[logit_col]) - cpu_logit) < 0.05
    assert isinstance(preds, pd.DataFrame) and len(preds) > 0
