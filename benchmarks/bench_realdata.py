"""Benchmark: the platform's training recipes against a plain timm loop, on real radiographs.

On the FracAtlas subset in ``../shared/realdata/fracatlas`` (300 images, half fractured; FracAtlas
has no patient ids, so each image is its own patient; an image the platform's decode policy
rejects, as the validate step would, is left out of every arm), every arm is cross-validated on
the same 5 patient-grouped, label-stratified folds (the ``cv`` step's own :func:`assign_folds`)
with the same CPU threads. Four arms, two of each kind at the same size and epochs:

- ``plain``: the 40-line loop a user writes first (:func:`plain_fold`): resnet18 from scratch,
  images squashed to a square, horizontal flip, AdamW lr 1e-3, cosine over the epochs, batch 16,
  BCE, the last epoch's weights (160 px, 15 epochs by default);
- ``platform``: ``fracture-ops cv`` (:func:`fracture_ops.workflows.cv.cv_step`) from scratch with
  the flags of :data:`SMALL_DATA_RECIPE` (it also gets FracAtlas' fracture boxes, for box
  supervision);
- ``plain_pretrained``: the same plain loop fine-tuning tf_efficientnet_lite0 from the ImageNet
  weights installed with the package (``pkg:efficientnet-lite0``; 320 px, 4 epochs by default);
- ``platform_pretrained``: ``cv`` from the same weights with :data:`PRETRAINED_RECIPE`.

Every arm's out-of-fold predictions are pooled over the folds and scored the same way (AUROC with
a bootstrap 95% interval over images; the differences the goals read with paired intervals).
Goals (exit 1 where one is not met): the pretrained platform >= 0.80, >= the pretrained plain loop
+ 0.02, >= the platform from scratch + 0.06.

A reference is printed beside them (seconds of work, not part of the goal): a logistic regression
on image statistics alone (width, height, aspect ratio, colour mode, grey-level mean and spread;
:func:`stats_fold`) on the same folds. It cannot see a fracture; on this subset it scores about
0.7, so an arm near it has learnt little that a fracture-blind model does not know.

On 2 CPU cores: the from-scratch arms take 7 to 14 minutes each, the pretrained arms about as
long (see docs/benchmarks.md for the measured times). ``--only ARM ...`` runs some arms (screens);
``--set``/``--set-pretrained FIELD=VALUE`` change a platform recipe. Run:
``python benchmarks/bench_realdata.py``.
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


def load_square(uri: str, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """The plain loop's preprocessing: greyscale, squashed to size x size, 3 channels,
    normalised as the weights expect (ImageNet's mean/std; the Lite weights' 0.5/0.5)."""
    with lenient_open(uri) as im:
        a = grey(im, size)
    return ((np.repeat(a[None], 3, axis=0) - mean) / std).astype(np.float32)


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
               seed: int, batch: int = 16, lr: float = 1e-3, pretrained: bool = False) -> np.ndarray:
    """The plain loop: resnet18 from scratch (or, ``pretrained``, tf_efficientnet_lite0 from the
    ImageNet weights installed with the package, the platform's converted file), AdamW, cosine
    per epoch, hflip, last epoch."""
    import timm
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if pretrained:
        from fracture_ops.model.network import resolve_pretrained

        state, _ = resolve_pretrained(PRETRAINED_WEIGHTS, PRETRAINED_BACKBONE)
        model = timm.create_model(PRETRAINED_BACKBONE, pretrained=False, num_classes=1)
        # the plain loop keeps timm's own initialisation of the new one-logit head
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")},
                              strict=False)
    else:
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


def auroc_ci(y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int, seed: int,
             pairs: dict[str, tuple[str, str]] | None = None) -> dict:
    """AUROC per arm, each with a bootstrap 95% interval over images (= patients here), the same
    resamples for every arm (paired), and for each entry ``name: (a, b)`` of ``pairs`` whose arms
    both ran, the difference ``a - b`` with its paired interval."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    pairs = {k: v for k, v in (pairs or {}).items() if set(v) <= scores.keys()}
    point = {k: roc_auc_score(y, s) for k, s in scores.items()}
    boots: dict[str, list[float]] = {k: [] for k in [*scores, *pairs]}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        got = {k: roc_auc_score(y[idx], s[idx]) for k, s in scores.items()}
        for k, v in got.items():
            boots[k].append(v)
        for name, (a, b) in pairs.items():
            boots[name].append(got[a] - got[b])
    for name, (a, b) in pairs.items():
        point[name] = point[a] - point[b]
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


def run_platform(table: pd.DataFrame, boxes: pd.DataFrame, work: Path, args,
                 recipe: dict, image_size: int, epochs: int, screen: list[str]) -> tuple[pd.DataFrame, dict]:
    from fracture_ops import storage
    from fracture_ops.training.train import RECIPE_FLAGS
    from fracture_ops.workflows.cv import CVConfig, cv_step

    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "manifest.parquet"
    table.to_parquet(manifest)
    boxes.to_parquet(work / "boxes.parquet")
    overrides = {**recipe, **dict(kv.split("=", 1) for kv in screen)}
    cfg = CVConfig(split_uri=str(manifest), artifact_root=str(work / "artifacts"),
                   run_id="bench", folds=args.folds,
                   image_size=image_size, epochs=epochs, device="cpu", seed=args.seed,
                   n_bootstrap=200, boxes_uri=str(work / "boxes.parquet"), **overrides)
    summary = cv_step(cfg)
    oof = storage.read_parquet(storage.join(summary["oof_uri"], "predictions.parquet"))
    recipe = cfg.model_dump(include={"batch_size", "lr", "scheduler", "loss", "weights", "folds",
                                     *RECIPE_FLAGS, *overrides})
    return oof, recipe


# the from-scratch platform arm: the recipe flags that measured best here from scratch (see
# docs/benchmarks.md), on top of the cv step's defaults; --set changes them for a screening run
SMALL_DATA_RECIPE = {"backbone": "resnet18", "pretrained_path": "none", "batch_size": 8,
                     "hflip": True, "resize": "squash", "ema_decay": 0.998,
                     "tta_hflip": True, "weight_decay": 0.01, "rotate_limit": 0.0,
                     "brightness_contrast": 0.0, "crop_scale": 1.0, "grad_clip": 0.0,
                     "global_pool": "max", "box_weight": 1.0}
PRETRAINED_BACKBONE = "tf_efficientnet_lite0"
PRETRAINED_WEIGHTS = "pkg:efficientnet-lite0"
# the pretrained platform arm: tf_efficientnet_lite0 from the installed ImageNet weights (the
# train step's default backbone and weights, what the gpu profile and the small-data path start
# from) with the fine-tuning flags below; --set-pretrained changes them for a screen
PRETRAINED_RECIPE = {"backbone": PRETRAINED_BACKBONE, "pretrained_path": PRETRAINED_WEIGHTS,
                     "batch_size": 16, "hflip": True, "tta_hflip": True, "resize": "squash",
                     "backbone_lr_scale": 0.5, "weight_decay": 0.01, "rotate_limit": 0.0,
                     "brightness_contrast": 0.0, "crop_scale": 1.0}


ARMS = ("plain", "platform", "plain_pretrained", "platform_pretrained")
# the differences the goals read, each with its paired bootstrap interval
PAIRS = {"platform - plain (from scratch)": ("platform", "plain"),
         "pretrained platform - pretrained plain": ("platform_pretrained", "plain_pretrained"),
         "pretrained platform - platform from scratch": ("platform_pretrained", "platform")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=160, help="the from-scratch arms' size")
    parser.add_argument("--epochs", type=int, default=15, help="the from-scratch arms' epochs")
    parser.add_argument("--pretrained-size", type=int, default=320,
                        help="the pretrained arms' size")
    parser.add_argument("--pretrained-epochs", type=int, default=4,
                        help="the pretrained arms' epochs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--goal", type=float, default=0.80,
                        help="the pretrained platform's pooled AUROC goal")
    parser.add_argument("--margin-plain", type=float, default=0.02,
                        help="goal: pretrained platform >= pretrained plain loop + this")
    parser.add_argument("--margin-scratch", type=float, default=0.06,
                        help="goal: pretrained platform >= platform from scratch + this")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--only", nargs="*", choices=ARMS, help="run these arms (screening)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override a from-scratch platform recipe field (screening)")
    parser.add_argument("--set-pretrained", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override a pretrained platform recipe field (screening)")
    args = parser.parse_args(argv)
    if not REALDATA.is_dir():
        print(f"skipped: {REALDATA} is absent (the shared real-data folder)")
        return 0
    import torch

    from fracture_ops.model.outputs import logit_columns
    from fracture_ops.model.pretrained import package
    from fracture_ops.workflows.cv import CVConfig, assign_folds, outcome_strata

    arms = args.only or list(ARMS)
    torch.set_num_threads(args.threads)
    table, boxes, bad = fracatlas_manifest(REALDATA)
    for reason in bad:
        print(f"left out of every arm (the validate step quarantines it): {reason}")
    y = (table["label"] == "fracture").to_numpy(int)
    cfg = CVConfig(split_uri="x", folds=args.folds, seed=args.seed)
    fold = assign_folds(table, outcome_strata(table, cfg), args.folds, args.seed)
    pkg = package(PRETRAINED_WEIGHTS)
    print(f"{len(table)} FracAtlas images ({y.sum()} fractured), {args.folds} folds, "
          f"{args.threads} threads; from scratch: resnet18, {args.image_size} px, {args.epochs} "
          f"epochs; pretrained: {PRETRAINED_BACKBONE} from {PRETRAINED_WEIGHTS} "
          f"({pkg.distribution}, {pkg.license}, sha256 {pkg.sha256[:12]}), "
          f"{args.pretrained_size} px, {args.pretrained_epochs} epochs", flush=True)
    scores, walls = {}, {}
    # the reference: how far image size, aspect ratio and brightness alone go on these folds
    reference = reference_scores(np.array([image_stats(u) for u in table["image_uri"]]), y, fold)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        os.environ.setdefault("FRACTURE_OPS_CACHE_DIR", f"{tmp}/cache")
        for arm in ARMS:
            if arm not in arms:
                continue
            pretrained = arm.endswith("_pretrained")
            size = args.pretrained_size if pretrained else args.image_size
            epochs = args.pretrained_epochs if pretrained else args.epochs
            t0 = time.perf_counter()
            if arm.startswith("plain"):
                mean, std = ((np.array(pkg.mean, np.float32)[:, None, None],
                              np.array(pkg.std, np.float32)[:, None, None]) if pretrained
                             else (IMAGENET_MEAN, IMAGENET_STD))
                x = np.stack([load_square(u, size, mean, std) for u in table["image_uri"]])
                out = np.zeros(len(table))
                for k in range(args.folds):
                    held = fold == k
                    out[held] = plain_fold(x[~held], y[~held], x[held], epochs, args.seed + k,
                                           pretrained=pretrained)
                del x
            else:
                recipe = PRETRAINED_RECIPE if pretrained else SMALL_DATA_RECIPE
                oof, used = run_platform(table, boxes, Path(tmp) / arm, args, recipe, size, epochs,
                                         args.set_pretrained if pretrained else args.set)
                oof = oof.set_index("image_id").loc[table["image_id"]]
                if not (oof["fold"].to_numpy() - 1 == fold).all():
                    sys.exit("the platform's folds differ from the plain loop's")
                out = oof[logit_columns(["fracture"])[0]].to_numpy()
                print(f"{arm} recipe: {used}")
            walls[arm], scores[arm] = time.perf_counter() - t0, out
            print(f"{arm}: {walls[arm]:.0f} s", flush=True)
    from sklearn.metrics import roc_auc_score

    ref = auroc_ci(y, {"reference": reference}, args.n_boot, args.seed)["reference"]
    print(f"reference, image statistics only (size, aspect ratio, colour mode, grey-level mean "
          f"and spread; logistic regression, same folds): pooled AUROC {ref[0]:.3f} (95% CI "
          f"{ref[1]:.3f} .. {ref[2]:.3f}): what a model scores here without seeing a fracture")
    for name, s in scores.items():
        per_fold = [roc_auc_score(y[fold == k], s[fold == k]) for k in range(args.folds)]
        print(f"{name}: per-fold AUROC {' '.join(f'{a:.3f}' for a in per_fold)} (mean "
              f"{np.mean(per_fold):.3f}), pooled {roc_auc_score(y, s):.3f}")
    res = auroc_ci(y, scores, args.n_boot, args.seed, PAIRS)
    for name, (p, lo, hi) in res.items():
        label = name if name in PAIRS else f"{name} pooled out-of-fold AUROC"
        print(f"{label:48s} {p:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f})" if name in PAIRS
              else f"{label:48s} {p:.3f} (95% CI {lo:.3f} .. {hi:.3f})")
    base = walls.get("plain_pretrained") or walls.get("plain")
    if base:
        print("wall (ratio to the plain loop of the same weights): " + ", ".join(
            f"{k} {v:.0f} s ({v / (walls.get('plain_pretrained' if k.endswith('_pretrained') else 'plain') or v):.2f}x)"
            for k, v in walls.items()))
    if "platform_pretrained" not in res:
        return 0
    goals = {f"pretrained platform >= {args.goal}": res["platform_pretrained"][0] >= args.goal}
    if "pretrained platform - pretrained plain" in res:
        goals[f"pretrained platform >= pretrained plain + {args.margin_plain}"] = \
            res["pretrained platform - pretrained plain"][0] >= args.margin_plain
    if "pretrained platform - platform from scratch" in res:
        goals[f"pretrained platform >= platform from scratch + {args.margin_scratch}"] = \
            res["pretrained platform - platform from scratch"][0] >= args.margin_scratch
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT MET'}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
