"""``make up`` / ``make down``: Airflow (standalone), the MLflow UI and a local PACS (Orthanc,
where Debian's ``orthanc`` and ``orthanc-dicomweb`` are installed) on loopback, for the UI
experience on one machine.

``up`` starts ``airflow standalone`` (SQLite metadata DB, LocalExecutor, the repo's ``dags/``)
and ``mlflow/start-server.sh`` (the embedded SQLite store under ``data/mlflow``), each in its own
process group with a pid file, waits until both are healthy, and prints the URLs and where the
Airflow admin password is. ``down`` stops both process groups and checks nothing is left.

``make demo`` runs its DAG in the same Airflow home and metadata DB (:func:`airflow_home`), so
its run, grid and task logs are in the UI after ``make up``. Without ``FRACTURE_OPS_DEID_SECRET``
both use a development de-identification secret generated once under the state folder
(:func:`dev_secret`, mode 0600): fine for synthetic data, not for real data.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fracture_ops import envvars

REPO = Path(__file__).resolve().parents[2]


def _settings() -> dict:
    state = state_dir()
    return {"state": state, "airflow_home": airflow_home(),
            "airflow_port": int(os.environ.get("AIRFLOW_PORT", "8080")),
            "mlflow_port": int(os.environ.get("MLFLOW_PORT", "5000")),
            "orthanc_port": int(os.environ.get("ORTHANC_PORT", "8042")),
            "orthanc_dicom_port": int(os.environ.get("ORTHANC_DICOM_PORT", "4242")),
            "mlflow_dir": Path(os.environ.get(envvars.MLFLOW_DIR, REPO / "data" / "mlflow")).resolve()}


def state_dir() -> Path:
    """The local stack's state folder (``$FRACTURE_OPS_STACK_DIR``, default ``data/stack``)."""
    return Path(os.environ.get(envvars.STACK_DIR, REPO / "data" / "stack")).resolve()


def airflow_home() -> Path:
    """The Airflow home (and SQLite metadata DB) ``make up`` and ``make demo`` share."""
    return state_dir() / "airflow"


DEV_SECRET_NOTE = "development secret, not for real data"


def dev_secret(state: Path | None = None) -> tuple[str, str | None]:
    """The de-identification secret for the local stack and the demo.

    ``$FRACTURE_OPS_DEID_SECRET`` when set (returns it and None); otherwise a random 32-byte
    secret created once in ``<state>/deid-secret`` with mode 0600 (returns it and the file).
    """
    if os.environ.get(envvars.DEID_SECRET):
        return os.environ[envvars.DEID_SECRET], None
    state = state or state_dir()
    state.mkdir(parents=True, exist_ok=True)
    path = state / "deid-secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)  # tighten a copy someone loosened
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip(), str(path)


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


def _orthanc_alive(pid: int) -> bool:
    """Whether ``pid`` is a running Orthanc (a pid file can outlive its process, and the pid can
    be reused by an unrelated one after a reboot)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"Orthanc" in cmdline.split(b"\0", 1)[0]


def airflow_env(s: dict) -> dict:
    """Environment of the standalone Airflow: the repo's DAGs, local runner, no examples."""
    return {**os.environ, "AIRFLOW_HOME": str(s["airflow_home"]),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API__PORT": str(s["airflow_port"]), "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{s['airflow_port']}",
            envvars.RUNNER: "local", "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s['mlflow_port']}",
            envvars.DEID_SECRET: dev_secret(s["state"])[0],
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _pacs_credentials(s: dict) -> tuple[str, str, Path]:
    """The local PACS account, created once under the state folder (mode 0600)."""
    path = s["state"] / "orthanc" / "credentials.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"username": "fracture-ops", "password": secrets.token_urlsafe(16)}))
        os.chmod(path, 0o600)
    creds = json.loads(path.read_text())
    return creds["username"], creds["password"], path


def _pacs_ports(s: dict) -> tuple[int, int]:
    """The local PACS's HTTP and DICOM ports: the ones chosen when it was first started (kept in
    its state folder), else the settings' (``ORTHANC_PORT``, ``ORTHANC_DICOM_PORT``)."""
    chosen = s["state"] / "orthanc" / "ports.json"
    if chosen.exists():
        ports = json.loads(chosen.read_text())
        return int(ports["http"]), int(ports["dicom"])
    return s["orthanc_port"], s["orthanc_dicom_port"]


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _local_pacs(s: dict):
    from fracture_ops.pacs.orthanc_local import LocalOrthanc

    user, password, _ = _pacs_credentials(s)
    http, dicom = _pacs_ports(s)
    return LocalOrthanc(s["state"] / "orthanc", username=user, password=password,
                        http_port=http, dicom_port=dicom)


def pacs_env(s: dict) -> dict:
    """The local PACS for the Airflow tasks (``fracture_pacs_ingest``), when Orthanc is installed
    and no site PACS is configured in the environment."""
    from fracture_ops.pacs.dicomweb import URL_ENV
    from fracture_ops.pacs.orthanc_local import missing

    if missing() or os.environ.get(URL_ENV):
        return {}
    return _local_pacs(s).env()


def start_pacs(s: dict, timeout: float = 60) -> dict:
    """Start the local Orthanc (idempotent); ``{"missing": why}`` when it is not installed."""
    from fracture_ops.pacs.orthanc_local import missing

    why = missing()
    if why:
        return {"missing": why}
    pid_file = s["state"] / "orthanc.pid"
    moved = ""
    if not (pid_file.exists() and _orthanc_alive(int(pid_file.read_text()))):
        http, dicom = _pacs_ports(s)
        taken = [p for p in (http, dicom) if _port_taken(p)]
        if taken:  # e.g. Debian's own orthanc.service on 8042/4242
            from fracture_ops.pacs.orthanc_local import free_port

            (s["state"] / "orthanc").mkdir(parents=True, exist_ok=True)
            new = {"http": free_port(), "dicom": free_port()}
            (s["state"] / "orthanc" / "ports.json").write_text(json.dumps(new))
            moved = (f"port(s) {', '.join(map(str, taken))} already in use (Debian's "
                     f"orthanc.service?): started on {new['http']} (HTTP) and {new['dicom']} "
                     "(DICOM) instead")
        server = _local_pacs(s)
        server.start(timeout=timeout)
        pid_file.write_text(str(server.pid))
    server = _local_pacs(s)
    return {"url": server.url, "dicomweb_url": server.dicomweb_url, "dicom_port": server.dicom_port,
            "username": server.username, "credentials_file": str(_pacs_credentials(s)[2]),
            "pid": int(pid_file.read_text()), **({"moved": moved} if moved else {})}


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
    # the PACS first: when its usual ports are taken it moves, and Airflow must get the new ones
    pacs = start_pacs(s)
    if pacs.get("pid"):
        pids["orthanc"] = pacs["pid"]
    af_pid_file = s["state"] / "airflow.pid"
    if not (af_pid_file.exists() and _alive(int(af_pid_file.read_text()))):
        # the local PACS for fracture_pacs_ingest (the local runner hands it to the PACS steps only)
        _spawn([_bin("airflow"), "standalone"], {**airflow_env(s), **pacs_env(s)},
               s["state"] / "airflow.log", af_pid_file)
    pids["airflow"] = int(af_pid_file.read_text())
    _wait(f"http://127.0.0.1:{s['mlflow_port']}/health", "MLflow", pids["mlflow"], timeout)
    _wait(f"http://127.0.0.1:{s['airflow_port']}/api/v2/monitor/health", "Airflow", pids["airflow"], timeout)
    secret_file = dev_secret(s["state"])[1]
    info = {"airflow_url": f"http://127.0.0.1:{s['airflow_port']}",
            "deid_secret_file": secret_file,
            "mlflow_url": f"http://127.0.0.1:{s['mlflow_port']}",
            "admin_password_file": str(s["airflow_home"] / "simple_auth_manager_passwords.json.generated"),
            "logs": str(s["state"]), "pids": pids, "pacs": {k: v for k, v in pacs.items() if k != "pid"}}
    (s["state"] / "stack.json").write_text(json.dumps(info, indent=2))
    unpause_training(info)
    return info


def unpause_training(stack: dict, timeout: float = 120) -> None:
    """Unpause ``fracture_training`` (no schedule: it runs only when triggered) once the DAG
    processor has listed it, so a run triggered from the form or the API starts. The scheduled
    DAGs (promotion, inference, drift) stay paused until a person turns them on."""
    import urllib.error

    deadline = time.time() + timeout
    while True:
        try:
            api(dict(stack), "PATCH", "/api/v2/dags/fracture_training", {"is_paused": False})
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.time() > deadline:
                raise SystemExit(f"could not unpause fracture_training: HTTP {exc.code}") from exc
        time.sleep(2)


def running_stack() -> dict | None:
    """The running stack's ``stack.json`` (URLs, password file), or None when it is not up."""
    s = _settings()
    pid_file, info = s["state"] / "airflow.pid", s["state"] / "stack.json"
    if not (pid_file.exists() and info.exists() and _alive(int(pid_file.read_text()))):
        return None
    stack = json.loads(info.read_text())
    return stack if _healthy(f"{stack['airflow_url']}/api/v2/monitor/health") else None


def api(stack: dict, method: str, path: str, body: dict | None = None) -> dict:
    """Call the stack's Airflow REST API as its admin (token from the generated password)."""
    def call(url: str, data: dict | None, headers: dict, verb: str) -> dict:
        req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                     headers={"Content-Type": "application/json", **headers},
                                     method=verb)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    if "_token" not in stack:
        password = json.loads(Path(stack["admin_password_file"]).read_text())["admin"]
        stack["_token"] = call(f"{stack['airflow_url']}/auth/token",
                               {"username": "admin", "password": password}, {}, "POST")["access_token"]
    return call(stack["airflow_url"] + path, body, {"Authorization": f"Bearer {stack['_token']}"},
                method)


def down(timeout: float = 60, names: tuple[str, ...] = ("airflow", "mlflow", "orthanc")) -> list[int]:
    """Stop the stack's process groups (TERM, then KILL); returns the pids that were running."""
    s = _settings()
    stopped = []
    for name in names:
        pid_file = s["state"] / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        running = _orthanc_alive(pid) if name == "orthanc" else _group_alive(pid)
        if not running:  # a stale pid file: never signal whatever has that pid now
            pid_file.unlink(missing_ok=True)
            continue
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


def _pacs_line(pacs: dict) -> str:
    return (f"PACS        {pacs['url']}  (Orthanc; DICOMweb {pacs['dicomweb_url']}, DICOM port "
            f"{pacs['dicom_port']}; user {pacs['username']}, password in "
            f"{pacs['credentials_file']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fracture_ops.orchestration.devstack", description=__doc__)
    ap.add_argument("action", choices=["up", "down", "pacs", "pacs-down"],
                    help="up/down: the whole stack; pacs/pacs-down: the bundled Orthanc alone")
    args = ap.parse_args(argv)
    if args.action == "pacs":
        pacs = start_pacs(_settings())
        if pacs.get("missing"):
            print(f"PACS not started: {pacs['missing']}")
            return 1
        print(_pacs_line(pacs))
        if pacs.get("moved"):
            print(f"            note: {pacs['moved']}")
        print(f"            pacs-ingest reads FRACTURE_OPS_PACS_URL={pacs['dicomweb_url']}, "
              f"FRACTURE_OPS_PACS_USERNAME={pacs['username']} and FRACTURE_OPS_PACS_PASSWORD "
              "(the password in the credentials file); for a site's PACS set those three to its "
              "DICOMweb root and account instead")
        print("            stop with: make pacs-down")
        return 0
    if args.action == "pacs-down":
        stopped = down(names=("orthanc",))
        print(f"stopped the PACS (process group {stopped[0]})" if stopped else "no PACS was running")
        return 0
    if args.action == "up":
        info = up()
        print(f"Airflow UI  {info['airflow_url']}  (user admin; password in {info['admin_password_file']})")
        print(f"MLflow UI   {info['mlflow_url']}")
        pacs = info["pacs"]
        if pacs.get("url"):
            print(_pacs_line(pacs))
        else:
            print(f"PACS        not started: {pacs['missing']}")
        if info["deid_secret_file"]:
            print(f"de-id key   {DEV_SECRET_NOTE} ({info['deid_secret_file']}); "
                  "export FRACTURE_OPS_DEID_SECRET for real data")
        print(f"logs        {info['logs']}   stop with: make down")
    else:
        stopped = down()
        print(f"stopped process groups {stopped}" if stopped else "nothing was running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
