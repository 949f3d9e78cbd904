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
from fracture_ops.orchestration.specs import TRAINING_STEPS, ordered, run_folder
from fracture_ops import catalog, envvars

# the training DAG's steps in their order (from the specs' reads): the data steps up to the
# split, then the model's up to the package (--no-airflow stops there; the DAG goes on to
# register and gate); the detection branch is off by default
_ORDER = [n for n in ordered(TRAINING_STEPS) if n not in ("register", "gate", "detect_train")]
DATA_STEPS = _ORDER[:_ORDER.index("split") + 1]
MODEL_STEPS = _ORDER[_ORDER.index("split") + 1:]


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
    from fracture_ops.orchestration.devstack import DEV_SECRET_NOTE, dev_secret

    secret, secret_file = dev_secret()
    os.environ[envvars.DEID_SECRET] = secret
    if secret_file:
        print(f"== de-identification key: {DEV_SECRET_NOTE} ({secret_file})", flush=True)
    root = Path(args.root).resolve()
    from fracture_ops.data.synthetic import SynthConfig, synth_step

    print(f"== synthetic data -> {root / 'synthetic'}", flush=True)
    synth_step(SynthConfig(out_dir=str(root / "synthetic"), n_patients=args.patients,
                           image_size=128, dicom_fraction=0.25, seed=0))
    # the trigger form's cpu-quick profile (pretrained Lite0, 128 px, 6 epochs): what a user gets
    # from the UI on the local runner
    params = defaults(source_uri=str(root / "synthetic" / "manifest.csv"), layout="csv",
                      artifact_root=str(root / "artifacts"), profile="cpu-quick")
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
    """The ``fracture_training`` DAG in the Airflow home ``make up`` uses; returns the run id.

    When ``make up`` is running, the run is triggered through its REST API (two schedulers on one
    metadata DB would both run the tasks); otherwise ``airflow dags test --use-executor`` runs it
    with the LocalExecutor on the shared SQLite DB, which writes the task logs the UI shows.
    """
    from fracture_ops.orchestration.devstack import airflow_home, running_stack

    stack = running_stack()
    if stack:
        return _run_on_stack(params, stack)
    home = airflow_home()  # shared with `make up`: the run is in the UI afterwards
    env = {**os.environ, "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "AIRFLOW__CORE__DAGS_FOLDER": str(Path(__file__).resolve().parents[2] / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           envvars.RUNNER: "local",
           envvars.APPROVERS: os.environ.get(envvars.APPROVERS, "")}
    airflow = str(Path(sys.executable).parent / "airflow")
    print(f"== airflow db migrate (SQLite, {home})", flush=True)
    if subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True).returncode:
        print("airflow db migrate failed", file=sys.stderr)
        return None
    log_file = root / "airflow_dags_test.log"
    print(f"== airflow dags test fracture_training (local runner; full log {log_file})", flush=True)
    # the LocalExecutor's task processes report to an execution API: a private one, on a free
    # loopback port, for the length of the run (they write the task logs the UI shows later)
    port = _free_port()
    env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"http://127.0.0.1:{port}/execution/"
    with open(log_file, "w") as log:
        api_server = subprocess.Popen(
            [airflow, "api-server", "--apps", "execution", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if not _listening(port, api_server):
                print(f"demo failed: Airflow's execution API did not start; see {log_file}",
                      file=sys.stderr)
                return None
            with subprocess.Popen(
                    [airflow, "dags", "test", "fracture_training", "--use-executor",
                     "-c", json.dumps(params)],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
                for line in proc.stdout:
                    log.write(line)
                    finished = _finished(line)
                    if finished:
                        print(f"   {finished[0]}: {finished[1]}", flush=True)
                code = proc.wait()
        finally:
            _stop_group(api_server)
    if code:
        print(f"demo failed: the DAG run failed; see {log_file}", file=sys.stderr)
        return None
    runs = sorted((Path(params["artifact_root"]) / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    print(f"   DAG run succeeded (log: {log_file})")
    return runs[-1].name


def _run_on_stack(params: dict, stack: dict, timeout: float = 3600) -> str | None:
    """Trigger the DAG on the running ``make up`` stack and wait for it; returns the run id."""
    import time
    import urllib.parse

    from fracture_ops.orchestration.devstack import api, unpause_training

    url = stack["airflow_url"]
    print(f"== make up is running: triggering fracture_training on {url}", flush=True)
    unpause_training(stack)  # a stack started by an older version may have left it paused
    run = api(stack, "POST", "/api/v2/dags/fracture_training/dagRuns",
              {"logical_date": None, "conf": params})
    run_id = run["dag_run_id"]
    path = f"/api/v2/dags/fracture_training/dagRuns/{urllib.parse.quote(run_id, safe='')}"
    print(f"   run {run_id}: {url}/dags/fracture_training/runs/{urllib.parse.quote(run_id, safe='')}",
          flush=True)
    seen: set[str] = set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        for ti in api(stack, "GET", f"{path}/taskInstances")["task_instances"]:
            if ti["state"] in ("success", "failed", "skipped", "upstream_failed") and \
                    ti["task_id"] not in seen:
                seen.add(ti["task_id"])
                print(f"   {ti['task_id']}: {ti['state']}", flush=True)
        state = api(stack, "GET", path)["state"]
        if state in ("success", "failed"):
            break
        time.sleep(5)
    else:
        state = "timed out"
    if state != "success":
        print(f"demo failed: the DAG run {state}; see its task logs in the Airflow UI",
              file=sys.stderr)
        return None
    return run_id


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int, proc: subprocess.Popen, timeout: float = 180) -> bool:
    """Wait until something accepts connections on ``port`` (False if ``proc`` exits first)."""
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and its children (TERM, then KILL)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def _finished(line: str) -> tuple[str, str] | None:
    """(task id, state) when an Airflow log line reports a finished task instance."""
    import re

    m = re.search(r"TaskInstance Finished: .*?task_id=([\w.-]+),.*?\bstate=(\w+)", line)
    return (m.group(1), m.group(2)) if m else None


# fewer test images of either outcome than this and the test AUROC's interval is too wide for the
# gate's floor to mean much (the demo says so rather than let a coin toss look like a verdict)
MIN_TEST_PER_OUTCOME = 15


def test_set_line(evaluation: dict) -> str:
    """The test figures the gate decides on, and whether the test set is large enough to decide:
    at least :data:`MIN_TEST_PER_OUTCOME` images of each outcome, and an AUROC interval that
    does not straddle the gate's floor."""
    from fracture_ops.registry.gate import GateConfig

    floor = GateConfig.model_fields["min_auroc"].default
    cls = evaluation["class_names"][0]
    support = evaluation["support"][cls]
    auroc = evaluation["metrics"]["per_class"][cls]["auroc"]
    head = (f"test set           {evaluation['n_images']} images of {evaluation['n_patients']} "
            f"patients ({support['positives']} {cls}, {support['negatives']} not): ")
    if any(auroc.get(k) is None for k in ("value", "ci_low", "ci_high")):
        return head + "AUROC undefined\n  NOTE: too small to decide: the test set lacks an outcome"
    text = head + (f"AUROC {auroc['value']:.3f} (95% CI {auroc['ci_low']:.3f}-"
                   f"{auroc['ci_high']:.3f})")
    small = min(support["positives"], support["negatives"]) < MIN_TEST_PER_OUTCOME
    straddles = auroc["ci_low"] < floor <= auroc["ci_high"]
    if small or straddles:
        text += (f"\n  NOTE: too small to decide: the gate's floor {floor} lies inside the interval"
                 if straddles else f"\n  NOTE: too small to decide: fewer than "
                 f"{MIN_TEST_PER_OUTCOME} test images of one outcome")
        text += "; run the demo with more patients (--patients) for a verdict that means something"
    return text


def _print_outputs(params: dict, run_id: str, steps: list[str]) -> None:
    run = run_folder(params, run_id)
    print("\n== outputs")
    for name in steps:
        print(f"  {name:16s} {run}/{name}/")
    print(f"  validation report  {run}/{catalog.VALIDATE_REPORT.path}")
    if "evaluate" in steps:
        print(f"  evaluation report  {run}/{catalog.EVALUATION_REPORT.path} (metrics: "
              f"{catalog.EVALUATION.file})")
        print("  " + test_set_line(json.loads(Path(run, catalog.EVALUATION.path).read_text())))
        print(f"  Grad-CAM report    {run}/{catalog.CAM_REPORT.path}")
        package = json.loads(Path(run, catalog.PACKAGE.path).read_text())
        print(f"  MLflow run         {package['mlflow_run_id']} (model {package['model_uri']})")
    if "register" in steps:
        reg = json.loads(Path(run, catalog.REGISTERED.path).read_text())
        gate = json.loads(Path(run, catalog.GATE.path).read_text())
        print(f"  registered         {reg['model_uri']} alias challenger, gate "
              f"{'passed' if gate['passed'] else 'failed'}; model card {reg['model_card']}")
    print(f"  MLflow UI          make up, or: mlflow ui --backend-store-uri "
          f"sqlite:///{Path('data/mlflow/mlflow.db').resolve()}")
    print("Research and education only; not for clinical use.")


if __name__ == "__main__":
    sys.exit(main())
