"""``make demo``: the training pipeline end to end on synthetic data, on this machine.

Generates the synthetic data set (a quarter of the patients as DICOM with fake PHI, so the
de-identification step has work), then runs every step of the training pipeline with the local
runner, exactly the commands the Airflow DAG runs, and prints where the outputs are.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fracture_ops.orchestration.local_runner import StepFailed, run_step
from fracture_ops.orchestration.params import defaults
from fracture_ops.orchestration.specs import TRAINING_STEPS, run_folder

DATA_STEPS = ["ingest", "validate", "deidentify", "split"]
MODEL_STEPS = ["train", "calibrate", "tune_thresholds", "evaluate", "cam", "package"]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    ap = argparse.ArgumentParser(prog="fracture_ops.orchestration.demo", description=__doc__)
    ap.add_argument("--root", default="data/demo", help="demo folder (default data/demo)")
    ap.add_argument("--run-id", default="demo")
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--data-only", action="store_true", help="stop after the split")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(args.root).resolve()
    from fracture_ops.data.synthetic import SynthConfig, synth_step

    print(f"== synthetic data -> {root / 'synthetic'}", flush=True)
    synth_step(SynthConfig(out_dir=str(root / "synthetic"), n_patients=args.patients,
                           image_size=128, dicom_fraction=0.25, seed=0))
    params = defaults(source_uri=str(root / "synthetic" / "manifest.csv"), layout="csv",
                      artifact_root=str(root / "artifacts"), backbone="test_resnet",
                      image_size=128, epochs=12, batch_size=16, lr=0.003)
    context = {"params": params, "run_id": args.run_id}
    steps = DATA_STEPS + ([] if args.data_only else MODEL_STEPS)
    summaries = {}
    for name in steps:
        print(f"== {name}", flush=True)
        try:
            summaries[name] = run_step(TRAINING_STEPS[name], context, emit=lambda s: print("   " + s))
        except StepFailed as exc:
            print(f"demo failed at {name}: {exc}", file=sys.stderr)
            return 1
    run = run_folder(params, args.run_id)
    print("\n== outputs")
    for name in steps:
        print(f"  {name:16s} {run}/{name.replace('-', '_')}/")
    if "validate" in summaries:
        print(f"  validation report  {run}/validate/report.html")
    if "evaluate" in summaries:
        print(f"  evaluation report  {run}/evaluate/evaluation.json")
        print(f"  Grad-CAM report    {run}/cam/report.html")
        print(f"  MLflow model       {summaries['package'].get('model_uri')} "
              f"(run {summaries['package'].get('mlflow_run_id')}; `mlflow ui --backend-store-uri "
              f"sqlite:///{Path('data/mlflow/mlflow.db').resolve()}`)")
    print("Research and education only; not for clinical use.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
