"""Benchmark: DICOM de-identification throughput, fracture-ops versus dicognito on the same files.

What is measured (CPU, this machine; run ``python benchmarks/bench_deid.py``, < 2 minutes):
read + de-identify + write, file by file, over the 7 real pseudo-PHI DICOMs in
``../shared/realdata/dicom`` (when present) plus N synthetic PHI DICOMs (default 200 of 512x512):

- ours: :func:`fracture_ops.data.deid.deidentify_dicom_bytes` (PS3.15 Annex E table over every
  element and sequence, HMAC UIDs, date shift, new file meta);
- ours (folder mode): :func:`deidentify_folder`, i.e. the same plus file naming, audit log and
  report, as the CLI runs it;
- dicognito 0.19: ``Anonymizer(seed=...).anonymize(ds)`` between ``dcmread`` and ``save_as``.

Each output is checked (patient name replaced, pixels unchanged) so a fast wrong result fails the
benchmark. Prints files/s (best of ``--repeat`` interleaved runs) and the ratio ours/dicognito
(> 1: we are faster).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom

from fracture_ops.data.deid import DeidConfig, deidentify_dicom_bytes, deidentify_folder, load_keys
from fracture_ops.data.synthetic_dicom import fake_patient, write_phi_dicom

os.environ.setdefault("FRACTURE_OPS_NO_PROGRESS", "1")
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "dicom" / "dicom_files"


def make_inputs(folder: Path, n: int, size: int) -> list[Path]:
    """N synthetic PHI DICOMs plus copies of the real ones (when available) in ``folder``."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = folder / f"synthetic_{i:04d}.dcm"
        pixels = rng.integers(0, 4096, (size, size), dtype=np.uint16)
        write_phi_dicom(path, pixels, **fake_patient(rng), seed=i)
        files.append(path)
    for src in sorted(REAL.glob("*.dcm")) if REAL.is_dir() else []:
        dst = folder / f"real_{len(files):04d}.dcm"  # no PHI-bearing names in the bench folder
        dst.write_bytes(src.read_bytes())
        files.append(dst)
    return files


def run_ours(files: list[Path], out: Path) -> None:
    cfg = DeidConfig(allow_dev_secret=True)
    keys = load_keys(cfg)
    for i, path in enumerate(files):
        data, _ = deidentify_dicom_bytes(path.read_bytes(), keys, cfg)
        (out / f"{i:05d}.dcm").write_bytes(data)


def run_ours_folder(files: list[Path], out: Path) -> None:
    deidentify_folder(str(files[0].parent), str(out / "folder"), DeidConfig(
        allow_dev_secret=True, artifact_root=str(out)))


def run_dicognito(files: list[Path], out: Path) -> None:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="bench-seed")
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(out / f"{i:05d}.dcm")


def check_outputs(files: list[Path], out: Path, label: str) -> None:
    """Every output must have a replaced patient name and unchanged pixel data."""
    for i, path in enumerate(files):
        src, res = pydicom.dcmread(path), pydicom.dcmread(out / f"{i:05d}.dcm")
        if str(res.PatientName) == str(src.PatientName) or res.PixelData != src.PixelData:
            sys.exit(f"{label}: output {i} is not de-identified correctly")


def time_interleaved(methods: dict, files: list[Path], repeat: int, tmp: str) -> dict[str, float]:
    """Best seconds per method; repeats are interleaved so load drift hits every method alike."""
    best = dict.fromkeys(methods, float("inf"))
    for label, fn in methods.items():
        fn(files[:2], Path(tempfile.mkdtemp(prefix="warm_", dir=tmp)))  # warm imports and caches
    for _ in range(repeat):
        for label, fn in methods.items():
            out = Path(tempfile.mkdtemp(prefix="out_", dir=tmp))
            t0 = time.perf_counter()
            fn(files, out)
            best[label] = min(best[label], time.perf_counter() - t0)
            if fn is not run_ours_folder:
                check_outputs(files, out, label)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-synthetic", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="synthetic image side (pixels)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.pop("FRACTURE_OPS_DEID_SECRET", None)  # the dev secret is fine for a benchmark
    logging.getLogger("fracture_ops.data.deid").setLevel(logging.ERROR)  # quiet dev-secret warning
    warnings.filterwarnings("ignore", category=UserWarning)  # dicognito probes retired keywords
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        files = make_inputs(inputs, args.n_synthetic, args.size)
        n_real = sum(f.name.startswith("real_") for f in files)
        print(f"{len(files)} files ({args.n_synthetic} synthetic {args.size}x{args.size}, "
              f"{n_real} real), best of {args.repeat}")
        methods = {"ours": run_ours, "ours (folder mode, with reports)": run_ours_folder,
                   "dicognito 0.19": run_dicognito}
        results = {}
        for label, seconds in time_interleaved(methods, files, args.repeat, tmp).items():
            results[label] = len(files) / seconds
            print(f"  {label:34s} {results[label]:8.1f} files/s  ({seconds:.2f} s)")
        ratio = results["ours"] / results["dicognito 0.19"]
        folder_ratio = results["ours (folder mode, with reports)"] / results["dicognito 0.19"]
        print(f"ratio ours/dicognito: {ratio:.2f}  (folder mode: {folder_ratio:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
