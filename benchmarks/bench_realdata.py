"""Benchmark: the platform's training recipe against a plain timm loop, on real radiographs.

On the FracAtlas subset in ``../shared/realdata/fracatlas`` (300 images, half fractured; FracAtlas
has no patient ids, so each image is its own patient; an image the platform's decode policy
rejects, as the validate step would, is left out of both arms), both arms are cross-validated on the same
5 patient-grouped, label-stratified folds (the ``cv`` step's own :func:`assign_folds`), with the
same backbone (resnet18, from scratch), image size, epoch budget and CPU threads:

- plain: the 40-line loop a user writes first (:func:`plain_fold`): images squashed to a square,
  horizontal flip, AdamW lr 1e-3, cosine over the epochs, batch 16, BCE, the last epoch's weights;
- platform: ``fracture-ops cv`` (:func:`fracture_ops.workflows.cv.cv_step`) with the recipe flags
  of :data:`SMALL_DATA_RECIPE` over the step's defaults (the recipe is printed), writing its
  out-of-fold predictions; it also gets FracAtlas' fracture boxes (``boxes_uri``), for box
  supervision.

Both arms' out-of-fold predictions are pooled over the folds and scored the same way (AUROC with
a patient-bootstrap 95% interval; the difference with a paired bootstrap interval). The exit status
is 1 when the platform is not ahead by ``--margin`` (default 0.05).

A reference is printed beside them (seconds of work, not part of the goal): a logistic regression
on image statistics alone (width, height, aspect ratio, colour mode, grey-level mean and spread;
:func:`stats_fold`) on the same folds. It cannot see a fracture; on this subset it scores about
0.7, so an arm near it has learnt little that a fracture-blind model does not know.

Defaults take 18 to 26 minutes on 2 CPU cores, depending on the machine (160 px, 15 epochs;
measured: plain loop 7 to 11 min, platform 11 to 14 min); ``--image-size 224`` is the size of
the first comparison (about 50 minutes). Run: ``python benchmarks/bench_realdata.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FRACTURE_OPS_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "fracatlas"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


@contextmanager
def lenient_open(uri: str):
    """The image opened with Pillow as a plain loop opens it: a JPEG cut short by a few bytes
    loads (the platform's decode policy reads those too, up to 10% missing). Set only while this
    reads, so the platform's own truncation check sees the files as they are."""
    from PIL import Image, ImageFile

    before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        with Image.open(uri) as im:
            yield im
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def grey(im, size: int) -> np.ndarray:
    """Greyscale, squashed to size x size, in [0, 1]."""
    from PIL import Image

    return np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), np.float32) / 255.0


def load_square(uri: str, size: int) -> np.ndarray:
    """The plain loop's preprocessing: greyscale, squashed to size x size, 3 channels, ImageNet
    normalisation."""
    with lenient_open(uri) as im:
        a = grey(im, size)
    return (np.repeat(a[None], 3, axis=0) - IMAGENET_MEAN) / IMAGENET_STD


def image_stats(uri: str) -> list[float]:
    """What an image says without its anatomy: width, height, aspect ratio, colour mode and the
    mean and spread of its grey levels (the reference arm's features)."""
    with lenient_open(uri) as im:
        (w, h), rgb, a = im.size, float(im.mode == "RGB"), grey(im, 64)
    return [w, h, w / h, rgb, float(a.mean()), float(a.std())]


def stats_fold(x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray) -> np.ndarray:
    """One fold of the reference arm: a logistic regression on :func:`image_stats` (standardised
    on the fold's training rows), scoring the held-out rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return model.fit(x_train, y_train).decision_function(x_held)


def reference_scores(feats: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """The reference arm's out-of-fold scores (:func:`stats_fold` on every fold). It sees no
    fracture, only the image's size, colour mode and brightness, so the AUROC it reaches is what
    a network can score without learning fractures."""
    scores = np.zeros(len(y))
    for k in np.unique(fold):
        held = fold == k
        scores[held] = stats_fold(feats[~held], y[~held], feats[held])
    return scores


def plain_fold(x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray, epochs: int,
               seed: int, batch: int = 16, lr: float = 1e-3) -> np.ndarray:
    """The plain loop: resnet18 from scratch, AdamW, cosine per epoch, hflip, last epoch."""
    import timm
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.float32))[:, None]
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(xt))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            xb = xt[idx].clone()
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            xb[flip] = xb[flip].flip(-1)
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(torch.from_numpy(x_held[i:i + 32]))
                          for i in range(0, len(x_held), 32)]).numpy()[:, 0]


def auroc_ci(y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    """AUROC per arm, each with a bootstrap 95% interval over images (= patients here), the same
    resamples for every arm (paired); with both ``plain`` and ``platform`` also their difference
    (``diff``: platform - plain)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    paired = {"plain", "platform"} <= scores.keys()
    point = {k: roc_auc_score(y, s) for k, s in scores.items()}
    boots: dict[str, list[float]] = {k: [] for k in [*scores, *(["diff"] if paired else [])]}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        got = {k: roc_auc_score(y[idx], s[idx]) for k, s in scores.items()}
        for k, v in got.items():
            boots[k].append(v)
        if paired:
            boots["diff"].append(got["platform"] - got["plain"])
    if paired:
        point["diff"] = point["platform"] - point["plain"]
    return {k: (point[k], *np.percentile(boots[k], [2.5, 97.5])) for k in point}


def fracatlas_manifest(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The subset's manifest without the images the platform's decode policy rejects (the
    validate step quarantines them): both arms train and are scored on the same rows. Returns
    the rows, their fracture boxes (FracAtlas' own annotations) and the reasons of those left
    out."""
    from fracture_ops.data.images import read_image
    from fracture_ops.data.sources import from_fracatlas
    from fracture_ops.errors import ImageDecodeError

    table, boxes, _ = from_fracatlas(str(root))
    table = table.sort_values("image_id").reset_index(drop=True)
    bad = []
    for uri in table["image_uri"]:
        try:
            read_image(uri)
        except ImageDecodeError as exc:
            bad.append(f"{Path(uri).name}: {str(exc).split(': ', 2)[-1]}")
    keep = ~table["image_uri"].map(lambda u: any(b.startswith(Path(u).name + ":") for b in bad))
    table = table[keep].reset_index(drop=True)
    return table, boxes[boxes["image_id"].isin(table["image_id"])].reset_index(drop=True), bad


def run_platform(table: pd.DataFrame, boxes: pd.DataFrame, work: Path,
                 args) -> tuple[pd.DataFrame, dict]:
    from fracture_ops import storage
    from fracture_ops.training.train import RECIPE_FLAGS
    from fracture_ops.workflows.cv import CVConfig, cv_step

    manifest = work / "manifest.parquet"
    table.to_parquet(manifest)
    boxes.to_parquet(work / "boxes.parquet")
    overrides = {"backbone": "resnet18", **SMALL_DATA_RECIPE,
                 **dict(kv.split("=", 1) for kv in args.set)}
    cfg = CVConfig(split_uri=str(manifest), artifact_root=str(work / "artifacts"),
                   run_id="bench", folds=args.folds,
                   image_size=args.image_size, epochs=args.epochs, device="cpu", seed=args.seed,
                   n_bootstrap=200, boxes_uri=str(work / "boxes.parquet"), **overrides)
    summary = cv_step(cfg)
    oof = storage.read_parquet(storage.join(summary["oof_uri"], "predictions.parquet"))
    recipe = cfg.model_dump(include={"batch_size", "lr", "scheduler", "loss", "weights", "folds",
                                     *RECIPE_FLAGS, *overrides})
    return oof, recipe


# the platform arm: the recipe flags that measured best here so far (see the README), on top of
# the cv step's defaults; --set changes them for a screening run
SMALL_DATA_RECIPE = {"batch_size": 8, "hflip": True, "resize": "squash", "ema_decay": 0.998,
                     "tta_hflip": True, "weight_decay": 0.01, "rotate_limit": 0.0,
                     "brightness_contrast": 0.0, "crop_scale": 1.0, "grad_clip": 0.0,
                     "global_pool": "max", "box_weight": 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.05,
                        help="exit 1 unless platform AUROC >= plain AUROC + margin")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--only", choices=["plain", "platform"], help="run one arm (screening)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override a platform recipe field (screening)")
    args = parser.parse_args(argv)
    if not REALDATA.is_dir():
        print(f"skipped: {REALDATA} is absent (the shared real-data folder)")
        return 0
    import torch

    from fracture_ops.model.outputs import logit_columns
    from fracture_ops.workflows.cv import CVConfig, assign_folds, outcome_strata

    torch.set_num_threads(args.threads)
    table, boxes, bad = fracatlas_manifest(REALDATA)
    for reason in bad:
        print(f"left out of both arms (the validate step quarantines it): {reason}")
    y = (table["label"] == "fracture").to_numpy(int)
    cfg = CVConfig(split_uri="x", folds=args.folds, seed=args.seed)
    fold = assign_folds(table, outcome_strata(table, cfg), args.folds, args.seed)
    print(f"{len(table)} FracAtlas images ({y.sum()} fractured), {args.folds} folds, resnet18 "
          f"from scratch, {args.image_size} px, {args.epochs} epochs, {args.threads} threads")
    scores, walls = {}, {}
    # the reference: how far image size, aspect ratio and brightness alone go on these folds
    reference = reference_scores(np.array([image_stats(u) for u in table["image_uri"]]), y, fold)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        if args.only != "platform":
            t0 = time.perf_counter()
            x = np.stack([load_square(u, args.image_size) for u in table["image_uri"]])
            plain = np.zeros(len(table))
            for k in range(args.folds):
                held = fold == k
                plain[held] = plain_fold(x[~held], y[~held], x[held], args.epochs, args.seed + k)
            walls["plain"], scores["plain"] = time.perf_counter() - t0, plain
            print(f"plain loop: {walls['plain']:.0f} s")
        if args.only != "plain":
            t0 = time.perf_counter()
            oof, recipe = run_platform(table, boxes, Path(tmp), args)
            walls["platform"] = time.perf_counter() - t0
            oof = oof.set_index("image_id").loc[table["image_id"]]
            ofold = oof["fold"].to_numpy() - 1
            if not (ofold == fold).all():
                sys.exit("the platform's folds differ from the plain loop's")
            scores["platform"] = oof[logit_columns(["fracture"])[0]].to_numpy()
            print(f"platform recipe: {recipe}\nplatform: {walls['platform']:.0f} s")
    from sklearn.metrics import roc_auc_score

    ref = auroc_ci(y, {"reference": reference}, args.n_boot, args.seed)["reference"]
    print(f"reference, image statistics only (size, aspect ratio, colour mode, grey-level mean "
          f"and spread; logistic regression, same folds): pooled AUROC {ref[0]:.3f} (95% CI "
          f"{ref[1]:.3f} .. {ref[2]:.3f}): what a model scores here without seeing a fracture")
    for name, s in scores.items():
        per_fold = [roc_auc_score(y[fold == k], s[fold == k]) for k in range(args.folds)]
        print(f"{name}: per-fold AUROC {' '.join(f'{a:.3f}' for a in per_fold)} (mean "
              f"{np.mean(per_fold):.3f}), pooled {roc_auc_score(y, s):.3f}")
    if len(scores) == 1:
        return 0
    res = auroc_ci(y, scores, args.n_boot, args.seed)
    for name in ("plain", "platform", "diff"):
        p, lo, hi = res[name]
        label = {"diff": "platform - plain"}.get(name, f"{name} pooled out-of-fold AUROC")
        print(f"{label:40s} {p:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f})" if name == "diff"
              else f"{label:40s} {p:.3f} (95% CI {lo:.3f} .. {hi:.3f})")
    ok = res["diff"][0] >= args.margin
    print(f"wall: plain {walls['plain']:.0f} s, platform {walls['platform']:.0f} s "
          f"(ratio {walls['platform'] / walls['plain']:.2f}); goal platform >= plain + "
          f"{args.margin}: {'met' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
