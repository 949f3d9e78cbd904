"""Training and inference throughput against bare baselines, in the same run.

1. Training step: the platform loop (``train_one_epoch``: channels-last, gradient clipping, AMP
   hooks, scheduler) versus a bare timm + torch loop on the same tensors. Goal: ratio >= 0.9.
2. Data loading: images/s the loader delivers (decoding every epoch, and from the decode cache)
   versus images/s the model consumes in training, on real FracAtlas JPEGs when present.
3. Batch inference: the pyfunc model's ``predict`` on image files (decode, preprocess,
   transform, forward, calibration, thresholds) versus a bare forward pass over the same images
   already decoded and transformed (goal: ratio >= 0.8; probabilities checked equal), and versus
   the loop a user writes by hand (PIL open, convert, resize, forward, batch of 32; goal >= 1.5),
   on real FracAtlas JPEGs when present.

The exit status is 1 when a goal is not met (``--no-goals``: print only).

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


def _clean_jpegs(n: int) -> list[str]:
    """The first ``n`` FracAtlas JPEGs that Pillow decodes as they are (a hand-written loop
    fails on the few truncated ones; every arm scores the same files)."""
    from PIL import Image

    out = []
    for path in sorted((REALDATA / "fracatlas" / "images").rglob("*.jpg")) if REALDATA.is_dir() else []:
        try:
            with Image.open(path) as im:
                im.load()
        except OSError:
            continue
        out.append(str(path))
        if len(out) == n:
            break
    return out


def hand_loop(model, uris: list[str], size: int, batch: int = 32) -> np.ndarray:
    """What a user writes by hand: PIL open, convert to gray, resize, normalise, forward in
    batches of 32."""
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    out = []
    with torch.inference_mode():
        for i in range(0, len(uris), batch):
            xs = []
            for uri in uris[i:i + batch]:
                with Image.open(uri) as im:
                    a = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), np.float32)
                xs.append((torch.from_numpy(a / 255.0).expand(3, -1, -1) - mean) / std)
            out.append(model(torch.stack(xs)).float().numpy())
    return np.concatenate(out)


def bench_inference(backbone: str, size: int, n: int, repeats: int) -> dict:
    """The packaged model's ``predict`` on image files, against (a) a bare forward pass over the
    same images already decoded and transformed by the model's own transform (the ceiling), and
    (b) the hand-written decode + resize + forward loop, on the same files, same threads."""
    from fracture_ops.model.pyfunc import BATCH_SIZE, FractureClassifier

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uris = _clean_jpegs(n)
        what = "FracAtlas JPEGs"
        if not uris:
            table, what = _images(n, tmp)
            uris = table["image_uri"].astype(str).tolist()
        model = build_model(backbone, "binary", 1, quiet=True).eval()
        info = {"task": "binary", "class_names": ["fracture"], "backbone": backbone}
        torch.save({"state_dict": model.state_dict(), "info": info,
                    "transform": {"image_size": size, "pre_size": int(size * 1.15), "jpeg_draft": True}},
                   tmp / "model.pt")
        (tmp / "cal.json").write_text(json.dumps({"calibrator": {"method": "none", "task": "binary"}}))
        (tmp / "th.json").write_text(json.dumps({"thresholds": {"fracture": 0.5}}))
        ctx = SimpleNamespace(artifacts={"model": str(tmp / "model.pt"), "calibration": str(tmp / "cal.json"),
                                         "thresholds": str(tmp / "th.json")})
        py = FractureClassifier()
        py.load_context(ctx)
        net = py.model
        frame = pd.DataFrame({"image": uris})
        # the bare arm's input: the same files, decoded and transformed by the model's own code
        x = torch.stack([py.transform(py._load(u)[0])["image"] for u in uris])
        x = x.contiguous(memory_format=torch.channels_last)

        def bare() -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([net(x[i:i + BATCH_SIZE]).float().numpy()
                                       for i in range(0, len(x), BATCH_SIZE)])

        arms = {"pyfunc": lambda: py.predict(None, frame), "bare": bare,
                "hand": lambda: hand_loop(net, uris, size)}
        for fn in arms.values():  # warm-up (first-call allocations, file cache)
            fn()
        times = {k: [] for k in arms}
        outputs = {}
        for _ in range(repeats):  # alternate so drift in machine load hits every arm alike
            for name, fn in arms.items():
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
        probs = outputs["pyfunc"]["prob_fracture"].to_numpy()
        if outputs["pyfunc"]["error"].notna().any():
            raise SystemExit("inference bench: the packaged model could not read some images")
        diff = float(np.abs(probs - 1 / (1 + np.exp(-outputs["bare"][:, 0]))).max())
        if diff > 1e-5:
            raise SystemExit(f"inference bench: predict and the bare forward disagree by {diff:.2g}")
        rate = {k: len(uris) / statistics.median(v) for k, v in times.items()}
        return {"images": what, "n": len(uris), "max_prob_diff_vs_bare": diff,
                **{f"{k}_img_s": round(v, 2) for k, v in rate.items()},
                "ratio_vs_bare": round(rate["pyfunc"] / rate["bare"], 3),
                "ratio_vs_hand": round(rate["pyfunc"] / rate["hand"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-goals", action="store_true", help="print the figures; exit 0 whatever they are")
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
    inf = bench_inference(args.backbone, args.size, args.images, args.repeats)
    print(f"[inference]   {inf['images']} x{inf['n']}: pyfunc predict {inf['pyfunc_img_s']} img/s; "
          f"bare forward on ready tensors {inf['bare_img_s']} img/s: ratio {inf['ratio_vs_bare']} "
          f"(goal >= 0.8); hand-written PIL decode+resize+forward {inf['hand_img_s']} img/s: "
          f"ratio {inf['ratio_vs_hand']} (goal >= 1.5)")
    print(json.dumps({"train_step": train, "loader": loader, "inference": inf}))
    missed = [name for name, ok in (("train step >= 0.9x bare", train["ratio"] >= 0.9),
                                    ("predict >= 0.8x bare forward", inf["ratio_vs_bare"] >= 0.8),
                                    ("predict >= 1.5x hand loop", inf["ratio_vs_hand"] >= 1.5)) if not ok]
    if missed and not args.no_goals:
        print("goals not met: " + "; ".join(missed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
