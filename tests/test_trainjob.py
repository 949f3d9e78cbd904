"""Multi-node training as a Kubeflow Trainer TrainJob: the rendered resource validates against
the Trainer CRD's schema, runs the single pod's command, and the wait sensor maps Succeeded,
Failed (bad input or not) and a timeout the way step pods are mapped (faked status objects; no
cluster)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import time
from pathlib import Path

import pytest
import yaml

from fracture_ops.orchestration import trainjob as tj

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "manual__2026-01-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def kube_dag():
    from tests.test_dags import _dagbag

    bag = _dagbag({"FRACTURE_OPS_RUNNER": "kubernetes", "FRACTURE_OPS_TRAINING_IMAGE":
                   "registry.example/fracture-ops/training:1.2.3"})
    assert bag.import_errors == {}
    return bag.dags["fracture_training"]


def _context(dag, task, **params):
    from fracture_ops.orchestration.params import defaults

    return {"params": defaults(artifact_root="s3://fracture-ops-artifacts", **params),
            "run_id": RUN_ID, "dag": dag, "task": task}


def _task(dag, task_id: str, **params):
    """A copy of the task with its fields rendered (rendering replaces the templates)."""
    op = copy.deepcopy(dag.get_task(task_id))
    op.render_template_fields(_context(dag, op, **params))
    return op


def _rendered_job(dag, **params) -> dict:
    return _task(dag, "train_job", **params).body(RUN_ID)


def test_vendored_schema_is_the_released_crd():
    doc = json.loads(tj.SCHEMA_FILE.read_text())
    assert doc["source"].endswith("/v2.3.0/manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml")
    assert (doc["crd"], doc["group"], doc["version"]) == ("trainjobs.trainer.kubeflow.org", tj.GROUP, tj.VERSION)
    assert len(doc["source_sha256"]) == 64
    spec = tj.schema()["properties"]["spec"]
    assert spec["required"] == ["runtimeRef"]
    assert {"numNodes", "numProcPerNode", "resourcesPerNode", "command", "args", "env", "image"} <= \
        set(spec["properties"]["trainer"]["properties"])


def test_rendered_trainjob_validates_and_runs_the_pods_command(kube_dag):
    """nodes=3, gpus=4: a valid TrainJob (vendored CRD schema, CEL name rules, no undeclared
    field) running the training pod's exact arguments on 3 nodes x 4 GPUs, hardened like a
    step pod, credentials by secretKeyRef only."""
    from kubernetes.client import ApiClient

    from fracture_ops.orchestration.pods import PodSettings

    job = _rendered_job(kube_dag, nodes=3, gpus=4)
    assert tj.problems(job) == []
    pod_op = _task(kube_dag, "train", nodes=3, gpus=4)
    trainer = job["spec"]["trainer"]
    assert trainer["args"] == list(pod_op.arguments) and trainer["command"] == pod_op.cmds == ["fracture-ops"]
    assert trainer["args"][trainer["args"].index("--nproc-per-node") + 1] == "4"
    assert trainer["image"] == "registry.example/fracture-ops/training:1.2.3"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["resourcesPerNode"]["requests"] == trainer["resourcesPerNode"]["limits"]
    assert job["spec"]["runtimeRef"] == {"apiGroup": tj.GROUP, "kind": "ClusterTrainingRuntime",
                                         "name": "fracture-ops-torch"}  # infra/trainer/
    assert job["spec"]["activeDeadlineSeconds"] == pod_op.execution_timeout.total_seconds()
    # the same name on every try of the run, a DNS label
    assert job["metadata"]["name"] == tj.job_name(RUN_ID.replace(":", "-").replace("+", "-"))
    assert job["metadata"]["namespace"] == PodSettings().namespace
    # credentials: references only, for exactly the pod's Secrets; no value in the resource
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["name"]) for e in trainer["env"] if "valueFrom" in e}
    assert {name for name, _ in refs} == {"fracture-ops-s3", "fracture-ops-mlflow"}
    assert ("fracture-ops-mlflow", "MLFLOW_TRACKING_PASSWORD") in refs
    pod = ApiClient().sanitize_for_serialization(pod_op.build_pod_request_obj(dry_run=True))
    pod_env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    node_env = {e["name"]: e.get("value") for e in trainer["env"] if "value" in e}
    assert {k: v for k, v in pod_env.items() if k != "FRACTURE_OPS_XCOM_FILE"} == node_env
    # the nodes' pod template: the step pod's hardening, volumes, GPU placement and account
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    spec = node["template"]["spec"]["template"]["spec"]
    assert spec["securityContext"] == pod["spec"]["securityContext"]
    (container,) = spec["containers"]
    assert container["name"] == "node"
    assert container["securityContext"] == pod["spec"]["containers"][0]["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # the pod's volumes but the XCom sidecar's (a TrainJob's summary stays in the run folder)
    assert container["volumeMounts"] == [m for m in pod["spec"]["containers"][0]["volumeMounts"]
                                         if m["name"] != "xcom"]
    assert spec["volumes"] == [v for v in pod["spec"]["volumes"] if v["name"] != "xcom"]
    assert spec["tolerations"] == pod["spec"]["tolerations"] and spec["nodeSelector"] == pod["spec"]["nodeSelector"]
    assert spec["serviceAccountName"] == pod["spec"]["serviceAccountName"] == "fracture-ops-step"


def test_trainjob_keys_name_every_key_of_the_step_secrets():
    """The nodes take no envFrom: each Secret key is listed; the lists match the templates."""
    from fracture_ops.orchestration.pods import PodSettings

    s = PodSettings()
    templates = {}
    for path in (REPO / "infra" / "secrets").glob("*.template.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Secret" and doc["metadata"]["namespace"] == s.namespace:
                templates[doc["metadata"]["name"]] = set(doc["stringData"])
    for kind, name in s.secrets:
        assert {k for k, _ in dict(s.secret_keys)[kind]} == templates[name], name


def test_schema_validation_names_what_is_wrong(kube_dag):
    job = _rendered_job(kube_dag, nodes=2, gpus=1)
    bad = json.loads(json.dumps(job))
    bad["spec"]["trainer"]["numNodes"] = "two"
    bad["spec"]["trainer"]["gpus"] = 2  # not a field: the API server would drop it silently
    bad["spec"]["runtimeRef"].pop("name")
    bad["metadata"]["name"] = "Train_Job"
    found = "\n".join(tj.problems(bad))
    for expected in ("spec.trainer.numNodes: 'two' is not of type 'integer'",
                     "spec.trainer.gpus: not a field", "'name' is a required property",
                     "metadata.name: 'Train_Job' must match RFC 1035"):
        assert expected in found
    with pytest.raises(ValueError, match="not valid against the Kubeflow Trainer CRD"):
        tj.validate(bad)
    long = json.loads(json.dumps(job))
    long["metadata"]["name"] = "a" * 64
    assert any("no more than 63" in p for p in tj.problems(long))
    with pytest.raises(ValueError, match="one node runs as a pod"):
        tj.build(_spec(), tj.TrainJobRequest("x", ["fit"], nodes=1, gpus=1))


def test_bad_counts_fail_the_submit_task_without_retry(kube_dag):
    from airflow.sdk.exceptions import AirflowFailException

    op = _task(kube_dag, "train_job", nodes=2, gpus=1)
    op.nodes = "many"
    with pytest.raises(AirflowFailException, match="train_job"):
        op.body(RUN_ID)


def test_kueue_queue_label(monkeypatch):
    from fracture_ops.orchestration.pods import PodSettings

    monkeypatch.setenv("FRACTURE_OPS_KUEUE_QUEUE", "gpu-queue")
    job = tj.build(_spec(), tj.TrainJobRequest("fracture-ops-train-q", ["fit"], nodes=2, gpus=8),
                   PodSettings())
    assert job["metadata"]["labels"][tj.KUEUE_LABEL] == "gpu-queue" and tj.problems(job) == []


def test_route_and_graph(kube_dag):
    """nodes routes to the pod or the TrainJob; the readers of train's outputs follow the join,
    which runs after whichever branch ran."""
    route = kube_dag.get_task("train_nodes")
    assert route.python_callable(params={"nodes": 1}) == "train"
    assert route.python_callable(params={"nodes": 4}) == "train_job"
    edges = {(t.task_id, d) for t in kube_dag.tasks for d in t.downstream_task_ids}
    assert {("split", "train_nodes"), ("train_nodes", "train"), ("train_nodes", "train_job"),
            ("train_job", "train_job_wait"), ("train", "train_done"), ("train_job_wait", "train_done"),
            ("train_done", "calibrate")} <= edges
    assert not {(a, b) for a, b in edges if a in ("train", "train_job_wait") and b != "train_done"}
    assert kube_dag.get_task("train_done").trigger_rule == "none_failed_min_one_success"
    from fracture_ops.orchestration.trainjob_ops import TrainJobSensor

    assert isinstance(kube_dag.get_task("train_job_wait"), TrainJobSensor)


def test_local_runner_refuses_more_than_one_node():
    from airflow.sdk.exceptions import AirflowFailException

    from fracture_ops.orchestration.airflow_tasks import run_local_step

    with pytest.raises(AirflowFailException, match="nodes=2 needs FRACTURE_OPS_RUNNER=kubernetes"):
        run_local_step(_spec(), {"params": {"nodes": 2}, "run_id": RUN_ID})


def test_submit_replaces_an_earlier_trys_job_and_creates_the_validated_resource(kube_dag, monkeypatch):
    from fracture_ops.orchestration import trainjob_ops

    op = _task(kube_dag, "train_job", nodes=2, gpus=2)
    context = _context(kube_dag, op, nodes=2, gpus=2)
    calls = []
    monkeypatch.setattr(trainjob_ops, "delete_sync", lambda hook, name, ns: calls.append(("delete", name)) or True)
    monkeypatch.setattr(trainjob_ops, "_wait_gone", lambda hook, name, ns: calls.append(("gone", name)))
    monkeypatch.setattr(type(op), "hook", property(lambda self: object()))
    monkeypatch.setattr(op, "create_custom_from_yaml_object", lambda body: calls.append(("create", body)))
    out = op.execute(context)
    name = out["trainjob"]
    assert (out["body"]["spec"]["trainer"]["numNodes"], out["body"]["spec"]["trainer"]["numProcPerNode"]) == (2, 2)
    assert [c[0] for c in calls] == ["delete", "gone", "create"]
    created = calls[2][1]
    assert created == out["body"] and created["metadata"]["name"] == name and tj.problems(created) == []
    assert created["metadata"]["annotations"]["fracture-ops/run-id"] == RUN_ID


# ------------------------------------------------------------------ the wait: faked statuses


def _spec():
    from fracture_ops.orchestration.specs import TRAINING_STEPS

    return TRAINING_STEPS["train"]


def _job(*conditions: tuple[str, str, str]) -> dict:
    return {"apiVersion": tj.API_VERSION, "kind": tj.KIND, "metadata": {"name": "j"},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m}
                                      for t, r, m in conditions]}}


def _pod(name: str, code: int | None, restarted: int | None = None) -> dict:
    state = {"terminated": {"exitCode": code}} if code is not None else {"running": {}}
    status = {"name": "node", "state": state}
    if restarted is not None:
        status["lastState"] = {"terminated": {"exitCode": restarted}}
    return {"metadata": {"name": name}, "status": {"containerStatuses": [status]}}


RUNNING = _job(("Created", "JobSetCreated", "created"))
QUEUED = _job(("Suspended", "Suspended", "queued by Kueue"))
COMPLETE = _job(("Created", "JobSetCreated", ""), ("Complete", "JobSetCompleted", "jobset completed"))
FAILED = _job(("Failed", "FailedJobs", "jobset failed: job node-0 has failed"))


def test_state_from_conditions_and_exit_codes():
    assert tj.state(None).phase == "missing"
    assert tj.state(RUNNING).phase == "running" and tj.state(QUEUED).message == "suspended (queued)"
    assert tj.state(COMPLETE).phase == "succeeded"
    failed = tj.state(FAILED, [_pod("n0", 0), _pod("n1", 3), _pod("n2", None, restarted=137)])
    assert failed.phase == "failed" and failed.exit_codes == (3, 137)
    # a node that exited 3, restarted, then was killed when the job failed: its 3 still counts
    assert tj.state(FAILED, [_pod("n0", 143, restarted=3)]).bad_input({2, 3, 4})
    # the Trainer's activeDeadlineSeconds (the step's timeout) is a timeout, not a failure
    deadline = tj.state(_job(("Failed", "DeadlineExceeded", "TrainJob exceeded its deadline")))
    assert deadline.phase == "timeout"
    assert failed.bad_input({2, 3, 4}) and "FailedJobs" in failed.message
    assert not tj.state(FAILED, [_pod("n1", 1)]).bad_input({2, 3, 4})
    # a condition that is not True does not count
    off = _job(("Complete", "JobSetCompleted", ""))
    off["status"]["conditions"][0]["status"] = "False"
    assert tj.state(off).phase == "running"


class FakeCluster:
    """The job's statuses in the order the sensor/trigger reads them (the last repeats)."""

    def __init__(self, *jobs, pods=()):
        self.jobs, self.pods, self.reads, self.deleted, self.resubmitted = list(jobs), list(pods), 0, 0, 0

    def next(self):
        self.reads += 1
        job = self.jobs.pop(0) if len(self.jobs) > 1 else self.jobs[0]
        return job, self.pods


def _sensor(cluster: FakeCluster, monkeypatch, timeout: float = 3600):
    from fracture_ops.orchestration.trainjob_ops import TrainJobSensor

    sensor = TrainJobSensor(spec=_spec(), create_task_id="train_job", run_key="run-1",
                            task_id="train_job_wait", timeout=timeout, poll_s=0.0)
    monkeypatch.setattr(sensor, "fetch", cluster.next)
    monkeypatch.setattr(sensor, "delete", lambda: setattr(cluster, "deleted", cluster.deleted + 1) or True)
    monkeypatch.setattr(sensor, "resubmit", lambda ctx: setattr(cluster, "resubmitted", cluster.resubmitted + 1))
    monkeypatch.setattr(sensor, "node_logs", lambda pods: "RuntimeError: bad image /data/x.png")
    return sensor


def _trigger_events(cluster: FakeCluster, monkeypatch, end_time: float) -> list[dict]:
    from fracture_ops.orchestration.trainjob_ops import TrainJobTrigger

    trigger = TrainJobTrigger("fracture-ops-train-x", "fracture-ops-steps", end_time, poll_s=0.0)
    kind, kwargs = trigger.serialize()
    assert kind == "fracture_ops.orchestration.trainjob_ops.TrainJobTrigger"
    assert TrainJobTrigger(**kwargs).serialize() == (kind, kwargs)

    async def fetch():
        return cluster.next()

    monkeypatch.setattr(trigger, "fetch", fetch)

    async def collect():
        return [e.payload async for e in trigger.run()]

    return asyncio.run(collect())


class TI:
    def __init__(self, try_number=1):
        self.try_number = try_number


def test_sensor_defers_then_succeeds_and_deletes_the_job(monkeypatch):
    from airflow.sdk.exceptions import TaskDeferred

    cluster = FakeCluster(QUEUED, QUEUED, RUNNING, RUNNING, COMPLETE)
    sensor = _sensor(cluster, monkeypatch)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({"ti": TI()})
    assert deferred.value.method_name == "execute_complete"
    kind, kwargs = deferred.value.trigger.serialize()
    assert kwargs["name"] == tj.job_name("run-1") and kwargs["namespace"] == "fracture-ops-steps"
    (event,) = _trigger_events(cluster, monkeypatch, end_time=time.time() + 60)
    assert event["status"] == "succeeded" and cluster.reads == 5
    assert sensor.execute_complete({"ti": TI()}, event) == {"trainjob": tj.job_name("run-1"),
                                                          "status": "succeeded"}
    assert cluster.deleted == 1


@pytest.mark.parametrize("code, retried", [(3, False), (2, False), (4, False), (1, True), (137, True)])
def test_failed_job_bad_input_is_not_retried_and_infrastructure_is(monkeypatch, code, retried):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    cluster = FakeCluster(RUNNING, FAILED, pods=[_pod("node-0", 0), _pod("node-1", code)])
    sensor = _sensor(cluster, monkeypatch)
    (event,) = _trigger_events(cluster, monkeypatch, end_time=time.time() + 60)
    assert event["status"] == "failed" and event["exit_codes"] == [code]
    with pytest.raises(AirflowException) as err:
        sensor.execute_complete({"ti": TI()}, event)
    assert isinstance(err.value, AirflowFailException) is not retried
    assert ("not retried" in str(err.value)) is not retried
    assert cluster.deleted == 0  # a failed job stays for inspection (its logs)


def test_retry_after_an_infrastructure_failure_resubmits(monkeypatch):
    """The sensor's retry finds the failed job (exit 1) and submits it again; a bad-input
    failure found on a retry still fails without resubmitting."""
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    cluster = FakeCluster(FAILED, pods=[_pod("node-0", 1)])
    sensor = _sensor(cluster, monkeypatch)
    with pytest.raises(TaskDeferred):
        sensor.execute({"ti": TI(try_number=2)})
    assert cluster.resubmitted == 1
    bad = FakeCluster(FAILED, pods=[_pod("node-0", 3)])
    sensor = _sensor(bad, monkeypatch)
    with pytest.raises(AirflowFailException, match="exited 3"):
        sensor.execute({"ti": TI(try_number=2)})
    assert bad.resubmitted == 0


def test_timeout_deletes_the_job_and_fails(monkeypatch):
    from airflow.sdk.exceptions import AirflowSensorTimeout

    cluster = FakeCluster(QUEUED)
    sensor = _sensor(cluster, monkeypatch, timeout=5)
    (event,) = _trigger_events(cluster, monkeypatch, end_time=time.time() - 1)
    assert event["status"] == "timeout" and "suspended" in event["message"]
    with pytest.raises(AirflowSensorTimeout, match="did not finish within 5 s"):
        sensor.execute_complete({"ti": TI()}, event)
    assert cluster.deleted == 1


def test_vanished_job_is_retried(monkeypatch):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    cluster = FakeCluster(None)
    (event,) = _trigger_events(cluster, monkeypatch, end_time=time.time() + 60)
    assert event["status"] == "missing"
    with pytest.raises(AirflowException) as err:
        _sensor(cluster, monkeypatch).execute_complete({"ti": TI()}, event)
    assert not isinstance(err.value, AirflowFailException)


def test_job_name_is_a_stable_dns_label():
    a = tj.job_name("manual__2026-01-01T00-00-00-00-00")
    assert a == tj.job_name("manual__2026-01-01T00-00-00-00-00") != tj.job_name("other")
    assert len(a) <= 63 and tj._DNS_LABEL.match(a)
    assert a.endswith(hashlib.sha256(b"manual__2026-01-01T00-00-00-00-00/train").hexdigest()[:16])


def test_wait_rides_out_api_errors_then_fails_retryably(monkeypatch):
    """A few failed reads in a row (API server restart) do not end the wait; more than
    API_ERRORS do, as a retryable failure."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from fracture_ops.orchestration.trainjob_ops import API_ERRORS

    class Flaky(FakeCluster):
        def __init__(self, fails, *jobs):
            super().__init__(*jobs)
            self.fails = fails

        def next(self):
            if self.fails:
                self.fails -= 1
                raise ConnectionError("apiserver restarting")
            return super().next()

    (event,) = _trigger_events(Flaky(API_ERRORS, RUNNING, COMPLETE), monkeypatch, time.time() + 60)
    assert event["status"] == "succeeded"
    cluster = Flaky(API_ERRORS + 1, RUNNING)
    (event,) = _trigger_events(cluster, monkeypatch, time.time() + 60)
    assert event["status"] == "error" and "apiserver restarting" in event["message"]
    with pytest.raises(AirflowException) as err:
        _sensor(cluster, monkeypatch).execute_complete({"ti": TI()}, event)
    assert not isinstance(err.value, AirflowFailException) and cluster.deleted == 0


def test_deadline_in_the_cluster_is_a_timeout_and_not_resubmitted(monkeypatch):
    from airflow.sdk.exceptions import AirflowSensorTimeout

    cluster = FakeCluster(_job(("Failed", "DeadlineExceeded", "TrainJob exceeded its deadline")))
    sensor = _sensor(cluster, monkeypatch)
    with pytest.raises(AirflowSensorTimeout):
        sensor.execute({"ti": TI(try_number=2)})
    assert cluster.resubmitted == 0 and cluster.deleted == 1


def test_the_wait_reads_the_cluster_in_cluster_without_a_connection():
    """In the triggerer pod there is no kubernetes_default connection: the async client must
    use the pod's account (the provider's async hook does not fall back to it by itself)."""
    from fracture_ops.orchestration.trainjob_ops import _hook, async_hook

    assert async_hook(None).in_cluster is True and _hook(None).in_cluster is True
    named = async_hook("site_k8s")
    assert named.conn_id == "site_k8s" and named.in_cluster is None


def test_duplicate_env_names_are_refused(kube_dag):
    job = _rendered_job(kube_dag, nodes=2, gpus=1)
    job["spec"]["trainer"]["env"].append(dict(job["spec"]["trainer"]["env"][0]))
    assert any("duplicate names" in p for p in tj.problems(job))
