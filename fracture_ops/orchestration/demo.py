"""``make demo``: the training pipeline end to end on synthetic data, on this machine.

Generates the synthetic data set (a quarter of the patients as DICOM with fake PHI, so the
de-identification step has work), then runs the ``fracture_training`` DAG with
``airflow dags test`` on an embedded SQLite Airflow (local runner, local MLflow store) and prints
where the outputs are. It starts no server. ``--no-airflow`` runs the same step commands directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
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
    ap.add_argument("--data-only", action="store_true", help="stop after the split (no Airflow)")
    ap.add_argument("--no-airflow", action="store_true", help="run the steps without Airflow")
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
    steps = DATA_STEPS + ([] if args.data_only else MODEL_STEPS)
    if args.no_airflow or args.data_only:
        run_id = args.run_id
        if not _run_directly(params, run_id, steps):
            return 1
    else:
        run_id = _run_with_airflow(params, root)
        if run_id is None:
            return 1
        steps += ["register", "gate"]
    _print_outputs(params, run_id, steps)
    return 0


def _run_directly(params: dict, run_id: str, steps: list[str]) -> bool:
    context = {"params": params, "run_id": run_id}
    for name in steps:
        print(f"== {name}", flush=True)
        try:
            run_step(TRAINING_STEPS[name], context, emit=lambda s: print("   " + s))
        except StepFailed as exc:
            print(f"demo failed at {name}: {exc}", file=sys.stderr)
            return False
    return True


def _run_with_airflow(params: dict, root: Path) -> str | None:
    """``airflow dags test fracture_training`` on an embedded SQLite Airflow; returns the run id."""
    home = root / "airflow"
    env = {**os.environ, "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "AIRFLOW__CORE__DAGS_FOLDER": str(Path(__file__).resolve().parents[2] / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "FRACTURE_OPS_RUNNER": "local",
           "FRACTURE_OPS_APPROVERS": os.environ.get("FRACTURE_OPS_APPROVERS", "")}
    airflow = str(Path(sys.executable).parent / "airflow")
    print(f"== airflow db migrate (SQLite, {home})", flush=True)
    if subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True).returncode:
        print("airflow db migrate failed", file=sys.stderr)
        return None
    log_file = root / "airflow_dags_test.log"
    print(f"== airflow dags test fracture_training (local runner; full log {log_file})", flush=True)
    with open(log_file, "w") as log, subprocess.Popen(
            [airflow, "dags", "test", "fracture_training", "-c", json.dumps(params)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        state = "done"
        for line in proc.stdout:
            log.write(line)
            state = _state(line) or state
            if "[DAG TEST] end task" in line:
                print(f"   {_task_id(line)}: {state}", flush=True)
        code = proc.wait()
    if code:
        print(f"demo failed: the DAG run failed; see {log_file}", file=sys.stderr)
        return None
    runs = sorted((Path(params["artifact_root"]) / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    print(f"   DAG run succeeded (log: {log_file})")
    return runs[-1].name


def _task_id(line: str) -> str:
    import re

    m = re.search(r"task_id=(\S+)", line)
    return m.group(1) if m else "?"


def _state(line: str) -> str | None:
    """The new task state an Airflow log line reports, if any."""
    import re

    m = re.search(r"new_state=(\w+)", line)
    return m.group(1) if m else None


def _print_outputs(params: dict, run_id: str, steps: list[str]) -> None:
    run = run_folder(params, run_id)
    print("\n== outputs")
    for name in steps:
        print(f"  {name:16s} {run}/{name}/")
    print(f"  validation report  {run}/validate/report.html")
    if "evaluate" in steps:
        print(f"  evaluation report  {run}/evaluate/evaluation.json")
        print(f"  Grad-CAM report    {run}/cam/report.html")
        package = json.loads(Path(run, "package", "package.json").read_text())
        print(f"  MLflow run         {package['mlflow_run_id']} (model {package['model_uri']})")
    if "register" in steps:
        reg = json.loads(Path(run, "register", "registered.json").read_text())
        gate = json.loads(Path(run, "gate", "gate.json").read_text())
        print(f"  registered         {reg['model_uri']} alias challenger, gate "
              f"{'passed' if gate['passed'] else 'failed'}; model card {reg['model_card']}")
    print(f"  MLflow UI          make up, or: mlflow ui --backend-store-uri "
          f"sqlite:///{Path('data/mlflow/mlflow.db').resolve()}")
    print("Research and education only; not for clinical use.")


if __name__ == "__main__":
    sys.exit(main())
