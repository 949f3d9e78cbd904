"""Synthetic radiographs: the embedded default data set for the demo and fast tests.

Each image is a projection through soft tissue and hollow bone shafts (dense cortex around a
lighter medulla), under a varying exposure with quantum-like noise and a laterality marker.
A fracture is a visible discontinuity: an oblique gap across one shaft, often with a small
displacement of the distal fragment; its bounding box is known exactly. Each patient has several
views (AP, LAT), all showing the fracture when the patient has one. Optional body-region classes
(forearm: two shafts, femur: one thick shaft, hand: several thin shafts) and optional DICOM output
with fake PHI in the header (written by :mod:`fracture_ops.data.synthetic_dicom`).

Everything is deterministic by seed: image ``(patient, view)`` draws from its own
``numpy.random.SeedSequence([seed, patient, view])``, so a subset can be regenerated exactly.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fracture_ops import storage
from fracture_ops.data.manifest import BOX_COLUMNS, normalize_manifest

log = logging.getLogger(__name__)

REGIONS = ("forearm", "femur", "hand")
VIEW_NAMES = ("AP", "LAT")


class SynthConfig(BaseModel):
    """Config of the ``synth`` step (a data source, so it writes to ``out_dir``, not a run folder)."""

    model_config = ConfigDict(extra="forbid")
    section: ClassVar[str] = "synth"

    out_dir: str = "data/synthetic"
    n_patients: int = Field(60, ge=2)
    views: list[Literal["AP", "LAT"]] = ["AP", "LAT"]
    image_size: int = Field(192, ge=64, le=2048)
    fracture_prevalence: float = Field(0.45, gt=0, lt=1)
    regions: list[Literal["forearm", "femur", "hand"]] = ["forearm", "femur"]
    bit_depth: Literal[8, 16] = 8
    dicom_fraction: float = Field(0.0, ge=0, le=1)
    seed: int = 0


@dataclass
class Shaft:
    """One bone shaft in image coordinates (pixels)."""

    cx: float
    cy: float
    angle: float  # radians, direction of the long axis
    length: float
    radius: float  # outer radius
    wall: float  # cortex thickness


def _layout(region: str, size: int, rng: np.random.Generator) -> list[Shaft]:
    """Place the shafts of one body region."""
    base = rng.uniform(-0.25, 0.25) + math.pi / 2  # roughly vertical
    s = size
    if region == "femur":
        r = s * rng.uniform(0.085, 0.11)
        return [Shaft(s / 2 + rng.uniform(-.05, .05) * s, s / 2, base, s * 1.6, r, r * rng.uniform(.3, .4))]
    if region == "forearm":
        out, sep = [], s * rng.uniform(0.13, 0.17)
        for k in (-1, 1):
            r = s * rng.uniform(0.045, 0.06)
            dx, dy = -math.sin(base) * sep * k / 2, math.cos(base) * sep * k / 2
            out.append(Shaft(s / 2 + dx, s / 2 + dy, base + rng.uniform(-.04, .04), s * 1.6, r, r * .35))
        return out
    out = []
    for k in range(4):  # hand: four metacarpal-like thin shafts, fanned
        a = base + (k - 1.5) * 0.12
        r = s * rng.uniform(0.028, 0.036)
        out.append(Shaft(s * (0.3 + 0.13 * k), s / 2 + rng.uniform(-.04, .04) * s, a, s * .55, r, r * .4))
    return out


def _shaft_coords(sh: Shaft, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) the shaft axis."""
    ca, sa = math.cos(sh.angle), math.sin(sh.angle)
    dx, dy = xx - sh.cx, yy - sh.cy
    return dx * ca + dy * sa, -dx * sa + dy * ca


def _tube(v: np.ndarray, outer: float, inner: float) -> np.ndarray:
    """Projected thickness of a hollow cylinder: bright cortex edges, lighter medulla."""
    o = np.sqrt(np.clip(outer ** 2 - v ** 2, 0, None))
    i = np.sqrt(np.clip(inner ** 2 - v ** 2, 0, None))
    return (o - 0.75 * i) / outer


def render_image(region: str, fracture: bool, laterality: str, size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """Render one radiograph.

    Returns:
        ``(image, boxes)``: float32 image in [0, 1] (bone bright) and the fracture boxes
        ``(x_min, y_min, x_max, y_max)`` in pixels (empty without a fracture).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shafts = _layout(region, size, rng)
    # soft tissue: a wide rounded slab along the limb
    u0, v0 = _shaft_coords(shafts[0], xx, yy)
    width = size * rng.uniform(0.32, 0.42)
    soft = np.sqrt(np.clip(1 - (v0 / width) ** 2, 0, None)) * rng.uniform(0.8, 1.2)
    bone = np.zeros_like(xx)
    boxes = []
    broken = int(rng.integers(len(shafts))) if fracture else -1
    for k, sh in enumerate(shafts):
        u, v = _shaft_coords(sh, xx, yy)
        inside = np.abs(u) < sh.length / 2
        if k == broken:
            uf = rng.uniform(-0.3, 0.3) * min(sh.length, size)
            tilt = rng.uniform(-0.6, 0.6)
            gap = max(2.0, size * rng.uniform(0.025, 0.04))
            along = (u - uf) * math.cos(tilt) + v * math.sin(tilt)
            shift = rng.uniform(0.15, 0.5) * sh.radius * rng.choice([-1, 1])
            v = np.where(along > 0, v - shift, v)  # displaced distal fragment
            crack = np.abs(along) < gap / 2
            profile = _tube(v, sh.radius, sh.radius - sh.wall) * inside
            mask = crack & (profile > 0)
            profile = np.where(crack, 0.0, profile)
            ys, xs = np.nonzero(mask)
            if len(xs):
                pad = 2.0
                boxes.append((max(0.0, xs.min() - pad), max(0.0, ys.min() - pad),
                              min(size - 1.0, xs.max() + pad), min(size - 1.0, ys.max() + pad)))
        else:
            profile = _tube(v, sh.radius, sh.radius - sh.wall) * inside
        bone = np.maximum(bone, profile)
    attenuation = 0.9 * soft + 1.8 * bone
    exposure = rng.uniform(0.6, 1.5)
    img = 1.0 - np.exp(-attenuation * exposure)
    img = _blur(img, rng.uniform(0.5, 1.2))
    img = img * rng.uniform(0.75, 1.0) + rng.uniform(0.0, 0.08)
    img += rng.normal(0, rng.uniform(0.01, 0.03), img.shape) * np.sqrt(np.clip(img, 0.05, 1))
    mx = int(size * 0.04)
    mx0 = mx if laterality == "L" else size - 3 * mx  # laterality marker: a bright square in a corner
    img[mx:2 * mx, mx0:mx0 + 2 * mx] = 0.95
    return np.clip(img, 0, 1).astype(np.float32), boxes


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma)


def _encode_png(img: np.ndarray, bit_depth: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if bit_depth == 16:
        # 12-bit detector values stored in 16-bit PNG, as many real exports do
        Image.fromarray((img * 4095).round().astype(np.uint16)).save(buf, format="PNG")
    else:
        Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def generate(cfg: SynthConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate the data set into ``cfg.out_dir``; returns ``(manifest, boxes)``."""
    from fracture_ops.cli_common import progress

    rows, box_rows = [], []
    out = cfg.out_dir
    prng = np.random.default_rng(cfg.seed)
    n_pos = int(round(cfg.n_patients * cfg.fracture_prevalence))
    fractured = np.zeros(cfg.n_patients, bool)
    fractured[prng.permutation(cfg.n_patients)[:n_pos]] = True
    for p in progress(range(cfg.n_patients), "synth", total=cfg.n_patients):
        patient_rng = np.random.default_rng([cfg.seed, p])
        region = cfg.regions[int(patient_rng.integers(len(cfg.regions)))]
        laterality = "L" if patient_rng.random() < 0.5 else "R"
        as_dicom = patient_rng.random() < cfg.dicom_fraction
        phi = _fake_phi(patient_rng) if as_dicom else None
        for v, view in enumerate(cfg.views):
            rng = np.random.default_rng([cfg.seed, p, v])
            img, boxes = render_image(region, bool(fractured[p]), laterality, cfg.image_size, rng)
            image_id = f"syn{p:05d}_{view}"
            uri = _write(out, image_id, img, cfg, phi, rng)
            rows.append({"image_id": image_id, "image_uri": uri, "patient_id": f"SYN{p:05d}",
                         "study_id": f"SYN{p:05d}-S1", "label": "fracture" if boxes else "normal",
                         "view": view, "laterality": laterality, "body_region": region,
                         "source": "synthetic"})
            box_rows += [dict(zip(BOX_COLUMNS, (image_id, "fracture", *b, float(cfg.image_size),
                                                float(cfg.image_size)))) for b in boxes]
    manifest = normalize_manifest(pd.DataFrame(rows))
    boxes = pd.DataFrame(box_rows, columns=BOX_COLUMNS)
    return manifest, boxes


def _fake_phi(rng: np.random.Generator) -> dict:
    from fracture_ops.data.synthetic_dicom import fake_patient

    return fake_patient(rng)


def _write(out: str, image_id: str, img: np.ndarray, cfg: SynthConfig, phi: dict | None,
           rng: np.random.Generator) -> str:
    if phi is None:
        uri = storage.join(out, "images", f"{image_id}.png")
        storage.write_bytes(uri, _encode_png(img, cfg.bit_depth))
        return uri
    from fracture_ops.data.synthetic_dicom import write_phi_dicom

    uri = storage.join(out, "images", f"{image_id}.dcm")
    with _LocalTarget(uri) as path:
        write_phi_dicom(path, (img * 4095).round().astype(np.uint16), seed=int(rng.integers(2**31)), **phi)
    return uri


class _LocalTarget:
    """A local path to write ``uri`` through: the path itself, or a temporary file uploaded to S3."""

    def __init__(self, uri: str):
        import tempfile

        self.uri = uri
        self.dir = tempfile.TemporaryDirectory() if storage.is_s3(uri) else None

    def __enter__(self) -> Path:
        self.path = Path(self.dir.name) / "image.dcm" if self.dir else Path(self.uri)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc) -> None:
        if self.dir is not None:
            if exc[0] is None:
                storage.write_bytes(self.uri, self.path.read_bytes())
            self.dir.cleanup()


def _refuse_foreign_folder(out_dir: str) -> None:
    """A rerun replaces an earlier synthetic data set, but never wipes any other folder."""
    folder = Path(out_dir)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "manifest.csv").exists():
        from fracture_ops.errors import ConfigError

        raise ConfigError(f"synth: {out_dir} is not empty and holds no earlier synthetic data set; "
                          "choose an empty or new folder")


def synth_step(cfg: SynthConfig) -> dict:
    """Write images, ``manifest.csv`` (generic-CSV layout), ``manifest.parquet`` and boxes."""
    if not storage.is_s3(cfg.out_dir):
        _refuse_foreign_folder(cfg.out_dir)
        storage.reset_dir(cfg.out_dir)
    manifest, boxes = generate(cfg)
    csv_rows = manifest.copy()
    local = not storage.is_s3(cfg.out_dir)
    if local:  # relative URIs keep the folder relocatable
        csv_rows["image_uri"] = [str(Path(u).relative_to(cfg.out_dir)) for u in csv_rows["image_uri"]]
    storage.write_text(storage.join(cfg.out_dir, "manifest.csv"), csv_rows.to_csv(index=False))
    storage.write_text(storage.join(cfg.out_dir, "boxes.csv"), boxes.to_csv(index=False))
    storage.write_parquet(storage.join(cfg.out_dir, "manifest.parquet"), manifest)
    storage.write_parquet(storage.join(cfg.out_dir, "boxes.parquet"), boxes)
    summary = {"out_dir": cfg.out_dir, "manifest_csv": storage.join(cfg.out_dir, "manifest.csv"),
               "images": len(manifest), "patients": int(manifest["patient_id"].nunique()),
               "fracture_images": int((manifest["label"] == "fracture").sum()), "boxes": len(boxes)}
    storage.mark_success(cfg.out_dir, summary)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops synth [OUT_DIR] --patients N --size S``."""
    parser.add_argument("out_dir", nargs="?", help="output folder (default data/synthetic)")
    parser.add_argument("--patients", type=int, help="number of patients (default 60)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 192)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--dicom-fraction", type=float, help="share of patients written as DICOM with fake PHI")
    parser.add_argument("--regions", help="comma-separated body regions: forearm,femur,hand")
    parser.add_argument("--config", metavar="YAML", help="config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run_cli(args: argparse.Namespace) -> dict:
    """Run the synth step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    regions = args.regions.split(",") if args.regions else None
    cfg = config_from_args(SynthConfig, args, out_dir=args.out_dir, n_patients=args.patients,
                           image_size=args.size, seed=args.seed, dicom_fraction=args.dicom_fraction,
                           regions=regions)
    return synth_step(cfg)
