"""Airflow tasks built from step specs: the only module (with pods.py) that knows Airflow.

:func:`step_task` returns, for a spec, either a TaskFlow task that runs the step with the local
runner or a KubernetesPodOperator, chosen by ``$FRACTURE_OPS_RUNNER`` (``local`` by default,
``kubernetes`` in a cluster), never by editing a DAG. Both carry the same task id, owner, retries
with exponential back-off, timeout and outlets, and run the same command.

Failures: a step that exits with a bad-input code (2, 3, 4) fails the task without retries
(``AirflowFailException``), because retrying cannot fix the data; anything else is retried.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from fracture_ops.orchestration.specs import TRAINING_STEPS, StepSpec

log = logging.getLogger("fracture_ops.orchestration")
OWNER = "fracture-ops"
RUNNER_ENV = "FRACTURE_OPS_RUNNER"


def runner_kind() -> str:
    """``local`` or ``kubernetes`` from ``$FRACTURE_OPS_RUNNER`` (read at parse time, no network)."""
    kind = os.environ.get(RUNNER_ENV, "local").strip().lower()
    if kind not in ("local", "kubernetes"):
        raise ValueError(f"{RUNNER_ENV} must be 'local' or 'kubernetes', not {kind!r}")
    return kind


def default_args() -> dict:
    """DAG-level defaults every task inherits (owner, retries, back-off)."""
    return {"owner": OWNER, "retries": 2, "retry_delay": timedelta(seconds=30),
            "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=30)}


def task_kwargs(spec: StepSpec, outlets: list | None = None) -> dict:
    """Arguments both runners' tasks share."""
    return {"task_id": spec.name, "owner": OWNER, "retries": spec.retries,
            "retry_delay": timedelta(seconds=spec.retry_delay_s), "retry_exponential_backoff": True,
            "execution_timeout": timedelta(seconds=spec.timeout_s), "outlets": outlets or []}


def run_local_step(spec: StepSpec, context: dict) -> dict:
    """Run a step with the local runner inside an Airflow task; map exit codes to retry policy."""
    from airflow.sdk.exceptions import AirflowFailException

    from fracture_ops.orchestration.local_runner import StepFailed, run_step

    try:
        return run_step(spec, dict(context), emit=lambda line: log.info("%s", line))
    except StepFailed as exc:
        if not exc.retryable:
            raise AirflowFailException(str(exc)) from None
        raise


def step_task(name: str, outlets: list | None = None, steps: dict[str, StepSpec] = TRAINING_STEPS):
    """The task for the step ``name``: local subprocess or Kubernetes pod, by configuration."""
    spec = steps[name]
    if runner_kind() == "kubernetes":
        from fracture_ops.orchestration.pods import pod_operator

        return pod_operator(spec, **task_kwargs(spec, outlets))
    from airflow.sdk import get_current_context, task

    @task(**task_kwargs(spec, outlets))
    def _run() -> dict:
        return run_local_step(spec, get_current_context())

    _run.__doc__ = f"fracture-ops {spec.args[0]} (local runner)"
    return _run()
