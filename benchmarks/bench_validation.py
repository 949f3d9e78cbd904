"""Benchmark: cost of the ``validate`` step's checks, against plain-code baselines in the same run.

What is measured (CPU, this machine; run ``python benchmarks/bench_validation.py``, < 2 minutes):

1. Manifest table checks on a 20,000-row manifest with ~1 % injected faults:
   :func:`validate_manifest_table` (the Great Expectations suite, warm: GX imported and one run
   done before timing) versus the same checks written as pandas boolean masks. Both must flag the
   same rows with the same reasons, or the benchmark fails: a fast wrong baseline proves nothing.
2. Image checks on N tiny PNGs (default 400 images of 64x64, not 20,000 full radiographs):
   :func:`check_images` (read_image + size/bit-depth/blank/hash, thread pool) versus a sequential
   Pillow decode + ``std`` loop, i.e. the floor that any image check has to pay.

Prints seconds (best of ``--repeat``) and ratios (validation / baseline).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fracture_ops.data.validation import ValidateConfig, check_images, validate_manifest_table

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # read when GX is first imported (lazily)
os.environ.setdefault("FRACTURE_OPS_NO_PROGRESS", "1")


def make_manifest(n: int, seed: int = 0) -> pd.DataFrame:
    """A canonical manifest with ~1 % of rows broken in one of six ways."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "image_id": [f"img{i:06d}" for i in range(n)],
        "image_uri": [f"/data/img{i:06d}.png" for i in range(n)],
        "patient_id": [f"P{i // 3:05d}" for i in range(n)],
        "study_id": [f"S{i // 3:05d}" for i in range(n)],
        "label": np.where(rng.random(n) < 0.3, "fracture", "normal").astype(object),
        "view": rng.choice(["AP", "LAT", "OBL"], n).astype(object),
        "laterality": rng.choice(["L", "R"], n).astype(object),
        "body_region": "wrist", "source": "bench",
    })
    bad = rng.choice(n, size=n // 100, replace=False)
    for k, i in enumerate(bad):
        kind = k % 6
        if kind == 0:
            df.at[i, "patient_id"] = None
        elif kind == 1:
            df.at[i, "patient_id"] = "has space"
        elif kind == 2:
            df.at[i, "label"] = "maybe"
        elif kind == 3:
            df.at[i, "image_id"] = df.at[(i + 1) % n, "image_id"]
        elif kind == 4:
            df.at[i, "view"] = "SIDEWAYS"
        else:
            df.at[i, "laterality"] = "X"
    return df


def pandas_baseline(df: pd.DataFrame, cfg: ValidateConfig) -> dict[int, set[str]]:
    """The row-level checks of the GX suite, as pandas masks (the baseline)."""
    pid = df["patient_id"]
    masks = {
        "missing_image_id": df["image_id"].isna(),
        "missing_image_uri": df["image_uri"].isna(),
        "missing_patient_id": pid.isna(),
        "missing_label": df["label"].isna(),
        "duplicate_image_id": df["image_id"].duplicated(keep=False) & df["image_id"].notna(),
        "malformed_patient_id": pid.notna() & ~pid.astype(str).str.match(
            re.compile(cfg.patient_id_regex)),
        "unknown_label": df["label"].notna() & ~df["label"].isin(cfg.allowed_labels),
        "unknown_view": df["view"].notna() & ~df["view"].isin(cfg.allowed_views),
        "unknown_laterality": df["laterality"].notna() & ~df["laterality"].isin(
            cfg.allowed_lateralities),
    }
    for col in df.columns:  # type check: every non-null value a str
        masks.setdefault("bad_type", pd.Series(False, index=df.index))
        masks["bad_type"] |= df[col].notna() & ~df[col].map(lambda v: isinstance(v, str))
    out: dict[int, set[str]] = {}
    for reason, mask in masks.items():
        for i in np.flatnonzero(mask.to_numpy()):
            out.setdefault(int(i), set()).add(reason)
    prevalence = df["label"].value_counts(normalize=True)  # the table-level check
    _ = {lbl: cfg.min_prevalence <= prevalence.get(lbl, 0) <= cfg.max_prevalence
         for lbl in cfg.allowed_labels}
    return out


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_table(n: int, repeat: int) -> None:
    df = make_manifest(n)
    cfg = ValidateConfig(manifest_uri="unused")
    t0 = time.perf_counter()
    validate_manifest_table(df.head(50), cfg)  # warm-up: GX import and first context
    print(f"GX import + first run (50 rows): {time.perf_counter() - t0:.2f} s (paid once)")
    t_gx, res = best_of(lambda: validate_manifest_table(df, cfg), repeat)
    t_pd, base = best_of(lambda: pandas_baseline(df, cfg), repeat)
    gx_rows = {i: set(r) for i, r in res.failures.reasons.items()}
    if gx_rows != base:
        raise SystemExit(f"MISMATCH: GX flags {len(gx_rows)} rows, baseline {len(base)}")
    print(f"table checks, {n} rows ({len(base)} flagged, identical in both):")
    print(f"  great-expectations suite  {t_gx:8.3f} s")
    print(f"  pandas masks (baseline)   {t_pd:8.3f} s")
    print(f"  ratio GX / pandas         {t_gx / t_pd:8.1f} x")


def bench_images(n_images: int, size: int, workers: int, repeat: int) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(1)
        uris = []
        for i in range(n_images):
            path = Path(tmp) / f"i{i}.png"
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
            uris.append(str(path))
        df = pd.DataFrame({"image_id": [f"i{i}" for i in range(n_images)], "image_uri": uris,
                           "patient_id": [f"p{i}" for i in range(n_images)], "label": "normal"})
        cfg = ValidateConfig(manifest_uri="unused", workers=workers)

        def baseline():
            return [float(np.asarray(Image.open(u), dtype=np.float32).std()) for u in uris]

        t_val, res = best_of(lambda: check_images(df, cfg), repeat)
        t_pil, _ = best_of(baseline, repeat)
    assert not res.failures.reasons, res.failures.reasons
    print(f"image checks, {n_images} PNGs of {size}x{size} px, {workers} worker thread(s):")
    print(f"  check_images              {t_val:8.3f} s  ({n_images / t_val:7.0f} img/s)")
    print(f"  PIL decode + std (base)   {t_pil:8.3f} s  ({n_images / t_pil:7.0f} img/s)")
    print(f"  ratio check / baseline    {t_val / t_pil:8.2f} x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    bench_table(a.rows, a.repeat)
    bench_images(a.images, a.size, a.workers, a.repeat)


if __name__ == "__main__":
    main()
