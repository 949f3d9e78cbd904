"""GPU check: the platform's GPU code paths on a real CUDA device, unattended, in under 8 minutes.

Run ``make gpu-check`` (or ``python benchmarks/gpu_check.py``) on a machine with CUDA. It:

1. trains efficientnet_b0 at 384 px with mixed precision (bf16 where the GPU supports it, else
   fp16 with a GradScaler) for a fixed number of steps through the platform's training loop
   (:func:`fracture_ops.training.loop.train_one_epoch`: channels-last, gradient clipping, AMP) and
   through a bare timm loop (``torch.autocast`` + ``GradScaler``, nothing else) on the same GPU
   and the same tensors, alternating the two; prints img/s of each and their ratio, the peak
   GPU memory of each, and the GPU utilisation sampled by ``nvidia-smi`` while each runs;
2. trains YOLOv8n for one epoch on the FracAtlas images of ``../shared/realdata`` through the
   platform's ``detect train`` step (offline, from scratch) and prints its time and mAP@0.5;
3. runs the test suite's ``gpu``-marked tests (``pytest -m gpu``).

Without a CUDA device it prints "no CUDA device" and exits 0 having run nothing, so it is safe in
CI and on laptops. The exit status is 1 when a part fails. Each part has its own time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("FRACTURE_OPS_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


def cuda_device() -> str | None:
    """The CUDA device's name, or None when torch sees none."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


class GpuSampler:
    """Samples GPU utilisation (%) with ``nvidia-smi`` every ``interval_ms`` in the background."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}", "-i", "0"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {"util_mean": None, "util_max": None, "samples": 0}
        return {"util_mean": round(statistics.mean(self.samples), 1),
                "util_max": max(self.samples), "samples": len(self.samples)}


def train_throughput(backbone: str, size: int, batch: int, steps: int, repeats: int) -> dict:
    """Platform loop vs bare timm loop, same GPU, same tensors, AMP; img/s, memory, utilisation."""
    import copy

    import timm
    import torch

    from fracture_ops.training.loop import amp_dtype, train_one_epoch

    device = "cuda"
    dtype = amp_dtype("auto", device)
    torch.manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, device=device),
                torch.randint(0, 2, (batch, 1), device=device).float()) for _ in range(steps)]
    base = timm.create_model(backbone, pretrained=False, num_classes=1)

    def bare(model, opt, scaler, data) -> float:
        model.train()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        torch.cuda.synchronize()
        return sum(len(x) for x, _ in data) / (time.perf_counter() - t0)

    def platform(model, opt, scaler, data) -> float:
        loss_fn = torch.nn.BCEWithLogitsLoss()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_one_epoch(model, data, loss_fn, opt, None, "none", scaler, device, dtype, 1.0,
                        lambda it: it)
        torch.cuda.synchronize()
        return sum(len(x) for x, _ in data) / (time.perf_counter() - t0)

    out: dict = {"backbone": backbone, "size": size, "batch": batch, "steps": steps,
                 "amp_dtype": str(dtype).replace("torch.", "")}
    rates: dict[str, list[float]] = {"bare": [], "platform": []}
    for _ in range(repeats):  # alternate so clocks and thermals hit both alike
        for name, fn, channels_last in (("bare", bare, False), ("platform", platform, True)):
            model = copy.deepcopy(base).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
            fn(model, opt, scaler, batches[:2])  # warm-up (cuDNN autotuning, allocator)
            torch.cuda.reset_peak_memory_stats()
            with GpuSampler() as sampler:
                rates[name].append(fn(model, opt, scaler, batches))
            out[f"{name}_peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            out[f"{name}_gpu_util"] = sampler.summary()
            del model, opt
            torch.cuda.empty_cache()
    out["bare_img_s"] = round(statistics.median(rates["bare"]), 1)
    out["platform_img_s"] = round(statistics.median(rates["platform"]), 1)
    out["ratio"] = round(out["platform_img_s"] / out["bare_img_s"], 3)
    return out


def yolo_epoch(imgsz: int, batch: int) -> dict:
    """One YOLOv8n epoch from scratch on the FracAtlas images through ``detect train``."""
    from fracture_ops import storage
    from fracture_ops.data.sources import load_source
    from fracture_ops.data.split import SplitConfig, split_by_patient
    from fracture_ops.detection.steps import detect_train_step
    from fracture_ops.detection.yolo import DetectConfig

    if not (REALDATA / "fracatlas").is_dir():
        return {"skipped": f"no FracAtlas images at {REALDATA / 'fracatlas'}"}
    with tempfile.TemporaryDirectory() as tmp:
        manifest, boxes, _ = load_source(str(REALDATA / "fracatlas"), "fracatlas")
        split = split_by_patient(manifest, SplitConfig(seed=0)).table
        storage.write_parquet(Path(tmp) / "split.parquet", split)
        storage.write_parquet(Path(tmp) / "boxes.parquet", boxes)
        t0 = time.perf_counter()
        summary = detect_train_step(DetectConfig(
            artifact_root=str(Path(tmp) / "art"), run_id="gpu-check",
            split_uri=str(Path(tmp) / "split.parquet"), boxes_uri=str(Path(tmp) / "boxes.parquet"),
            epochs=1, imgsz=imgsz, batch=batch, device="0", mlflow=False, register_model=False))
        wall = time.perf_counter() - t0
    return {"images": len(split), "wall_s": round(wall, 1), "train_s": summary["train_seconds"],
            "eval_images": summary["images"], "map50": summary["map50"],
            "map50_95": summary["map50_95"]}


def gpu_tests(timeout_s: int) -> dict:
    """``pytest -m gpu`` over the test suite."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          str(REPO / "tests")], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout_s)
    tail = (res.stdout + res.stderr).strip().splitlines()[-1:] or [""]
    return {"exit": res.returncode, "result": tail[0], "seconds": round(time.perf_counter() - t0, 1)}


def _part(name: str, fn, results: dict) -> bool:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
        ok = "error" not in results[name] and results[name].get("exit", 0) == 0  # 5: none ran
    except Exception as exc:  # noqa: BLE001 - report every part, then fail at the end
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        ok = False
    print(f"[{name}] {round(time.perf_counter() - t0, 1)} s: {json.dumps(results[name])}", flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_b0")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="training steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--yolo-imgsz", type=int, default=640)
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "yolo", "tests"])
    args = ap.parse_args()
    name = cuda_device()
    if name is None:
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False): nothing was run.")
        return 0
    import torch

    print(f"gpu-check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)
    results: dict = {"device": name}
    ok = True
    if "train" not in args.skip:
        ok &= _part("train", lambda: train_throughput(args.backbone, args.size, args.batch,
                                                      args.steps, args.repeats), results)
    if "yolo" not in args.skip:
        ok &= _part("yolo", lambda: yolo_epoch(args.yolo_imgsz, 16), results)
    if "tests" not in args.skip:
        ok &= _part("tests", lambda: gpu_tests(240), results)
    print(json.dumps(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
