"""The ``local`` runner: the pod's exact command, run as a subprocess on the worker.

Output is streamed line by line to the caller's logger (so it shows in the Airflow task log as it
happens), the step's JSON summary comes back through ``$FRACTURE_OPS_XCOM_FILE`` like a pod's
``/airflow/xcom/return.json``, and the exit code says whether a retry can help.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any
from collections.abc import Callable

from fracture_ops.errors import retryable
from fracture_ops.orchestration.specs import StepSpec, render_args
from fracture_ops import envvars

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A step's process exited non-zero.

    Attributes:
        exit_code: the process's exit status.
        retryable: False for bad input, bad config or an exceeded error budget.
        tail: the last lines of its output (they name the bad file and the reason).
    """

    def __init__(self, step: str, exit_code: int, tail: list[str]):
        self.step, self.exit_code, self.tail = step, exit_code, tail
        self.retryable = retryable(exit_code)
        kind = "infrastructure/internal error (retryable)" if self.retryable else "bad input (not retried)"
        last = "\n".join(tail[-15:])
        super().__init__(f"step {step} exited {exit_code}: {kind}\n{last}")


def cli_executable() -> list[str]:
    """The ``fracture-ops`` console script of this interpreter's environment (the pod's entrypoint)."""
    beside = Path(sys.executable).parent / "fracture-ops"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fracture-ops")
    return [found] if found else [sys.executable, "-m", "fracture_ops.cli"]


# credentials a step gets only when its spec names them (least privilege, as for pods): the
# worker's environment may hold them (make up's local PACS), its other steps must not
WITHHELD_ENV = {"pacs": (envvars.PACS_URL, envvars.PACS_USERNAME,
                         envvars.PACS_PASSWORD, "AIRFLOW_CONN_FRACTURE_OPS_PACS")}


def _withheld(spec: StepSpec, name: str) -> bool:
    return any(name in names for kind, names in WITHHELD_ENV.items() if kind not in spec.secrets)


def command_for(spec: StepSpec, context: dict[str, Any]) -> list[str]:
    """The full command line: entrypoint + rendered arguments."""
    return cli_executable() + render_args(spec, context)


def run_step(spec: StepSpec, context: dict[str, Any], *, env: dict[str, str] | None = None,
             emit: Callable[[str], None] | None = None, timeout_s: int | None = None) -> dict:
    """Run one step as a subprocess and return its JSON summary.

    Raises:
        StepFailed: non-zero exit (``retryable`` tells whether to retry).
    """
    emit = emit or (lambda line: log.info("%s", line))
    cmd = command_for(spec, context)
    # the command as a person would type it (the entry point by name, arguments quoted)
    emit("$ " + shlex.join([Path(cmd[0]).name, *cmd[1:]]))
    with tempfile.TemporaryDirectory() as tmp:
        xcom = Path(tmp) / "return.json"
        proc_env = {**{k: v for k, v in os.environ.items() if not _withheld(spec, k)}, **(env or {}),
                    envvars.XCOM_FILE: str(xcom),
                    envvars.NO_PROGRESS: os.environ.get(envvars.NO_PROGRESS, "1")}
        # its own process group, so a timeout or a killed task takes the whole step down with it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=proc_env, bufsize=1, start_new_session=True)
        tail: list[str] = []
        reader = threading.Thread(target=_pump, args=(proc, emit, tail), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s or spec.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reader.join(timeout=5)
            raise StepFailed(spec.name, 124, tail + ["timed out"]) from None
        except BaseException:  # e.g. Airflow's execution timeout or a SIGTERM of the task
            _kill_group(proc)
            raise
        reader.join(timeout=30)
        if code != 0:
            raise StepFailed(spec.name, code, tail)
        return json.loads(xcom.read_text()) if xcom.exists() else {}


def _pump(proc: subprocess.Popen, emit: Callable[[str], None], tail: list[str]) -> None:
    """Stream the step's output line by line, keeping the last lines for the error message."""
    for line in proc.stdout:
        line = line.rstrip("\n")
        emit(line)
        tail.append(line)
        del tail[:-200]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
