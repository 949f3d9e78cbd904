"""``make up`` / ``make down``: Airflow (standalone) and the MLflow UI on loopback, for the UI
experience on one machine.

``up`` starts ``airflow standalone`` (SQLite metadata DB, LocalExecutor, the repo's ``dags/``)
and ``mlflow/start-server.sh`` (the embedded SQLite store under ``data/mlflow``), each in its own
process group with a pid file, waits until both are healthy, and prints the URLs and where the
Airflow admin password is. ``down`` stops both process groups and checks nothing is left.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _settings() -> dict:
    state = Path(os.environ.get("FRACTURE_OPS_STACK_DIR", REPO / "data" / "stack")).resolve()
    return {"state": state, "airflow_home": state / "airflow",
            "airflow_port": int(os.environ.get("AIRFLOW_PORT", "8080")),
            "mlflow_port": int(os.environ.get("MLFLOW_PORT", "5000")),
            "mlflow_dir": Path(os.environ.get("FRACTURE_OPS_MLFLOW_DIR", REPO / "data" / "mlflow")).resolve()}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _spawn(cmd: list[str], env: dict, log: Path, pid_file: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)  # its own process group: down kills it all
    pid_file.write_text(str(proc.pid))
    return proc.pid


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _wait(url: str, what: str, pid: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _healthy(url):
            return
        if not _alive(pid):
            raise SystemExit(f"{what} exited during start-up; see its log")
        time.sleep(1)
    raise SystemExit(f"{what} not healthy after {timeout:.0f} s ({url})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def airflow_env(s: dict) -> dict:
    """Environment of the standalone Airflow: the repo's DAGs, local runner, no examples."""
    return {**os.environ, "AIRFLOW_HOME": str(s["airflow_home"]),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API__PORT": str(s["airflow_port"]), "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{s['airflow_port']}",
            "FRACTURE_OPS_RUNNER": "local", "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s['mlflow_port']}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def up(timeout: float = 240) -> dict:
    """Start both services (idempotent: a running stack is left alone) and wait until healthy."""
    s = _settings()
    s["state"].mkdir(parents=True, exist_ok=True)
    pids = {}
    mlflow_pid_file = s["state"] / "mlflow.pid"
    if not (mlflow_pid_file.exists() and _alive(int(mlflow_pid_file.read_text()))):
        env = {**os.environ, "MLFLOW_PORT": str(s["mlflow_port"]), "MLFLOW_HOST": "127.0.0.1",
               "MLFLOW_DATA_DIR": str(s["mlflow_dir"]), "MLFLOW_WORKERS": "1",
               "MLFLOW_BIN": _bin("mlflow"), "PYTHON": sys.executable}
        _spawn(["bash", str(REPO / "mlflow" / "start-server.sh")], env, s["state"] / "mlflow.log",
               mlflow_pid_file)
    pids["mlflow"] = int(mlflow_pid_file.read_text())
    af_pid_file = s["state"] / "airflow.pid"
    if not (af_pid_file.exists() and _alive(int(af_pid_file.read_text()))):
        _spawn([_bin("airflow"), "standalone"], airflow_env(s), s["state"] / "airflow.log", af_pid_file)
    pids["airflow"] = int(af_pid_file.read_text())
    _wait(f"http://127.0.0.1:{s['mlflow_port']}/health", "MLflow", pids["mlflow"], timeout)
    _wait(f"http://127.0.0.1:{s['airflow_port']}/api/v2/monitor/health", "Airflow", pids["airflow"], timeout)
    info = {"airflow_url": f"http://127.0.0.1:{s['airflow_port']}",
            "mlflow_url": f"http://127.0.0.1:{s['mlflow_port']}",
            "admin_password_file": str(s["airflow_home"] / "simple_auth_manager_passwords.json.generated"),
            "logs": str(s["state"]), "pids": pids}
    (s["state"] / "stack.json").write_text(json.dumps(info, indent=2))
    return info


def down(timeout: float = 60) -> list[int]:
    """Stop both process groups (TERM, then KILL); returns the pids that were running."""
    s = _settings()
    stopped = []
    for name in ("airflow", "mlflow"):
        pid_file = s["state"] / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + (timeout if sig == signal.SIGTERM else 10)
            while time.time() < deadline and _group_alive(pid):
                time.sleep(0.5)
            if not _group_alive(pid):
                break
        stopped.append(pid)
        pid_file.unlink(missing_ok=True)
    return stopped


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fracture_ops.orchestration.devstack", description=__doc__)
    ap.add_argument("action", choices=["up", "down"])
    args = ap.parse_args(argv)
    if args.action == "up":
        info = up()
        print(f"Airflow UI  {info['airflow_url']}  (user admin; password in {info['admin_password_file']})")
        print(f"MLflow UI   {info['mlflow_url']}")
        print(f"logs        {info['logs']}   stop with: make down")
    else:
        stopped = down()
        print(f"stopped process groups {stopped}" if stopped else "nothing was running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
