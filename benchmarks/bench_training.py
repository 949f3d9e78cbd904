"""Training and inference throughput against bare baselines, in the same run.

1. Training step: the platform loop (``train_one_epoch``: channels-last, gradient clipping, AMP
   hooks, scheduler) versus a bare timm + torch loop on the same tensors. Goal: ratio >= 0.9.
2. Data loading: images/s the loader delivers (decoding every epoch, and from the decode cache)
   versus images/s the model consumes in training, on real FracAtlas JPEGs when present.
3. Batch inference: the pyfunc model's ``predict`` (decode, preprocess, transform, forward,
   calibration, thresholds) versus a bare forward pass on ready tensors.

Run: ``python benchmarks/bench_training.py [--backbone resnet18 --size 224]``. Prints ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from fracture_ops.training.datasets import DecodeCache, ManifestDataset, make_loader  # noqa: E402
from fracture_ops.training.loop import train_one_epoch  # noqa: E402
from fracture_ops.model.network import build_model  # noqa: E402
from fracture_ops.model.preprocess import build_transforms  # noqa: E402

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def bare_epoch(model, batches, opt) -> float:
    """The baseline: the textbook loop, nothing else."""
    model.train()
    t0 = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    return sum(len(x) for x, _ in batches) / (time.perf_counter() - t0)


def platform_epoch(model, batches, opt) -> float:
    loss_fn = torch.nn.BCEWithLogitsLoss()
    stats = train_one_epoch(model, batches, loss_fn, opt, None, "none", None, "cpu", None, 1.0,
                            lambda it: it)
    return stats["images_per_s"]


def bench_train_step(backbone: str, size: int, batch: int, n_batches: int, repeats: int) -> dict:
    torch.manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch, 1)).float())
               for _ in range(n_batches)]
    base = build_model(backbone, "binary", 1, quiet=True)
    runs = {"bare": [], "platform": []}
    for _r in range(repeats):  # alternate so drift in machine load hits both alike
        for name, fn, cl in (("bare", bare_epoch, False), ("platform", platform_epoch, True)):
            m = copy.deepcopy(base)
            if cl:
                m = m.to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            fn(m, batches[:1], opt)  # warm-up
            runs[name].append(fn(m, batches, opt))
    bare, plat = statistics.median(runs["bare"]), statistics.median(runs["platform"])
    return {"bare_img_s": round(bare, 2), "platform_img_s": round(plat, 2), "ratio": round(plat / bare, 3)}


def _images(n: int, tmp: Path) -> pd.DataFrame:
    jpgs = sorted((REALDATA / "fracatlas" / "images").rglob("*.jpg"))[:n] if REALDATA.is_dir() else []
    if jpgs:
        return pd.DataFrame({"image_uri": [str(p) for p in jpgs]}), "FracAtlas JPEGs"
    from fracture_ops.data.synthetic import SynthConfig, generate

    m, _ = generate(SynthConfig(out_dir=str(tmp / "syn"), n_patients=max(2, n // 2), image_size=1024))
    return m.head(n), "synthetic 1024 px PNGs"


def bench_loader(size: int, n: int, consume_img_s: float, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        table, what = _images(n, Path(tmp))
        tf = build_transforms(size, True)
        y = np.zeros((len(table), 1), np.float32)
        out = {"images": what, "n": len(table)}
        for name, cache in (("decode_every_epoch", None),
                            ("decode_cache", DecodeCache(Path(tmp) / "cache", int(size * 1.15)))):
            ds = ManifestDataset(table, y, tf, cache=cache, pre_size=int(size * 1.15))
            loader = make_loader(ds, 16, True, workers, "cpu")
            if cache is not None:
                for _ in loader:  # epoch 1 fills the cache
                    pass
            t0 = time.perf_counter()
            count = sum(len(x) for x, _ in loader)
            rate = count / (time.perf_counter() - t0)
            out[name] = {"img_s": round(rate, 1), "vs_model_consumption": round(rate / consume_img_s, 2)}
        out["cache_speedup"] = round(out["decode_cache"]["img_s"] / out["decode_every_epoch"]["img_s"], 2)
        return out


def bench_inference(backbone: str, size: int, n: int) -> dict:
    from fracture_ops.model.pyfunc import FractureClassifier

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table, what = _images(n, tmp)
        model = build_model(backbone, "binary", 1, quiet=True).eval()
        info = {"task": "binary", "class_names": ["fracture"], "backbone": backbone}
        torch.save({"state_dict": model.state_dict(), "info": info,
                    "transform": {"image_size": size, "pre_size": int(size * 1.15)}}, tmp / "model.pt")
        (tmp / "cal.json").write_text(json.dumps({"calibrator": {"method": "none", "task": "binary"}}))
        (tmp / "th.json").write_text(json.dumps({"thresholds": {"fracture": 0.5}}))
        ctx = SimpleNamespace(artifacts={"model": str(tmp / "model.pt"), "calibration": str(tmp / "cal.json"),
                                         "thresholds": str(tmp / "th.json")})
        py = FractureClassifier()
        py.load_context(ctx)
        frame = pd.DataFrame({"image": table["image_uri"].tolist()})
        py.predict(None, frame.head(2))
        t0 = time.perf_counter()
        py.predict(None, frame)
        pyfunc_rate = len(frame) / (time.perf_counter() - t0)
        x = torch.randn(len(frame), 3, size, size).contiguous(memory_format=torch.channels_last)
        net = py.model
        with torch.inference_mode():
            net(x[:2])
            t0 = time.perf_counter()
            for i in range(0, len(x), 16):
                net(x[i:i + 16])
        bare = len(x) / (time.perf_counter() - t0)
        return {"images": what, "pyfunc_img_s": round(pyfunc_rate, 2), "bare_forward_img_s": round(bare, 2),
                "ratio": round(pyfunc_rate / bare, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.backbone} @ {args.size}px")
    train = bench_train_step(args.backbone, args.size, args.batch, args.batches, args.repeats)
    print(f"[train step]  bare {train['bare_img_s']} img/s  platform {train['platform_img_s']} img/s  "
          f"ratio {train['ratio']} (goal >= 0.9)")
    loader = bench_loader(args.size, args.images, train["platform_img_s"], args.workers)
    print(f"[data loader] {loader['images']} x{loader['n']}: decode every epoch "
          f"{loader['decode_every_epoch']['img_s']} img/s "
          f"({loader['decode_every_epoch']['vs_model_consumption']}x model consumption); "
          f"decode cache {loader['decode_cache']['img_s']} img/s "
          f"({loader['decode_cache']['vs_model_consumption']}x); cache speed-up {loader['cache_speedup']}x")
    inf = bench_inference(args.backbone, args.size, args.images)
    print(f"[inference]   pyfunc predict {inf['pyfunc_img_s']} img/s vs bare forward "
          f"{inf['bare_forward_img_s']} img/s: ratio {inf['ratio']} ({inf['images']})")
    print(json.dumps({"train_step": train, "loader": loader, "inference": inf}))


if __name__ == "__main__":
    main()
