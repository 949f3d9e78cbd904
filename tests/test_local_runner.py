"""The local runner: streaming, the JSON summary, exit-code policy, and timeouts that kill."""

from __future__ import annotations

import sys
import time

import pytest

from fracture_ops.orchestration import local_runner as lr
from fracture_ops.orchestration.specs import StepSpec


def _run(monkeypatch, code: str, timeout_s: int = 60):
    monkeypatch.setattr(lr, "cli_executable", lambda: [sys.executable, "-c", code])
    lines: list[str] = []
    spec = StepSpec("probe", ())
    return lr.run_step(spec, {}, emit=lines.append, timeout_s=timeout_s), lines


def test_streams_output_and_returns_the_summary(monkeypatch):
    code = ("import json, os; print('working', flush=True); "
            "open(os.environ['FRACTURE_OPS_XCOM_FILE'], 'w').write(json.dumps({'rows': 3}))")
    summary, lines = _run(monkeypatch, code)
    assert summary == {"rows": 3} and "working" in lines


@pytest.mark.parametrize("exit_code,retryable", [(1, True), (2, False), (3, False), (4, False), (137, True)])
def test_exit_codes_decide_retries(monkeypatch, exit_code, retryable):
    with pytest.raises(lr.StepFailed) as err:
        _run(monkeypatch, f"import sys; print('bad file x.png: truncated'); sys.exit({exit_code})")
    assert err.value.exit_code == exit_code and err.value.retryable is retryable
    assert "bad file x.png: truncated" in str(err.value)


def test_timeout_kills_the_step_and_its_children(monkeypatch, tmp_path):
    marker = tmp_path / "child_alive"
    child = f"import time; time.sleep(6); open({str(marker)!r}, 'w')"
    code = ("import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
            "print('started', flush=True)\ntime.sleep(30)\n")
    t0 = time.time()
    with pytest.raises(lr.StepFailed) as err:
        _run(monkeypatch, code, timeout_s=2)
    assert err.value.exit_code == 124 and time.time() - t0 < 10
    time.sleep(6)
    assert not marker.exists()  # the grandchild died with the step's process group


def test_the_pacs_account_reaches_only_steps_that_hold_it(monkeypatch):
    """make up puts the local PACS account in the worker's environment: a step without the pacs
    credential (every step but pacs-ingest and pacs-report) runs without it."""
    monkeypatch.setattr(lr, "cli_executable", lambda: [sys.executable, "-c", (
        "import json, os; keys = [k for k in os.environ if 'PACS' in k]; "
        "open(os.environ['FRACTURE_OPS_XCOM_FILE'], 'w').write(json.dumps(sorted(keys)))")])
    monkeypatch.setenv("FRACTURE_OPS_PACS_PASSWORD", "pw")
    monkeypatch.setenv("FRACTURE_OPS_PACS_URL", "http://127.0.0.1:8042/dicom-web")
    monkeypatch.setenv("AIRFLOW_CONN_FRACTURE_OPS_PACS", "{}")
    plain = lr.run_step(StepSpec("train", (), secrets=("s3", "mlflow")), {}, emit=lambda line: None)
    pacs = lr.run_step(StepSpec("pacs_ingest", (), secrets=("s3", "deid", "pacs")), {}, emit=lambda line: None)
    assert plain == []
    assert pacs == ["AIRFLOW_CONN_FRACTURE_OPS_PACS", "FRACTURE_OPS_PACS_PASSWORD", "FRACTURE_OPS_PACS_URL"]
