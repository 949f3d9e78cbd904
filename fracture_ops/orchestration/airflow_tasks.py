"""Airflow tasks built from step specs: the only module (with pods.py) that knows Airflow.

:func:`step_task` returns, for a spec, either a TaskFlow task that runs the step with the local
runner or a KubernetesPodOperator, chosen by ``$FRACTURE_OPS_RUNNER`` (``local`` by default,
``kubernetes`` in a cluster), never by editing a DAG. Both carry the same task id, owner, retries
with exponential back-off, timeout and outlets, and run the same command.

Failures: a step that exits with a code of ``errors.NOT_RETRYABLE`` (bad config, bad input, an
exceeded error budget) fails the task without retries
(``AirflowFailException``), because retrying cannot fix the data; anything else is retried.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from fracture_ops.orchestration.specs import TRAINING_STEPS, StepSpec
from fracture_ops import envvars

log = logging.getLogger("fracture_ops.orchestration")
OWNER = "fracture-ops"
RUNNER_ENV = envvars.RUNNER


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


def requested_nodes(spec: StepSpec, params: dict) -> int:
    """The node count the trigger form asks of a step (1 for a step without
    :attr:`~StepSpec.nodes_param`)."""
    return int(params.get(spec.nodes_param) or 1) if spec.nodes_param else 1


def run_local_step(spec: StepSpec, context: dict) -> dict:
    """Run a step with the local runner inside an Airflow task; map exit codes to retry policy."""
    from airflow.sdk.exceptions import AirflowFailException

    from fracture_ops.orchestration.local_runner import StepFailed, run_step

    nodes = requested_nodes(spec, context.get("params") or {})
    if nodes > 1:
        raise AirflowFailException(
            f"{spec.name}: {spec.nodes_param}={nodes} needs {RUNNER_ENV}=kubernetes and the Kubeflow "
            f"Trainer (a TrainJob over {nodes} nodes); the local runner trains on this machine only: "
            f"trigger with {spec.nodes_param}=1")
    try:
        return run_step(spec, dict(context), emit=lambda line: log.info("%s", line),
                        env=connection_env(spec))
    except StepFailed as exc:
        if not exc.retryable:
            raise AirflowFailException(str(exc)) from None
        raise


PACS_CONNECTION = "fracture_ops_pacs"


def connection_env(spec: StepSpec) -> dict[str, str]:
    """Credentials a step gets from Airflow connections under the local runner (pods get them
    from Kubernetes Secrets): the PACS connection ``fracture_ops_pacs`` for a step that holds
    the ``pacs`` credential, when the connection is defined (else the worker's environment)."""
    if "pacs" not in spec.secrets:
        return {}
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from fracture_ops.pacs.dicomweb import env_from_connection

    try:
        conn = BaseHook.get_connection(PACS_CONNECTION)
    except AirflowNotFoundException:
        return {}
    return env_from_connection(PACS_CONNECTION, conn.host or "", conn.schema or "", conn.port,
                               conn.login or "", conn.password or "", (conn.extra_dejson or {}).get("path", ""))


def build_tasks(steps: dict[str, StepSpec], outlets: dict[str, list] | None = None) -> dict:
    """One task per step spec, in the specs' order, each after the steps whose outputs it reads
    and given the XComArgs its :attr:`~StepSpec.inputs` name: adding a spec adds its task."""
    tasks: dict = {}
    for name in steps:
        tasks[name] = step_task(name, outlets=(outlets or {}).get(name), steps=steps, upstream=tasks)
    wire_by_data(tasks, steps)
    return tasks


class StepGroup:
    """A step that is several tasks (multi-node training: route, pod or TrainJob, join):
    upstream steps lead into ``entry``, readers of its outputs follow ``exit``."""

    def __init__(self, entry, exit, members: dict):
        self.entry, self.exit, self.members = entry, exit, members


def wire_by_data(tasks: dict, steps: dict[str, StepSpec] = TRAINING_STEPS) -> None:
    """Draw the DAG's edges from the data: each task runs after the steps whose outputs it reads
    (:attr:`StepSpec.reads`), and after nothing else."""
    for name, task in tasks.items():
        for upstream in steps[name].reads:
            if upstream in tasks:
                before = tasks[upstream]
                (before.exit if isinstance(before, StepGroup) else before) >> (
                    task.entry if isinstance(task, StepGroup) else task)


class SummaryValue:
    """One key of an upstream task's JSON summary (its XCom ``return_value``), resolved when
    Airflow renders the task: ``XComArg[key]`` would name an XCom key, not a summary field."""

    def __init__(self, summary, key: str):
        self.summary, self.key = summary, key

    def resolve(self, context) -> object:
        value = self.summary.resolve(context)
        if not isinstance(value, dict) or self.key not in value:
            raise KeyError(f"the upstream summary has no {self.key!r}")
        return value[self.key]

    def iter_references(self):  # lets Airflow see the upstream task, as for an XComArg
        return self.summary.iter_references()

    def __repr__(self) -> str:
        return f"SummaryValue({self.summary!r}, {self.key!r})"


def xcom_inputs(spec: StepSpec, upstream: dict | None) -> dict:
    r"""The values a spec's :attr:`~StepSpec.inputs` name, as :class:`SummaryValue`\ s of the
    upstream tasks' summary XComArgs.

    Raises:
        ValueError: an input's task is not among ``upstream``.
    """
    from airflow.sdk import XComArg

    out = {}
    for name, task_id, key in spec.inputs:
        if not upstream or task_id not in upstream:
            raise ValueError(f"step {spec.name!r} takes {name!r} from task {task_id!r}: pass it in upstream")
        task = upstream[task_id]
        if isinstance(task, StepGroup):
            raise ValueError(f"step {spec.name!r} takes {name!r} from {task_id!r}, which may run as "
                             "several tasks (a TrainJob): read its output files instead")
        out[name] = SummaryValue(task if isinstance(task, XComArg) else task.output, key)
    return out


def step_task(name: str, outlets: list | None = None, steps: dict[str, StepSpec] = TRAINING_STEPS,
              upstream: dict | None = None):
    """The task for the step ``name``: local subprocess or Kubernetes pod, by configuration.

    ``upstream``: the tasks (by task id) whose summaries the step takes values from
    (:attr:`StepSpec.inputs`), passed on as XComArgs.
    """
    spec = steps[name]
    inputs = xcom_inputs(spec, upstream)
    if spec.expand:
        return mapped_task(spec, outlets, upstream, inputs)
    if runner_kind() == "kubernetes":
        from fracture_ops.orchestration.pods import pod_operator

        if spec.nodes_param:
            return multinode_step(spec, outlets, inputs)
        return pod_operator(spec, inputs=inputs, **task_kwargs(spec, outlets))
    from airflow.sdk import get_current_context, task

    @task(**task_kwargs(spec, outlets))
    def _run(inputs: dict | None = None) -> dict:
        return run_local_step(spec, {**get_current_context(), "inputs": inputs or {}})

    _run.__doc__ = f"fracture-ops {spec.args[0]} (local runner)"
    return _run(inputs=inputs) if inputs else _run()  # TaskFlow resolves the inputs first


def mapped_task(spec: StepSpec, outlets: list | None, upstream: dict | None, inputs: dict):
    """One task per element of an upstream summary's list (:attr:`StepSpec.expand`), by
    Airflow's dynamic task mapping: a small task reads the list and turns it into the mapped
    values (the local runner's ``inputs`` dicts, or the pods' rendered argument lists, since
    Airflow does not render templates in values that come through XCom); then the step's task
    is expanded over them."""
    from airflow.sdk import XComArg, get_current_context, task

    name, task_id, key = spec.expand
    if not upstream or task_id not in upstream:
        raise ValueError(f"step {spec.name!r} is mapped over {task_id!r}: pass it in upstream")
    source = upstream[task_id]
    summary = source if isinstance(source, XComArg) else source.output
    kube = runner_kind() == "kubernetes"

    @task(task_id=f"{spec.name}_{key}", owner=OWNER, retries=2)
    def _elements(summary: dict, static: dict | None = None) -> list:
        if not isinstance(summary, dict) or not isinstance(summary.get(key), list):
            raise KeyError(f"the {task_id} summary has no list {key!r}")
        values = [{**(static or {}), name: v} for v in summary[key]]
        if not kube:
            return values
        from fracture_ops.orchestration.specs import render_args

        context = get_current_context()
        return [render_args(spec, {**context, "inputs": v}) for v in values]

    elements = _elements(summary, inputs) if inputs else _elements(summary)
    if kube:
        from fracture_ops.orchestration.pods import pod_operator

        return pod_operator(spec, mapped_arguments=elements, **task_kwargs(spec, outlets))

    @task(**task_kwargs(spec, outlets))
    def _run(inputs: dict) -> dict:
        return run_local_step(spec, {**get_current_context(), "inputs": inputs})

    _run.__doc__ = f"fracture-ops {spec.args[0]} (local runner, one task per {name})"
    return _run.expand(inputs=elements)


def multinode_step(spec: StepSpec, outlets: list | None, inputs: dict) -> StepGroup:
    """A step that may span nodes (Kubernetes runner): ``<step>_nodes`` routes by the trigger
    form's node count to the step's pod (``<step>``, 1 node) or to ``<step>_job`` (submits a
    Kubeflow Trainer TrainJob) and ``<step>_job_wait`` (deferrable sensor on its conditions);
    ``<step>_done`` joins whichever ran, and the steps that read the outputs follow it."""
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import task

    from fracture_ops.orchestration.pods import pod_operator
    from fracture_ops.orchestration.specs import RUN_KEY
    from fracture_ops.orchestration.trainjob_ops import TrainJobCreateOperator, TrainJobSensor

    job_id = f"{spec.name}_job"
    base = task_kwargs(spec)

    @task.branch(task_id=f"{spec.name}_nodes", owner=OWNER, retries=1)
    def route(params=None) -> str:
        return job_id if requested_nodes(spec, params or {}) > 1 else spec.name

    pod = pod_operator(spec, inputs=inputs, **base)
    create = TrainJobCreateOperator(
        spec=spec, arguments=list(spec.args), nodes="{{ params." + spec.nodes_param + " }}",
        gpus=("{{ params." + spec.gpus_param + " }}") if spec.gpus_param else str(max(spec.gpu, 1)),
        run_key=RUN_KEY, task_id=job_id, owner=OWNER, retries=2,
        retry_delay=timedelta(seconds=spec.retry_delay_s), retry_exponential_backoff=True)
    wait = TrainJobSensor(spec=spec, create_task_id=job_id, run_key=RUN_KEY,
                          **{**base, "task_id": f"{job_id}_wait", "outlets": [],
                             "execution_timeout": None})
    done = EmptyOperator(task_id=f"{spec.name}_done", owner=OWNER, retries=1, outlets=outlets or [],
                         trigger_rule="none_failed_min_one_success")
    entry = route()
    entry >> [pod, create]
    create >> wait
    [pod, wait] >> done
    return StepGroup(entry, done, {"route": entry, "pod": pod, "create": create, "wait": wait, "done": done})
