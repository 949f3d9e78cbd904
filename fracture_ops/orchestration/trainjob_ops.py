"""Airflow side of multi-node training: submit a Kubeflow Trainer ``TrainJob``, wait for it
without holding a worker slot, clean up.

- :class:`TrainJobCreateOperator` (the cncf-kubernetes provider's
  ``KubernetesCreateResourceOperator``) renders the step's arguments, builds the TrainJob
  (:func:`fracture_ops.orchestration.trainjob.build`), refuses it when it does not validate
  against the vendored CRD schema, removes a job of the same name that an earlier try left, and
  creates it. Its XCom is the resource it created.
- :class:`TrainJobSensor` defers to :class:`TrainJobTrigger`, which polls the job's status
  conditions in the triggerer. ``Complete``: the job is deleted and the task succeeds.
  ``Failed``: the nodes' exit codes decide, as for a step pod: 2, 3 or 4 (bad input) fail the
  task without retries; anything else is retried, and the retry resubmits the same resource.
  Past the step's timeout the job is deleted and the task fails (the Trainer's own
  ``activeDeadlineSeconds`` stops it as well, even with no one watching).
- The task log gives the ``kubectl logs`` selector of the job's pods when it starts, and the last
  lines of a failed node's log when it fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from airflow.providers.cncf.kubernetes.operators.resource import KubernetesCreateResourceOperator
from airflow.sdk import BaseSensorOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from fracture_ops.orchestration import trainjob as tj
from fracture_ops.orchestration.specs import StepSpec

log = logging.getLogger(__name__)
POLL_S = 30.0
LOG_TAIL_LINES = 40
API_ERRORS = 5  # consecutive failed reads the wait rides out before the task fails (and retries)


def _hook(conn_id: str | None):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    return KubernetesHook(conn_id=conn_id) if conn_id else KubernetesHook(conn_id=None, in_cluster=True)


def async_hook(conn_id: str | None):
    """The triggerer's client: the named connection, else the pod's in-cluster account (the
    async hook, unlike the sync one, never falls back to in-cluster config by itself)."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

    if conn_id:
        return AsyncKubernetesHook(conn_id=conn_id)
    return AsyncKubernetesHook(conn_id=None, in_cluster=True)


def _not_found(exc: BaseException) -> bool:
    return getattr(exc, "status", None) == 404


def fetch_sync(hook, name: str, namespace: str) -> tuple[dict | None, list[dict]]:
    """The TrainJob (None when absent) and its pods as API dicts, with the synchronous client."""
    from kubernetes.client import ApiClient

    try:
        job = hook.get_custom_object(tj.GROUP, tj.VERSION, tj.PLURAL, name, namespace)
    except Exception as exc:  # the client raises ApiException; 404: no such job
        if _not_found(exc):
            return None, []
        raise
    pods = hook.core_v1_client.list_namespaced_pod(namespace, label_selector=tj.log_selector(name)).items
    return job, ApiClient().sanitize_for_serialization(pods)


def delete_sync(hook, name: str, namespace: str) -> bool:
    """Delete the TrainJob and its JobSet, Jobs and pods (foreground); False if it was absent."""
    try:
        hook.delete_custom_object(tj.GROUP, tj.VERSION, tj.PLURAL, name, namespace,
                                  propagation_policy="Foreground")
    except Exception as exc:
        if _not_found(exc):
            return False
        raise
    return True


class TrainJobCreateOperator(KubernetesCreateResourceOperator):
    """Submit the TrainJob of a step (see the module docstring).

    ``arguments``, ``nodes``, ``gpus`` and ``run_key`` are templates (the step's CLI arguments,
    the trigger form's counts, the run folder key), rendered like a pod's arguments.
    """

    template_fields = (*KubernetesCreateResourceOperator.template_fields, "arguments", "nodes", "gpus",
                       "run_key")

    def __init__(self, *, spec: StepSpec, arguments: list[str], nodes: str, gpus: str, run_key: str,
                 settings=None, **kwargs):
        from fracture_ops.orchestration.pods import PodSettings

        self.settings = settings or PodSettings()
        super().__init__(yaml_conf="{}", custom_resource_definition=True, namespaced=True,
                         namespace=self.settings.namespace, **kwargs)
        self.spec, self.arguments, self.nodes, self.gpus, self.run_key = spec, arguments, nodes, gpus, run_key

    def body(self, run_id: str = "") -> dict:
        """The validated TrainJob of the rendered fields.

        Raises:
            AirflowFailException: the counts are not integers or the resource is not valid
                (no retry can fix either).
        """
        from airflow.sdk.exceptions import AirflowFailException

        try:
            request = tj.TrainJobRequest(name=tj.job_name(str(self.run_key), self.spec.name),
                                         args=[str(a) for a in self.arguments], nodes=int(self.nodes),
                                         gpus=int(self.gpus), run_id=run_id)
            return tj.validate(tj.build(self.spec, request, self.settings))
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None

    def execute(self, context) -> dict:
        import yaml

        body = self.body(str(context.get("run_id", "")))
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        if delete_sync(self.hook, name, namespace):  # an earlier try's job: replace it
            self.log.info("deleted TrainJob %s left by an earlier try", name)
            _wait_gone(self.hook, name, namespace)
        self.yaml_conf = yaml.safe_dump(body, sort_keys=False)
        super().execute(context)
        self.log.info("submitted TrainJob %s: %d nodes x %s GPUs; logs: %s", name,
                      body["spec"]["trainer"]["numNodes"], body["spec"]["trainer"]["numProcPerNode"],
                      tj.logs_hint(name, namespace))
        return {"trainjob": name, "namespace": namespace, "body": body}


def _wait_gone(hook, name: str, namespace: str, timeout_s: float = 300.0, poll_s: float = 2.0) -> None:
    """Block until a deleted TrainJob is gone (foreground deletion takes its pods first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job, _ = fetch_sync(hook, name, namespace)
        if job is None:
            return
        time.sleep(poll_s)
    raise TimeoutError(f"TrainJob {name} was not deleted within {timeout_s:.0f} s")


class TrainJobTrigger(BaseTrigger):
    """Poll a TrainJob in the triggerer until it completes, fails, or ``end_time`` (epoch s)
    passes; one event with ``status`` ``succeeded``, ``failed``, ``missing`` or ``timeout``, the
    condition's message and the failed nodes' exit codes."""

    def __init__(self, name: str, namespace: str, end_time: float, poll_s: float = POLL_S,
                 kubernetes_conn_id: str | None = None):
        super().__init__()
        self.name, self.namespace, self.end_time = name, namespace, end_time
        self.poll_s, self.kubernetes_conn_id = poll_s, kubernetes_conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"name": self.name, "namespace": self.namespace, "end_time": self.end_time,
                 "poll_s": self.poll_s, "kubernetes_conn_id": self.kubernetes_conn_id})

    async def fetch(self) -> tuple[dict | None, list[dict]]:
        """The job and its pods (API dicts), with the provider's async client."""
        from kubernetes_asyncio import client as async_client

        hook = async_hook(self.kubernetes_conn_id)
        async with hook.get_conn() as api:
            try:
                job = await async_client.CustomObjectsApi(api).get_namespaced_custom_object(
                    tj.GROUP, tj.VERSION, self.namespace, tj.PLURAL, self.name)
            except Exception as exc:
                if _not_found(exc):
                    return None, []
                raise
            pods = await async_client.CoreV1Api(api).list_namespaced_pod(
                self.namespace, label_selector=tj.log_selector(self.name))
            return job, api.sanitize_for_serialization(pods.items)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        errors = 0
        while True:
            try:
                job, pods = await self.fetch()
                errors = 0
            except Exception as exc:  # the API server restarting, a network blip: poll again
                errors += 1
                if errors > API_ERRORS:
                    yield TriggerEvent({"status": "error", "name": self.name, "exit_codes": [],
                                        "message": f"{errors} failed reads in a row, last: {exc}"})
                    return
                self.log.warning("TrainJob %s: read failed (%d of %d): %s", self.name, errors,
                                 API_ERRORS, exc)
                await asyncio.sleep(self.poll_s)
                continue
            st = tj.state(job, pods)
            if st.phase != "running":
                yield TriggerEvent({"status": st.phase, "message": st.message,
                                    "exit_codes": list(st.exit_codes), "name": self.name})
                return
            if time.time() >= self.end_time:
                yield TriggerEvent({"status": "timeout", "name": self.name,
                                    "message": f"still {st.message} at the step's timeout",
                                    "exit_codes": []})
                return
            self.log.info("TrainJob %s: %s", self.name, st.message)
            await asyncio.sleep(self.poll_s)


class TrainJobSensor(BaseSensorOperator):
    """Wait for the TrainJob that ``create_task_id`` submitted (deferrable; see the module
    docstring for the outcomes). ``run_key`` is the run folder key template (it names the job)."""

    template_fields = ("run_key",)

    def __init__(self, *, spec: StepSpec, create_task_id: str, run_key: str, settings=None,
                 kubernetes_conn_id: str | None = None, poll_s: float = POLL_S, deferrable: bool = True,
                 **kwargs):
        from fracture_ops.orchestration.pods import PodSettings

        kwargs.setdefault("timeout", spec.timeout_s)
        kwargs.setdefault("poke_interval", poll_s)
        super().__init__(**kwargs)
        self.deferrable = deferrable
        self.spec, self.create_task_id, self.run_key = spec, create_task_id, run_key
        self.settings = settings or PodSettings()
        self.kubernetes_conn_id, self.poll_s = kubernetes_conn_id, poll_s

    @property
    def job(self) -> str:
        return tj.job_name(str(self.run_key), self.spec.name)

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    # the cluster calls, one place each (tests replace them with fakes)
    def fetch(self) -> tuple[dict | None, list[dict]]:
        return fetch_sync(_hook(self.kubernetes_conn_id), self.job, self.namespace)

    def delete(self) -> bool:
        return delete_sync(_hook(self.kubernetes_conn_id), self.job, self.namespace)

    def resubmit(self, context) -> None:
        """Create the job again from the resource the create task submitted (a retry after an
        infrastructure failure trains again, resuming from the run's checkpoint)."""
        submitted = context["ti"].xcom_pull(task_ids=self.create_task_id)
        if not isinstance(submitted, dict) or "body" not in submitted:
            raise RuntimeError(f"no TrainJob from task {self.create_task_id} to resubmit")
        hook = _hook(self.kubernetes_conn_id)
        if delete_sync(hook, self.job, self.namespace):
            _wait_gone(hook, self.job, self.namespace)
        body = tj.validate(submitted["body"])
        hook.create_custom_object(tj.GROUP, tj.VERSION, tj.PLURAL, body, self.namespace)
        self.log.info("resubmitted TrainJob %s; logs: %s", self.job, tj.logs_hint(self.job, self.namespace))

    def node_logs(self, pods: list[dict]) -> str:
        """The last lines of each failed node's training container (best effort)."""
        hook, out = _hook(self.kubernetes_conn_id), []
        for pod in pods:
            if not tj.failed_exit_codes([pod]):
                continue
            name = pod["metadata"]["name"]
            try:
                text = hook.core_v1_client.read_namespaced_pod_log(
                    name, self.namespace, container=tj.NODE_CONTAINER, tail_lines=LOG_TAIL_LINES)
            except Exception as exc:  # logs are a courtesy: never hide the failure itself
                text = f"(no log: {exc})"
            out.append(f"--- {name}\n{text}")
        return "\n".join(out)

    def execute(self, context) -> Any:
        if not self.deferrable:  # poke in a worker slot
            return super().execute(context)
        st = self._current(context)
        if st.phase != "running":
            return self.finish(context, {"status": st.phase, "message": st.message,
                                         "exit_codes": list(st.exit_codes), "name": self.job})
        self.log.info("waiting for TrainJob %s (%s); logs: %s", self.job, st.message,
                      tj.logs_hint(self.job, self.namespace))
        self.defer(trigger=TrainJobTrigger(self.job, self.namespace, time.time() + float(self.timeout),
                                           self.poll_s, self.kubernetes_conn_id),
                   method_name="execute_complete", timeout=timedelta(seconds=float(self.timeout) + 600))

    def _current(self, context) -> tj.JobState:
        job, pods = self.fetch()
        st = tj.state(job, pods)
        retry = int(getattr(context.get("ti"), "try_number", 1) or 1) > 1
        if retry and st.phase in ("failed", "missing") and not st.bad_input(_not_retryable()):
            self.resubmit(context)
            return tj.JobState("running", "resubmitted")
        return st

    def poke(self, context) -> bool:  # the non-deferred path (deferrable=False)
        st = tj.state(*self.fetch())
        if st.phase == "running":
            return False
        self.finish(context, {"status": st.phase, "message": st.message,
                              "exit_codes": list(st.exit_codes), "name": self.job})
        return True

    def execute_complete(self, context, event: dict | None = None) -> dict:
        return self.finish(context, event or {})

    def finish(self, context, event: dict) -> dict:
        """Map the job's end to the task's: success (job deleted), bad input (no retry),
        infrastructure (retried), timeout (job deleted, no retry)."""
        from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSensorTimeout

        status, message = event.get("status"), event.get("message", "")
        codes = [int(c) for c in event.get("exit_codes") or []]
        if status == "succeeded":
            self.delete()
            self.log.info("TrainJob %s completed (%s); deleted", self.job, message)
            return {"trainjob": self.job, "status": "succeeded"}
        if status == "timeout":
            self.delete()
            raise AirflowSensorTimeout(f"TrainJob {self.job} did not finish within {self.timeout:.0f} s "
                                       f"({message}); deleted it")
        if status == "failed":
            _, pods = self.fetch()
            tail = self.node_logs(pods)
            if tail:
                self.log.error("failed nodes of TrainJob %s:\n%s", self.job, tail)
            bad = sorted(set(codes) & _not_retryable())
            if bad:
                raise AirflowFailException(f"TrainJob {self.job} failed: a node exited {bad[0]}: bad input "
                                           f"(not retried): {message}; job kept for inspection: "
                                           f"{tj.logs_hint(self.job, self.namespace)}")
            raise AirflowException(f"TrainJob {self.job} failed ({message}; exit codes {codes or 'none'}): "
                                   "retried, resubmitting the job")
        if status == "error":
            raise AirflowException(f"TrainJob {self.job}: the cluster could not be read ({message}): retried")
        raise AirflowException(f"TrainJob {self.job} is gone ({message}): retried, resubmitting the job")


def _not_retryable() -> set[int]:
    from fracture_ops.errors import NOT_RETRYABLE

    return set(NOT_RETRYABLE)
