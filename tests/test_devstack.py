"""`make up` brings the Airflow UI to healthy with the DAGs listed and no import errors;
`make down` leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.services import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _api(url: str, token: str | None = None, data: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _procs_under(path: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if path in line and "ps -eo" not in line]


def test_make_up_lists_dags_then_make_down_leaves_nothing(tmp_path):
    env = {**os.environ, "FRACTURE_OPS_STACK_DIR": str(tmp_path / "stack"),
           "FRACTURE_OPS_MLFLOW_DIR": str(tmp_path / "mlflow"),
           "AIRFLOW_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    try:
        up = subprocess.run(["make", "-s", "up"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=420)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        info = json.loads((tmp_path / "stack" / "stack.json").read_text())
        assert info["admin_password_file"] in up.stdout and info["airflow_url"] in up.stdout
        passwords = json.loads(Path(info["admin_password_file"]).read_text())
        token = _api(f"{info['airflow_url']}/auth/token",
                     data={"username": "admin", "password": passwords["admin"]})["access_token"]
        deadline = time.time() + 120  # the DAG processor parses the folder shortly after start
        while True:
            dags = {d["dag_id"] for d in _api(f"{info['airflow_url']}/api/v2/dags", token)["dags"]}
            if "fracture_training" in dags or time.time() > deadline:
                break
            time.sleep(3)
        assert "fracture_training" in dags
        errors = _api(f"{info['airflow_url']}/api/v2/importErrors", token)
        assert errors["total_entries"] == 0, errors
        assert "experiments" in _api(f"{info['mlflow_url']}/api/2.0/mlflow/experiments/search",
                                     data={"max_results": 5})
    finally:
        down = subprocess.run(["make", "-s", "down"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    assert _procs_under(str(tmp_path)) == []
