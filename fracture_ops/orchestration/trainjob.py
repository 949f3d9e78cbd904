"""Multi-node training as a Kubeflow Trainer ``TrainJob`` (v2, ``trainer.kubeflow.org/v1alpha1``).

With ``nodes > 1`` the training DAG does not start one pod: it submits a ``TrainJob`` that runs
the step's own command (``fracture-ops fit --nproc-per-node G ...``) on ``nodes`` nodes of ``G``
GPUs each, with the platform's ``fracture-ops-torch`` ``ClusterTrainingRuntime``
(``infra/trainer/``: the Trainer's ``torch-distributed`` with the steps' failure rules). The Trainer
injects ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``; the
step's launcher (:func:`fracture_ops.training.distributed.launch`) hands them to torchrun, so the
argv is the single pod's argv.

This module builds the resource, validates it offline against the Trainer CRD's OpenAPI schema
(vendored from the released Kubeflow Trainer v2.3.0 manifests,
``manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml``, Apache-2.0, in
``schemas/trainjob-v2.3.0.json`` with the source file's SHA-256), and reads a job's state from its
status conditions and its pods' exit codes. It imports neither Airflow nor a Kubernetes client
at module level: the operator and the sensor are in :mod:`fracture_ops.orchestration.trainjob_ops`.

The nodes get the same hardening as step pods (non-root, read-only root filesystem, no
capabilities, no API token), the same scratch, cache and CA volumes, the GPU pool's toleration
and selector, and the credentials the spec names: the Trainer takes no ``envFrom``, so each key
of each Secret becomes one ``secretKeyRef``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fracture_ops.orchestration.specs import StepSpec

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "trainjob-v2.3.0.json"
# the replicated job and container of the torch-distributed runtime (charts/kubeflow-trainer/
# files/runtimes/torch-distributed.yaml): the runtime patches name them
NODE_JOB = NODE_CONTAINER = "node"
# JobSet labels every pod of the TrainJob's JobSet (named like the TrainJob) with this key
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
PATCH_MANAGER = "fracture-ops.io/airflow"
# the label the step namespace's network policy lets distributed nodes reach each other by
PEER_LABEL = "fracture-ops/distributed"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# the Failed condition's reason when activeDeadlineSeconds (the step's timeout) ran out
DEADLINE_REASON = "DeadlineExceeded"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@functools.lru_cache(maxsize=1)
def _schema_document() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def schema() -> dict:
    """The vendored ``openAPIV3Schema`` of the TrainJob CRD."""
    return _schema_document()["openAPIV3Schema"]


def job_name(run_key: str, step: str = "train") -> str:
    """The TrainJob of a DAG run's step: a DNS label (the CRD's rule: RFC 1035, <= 63 chars)
    that is the same on every try of the run, so a retry finds (and replaces) its own job."""
    digest = hashlib.sha256(f"{run_key}/{step}".encode()).hexdigest()[:16]
    return f"fracture-ops-{step.replace('_', '-')}-{digest}"


def _k8s_dicts(objs: list) -> list[dict]:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(objs)


def secret_env(spec: StepSpec, settings) -> list[dict]:
    """One ``secretKeyRef`` variable per key of each Secret the spec names (``optional`` keys,
    such as a MinIO endpoint left out for AWS S3, may be missing from the Secret)."""
    names = dict(settings.secrets)
    keys = dict(settings.secret_keys)
    out = []
    for kind in spec.secrets:
        for key, optional in keys[kind]:
            ref = {"name": names[kind], "key": key}
            if optional:
                ref["optional"] = True
            out.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return out


@dataclass(frozen=True)
class TrainJobRequest:
    """What one TrainJob runs: the step's rendered arguments on ``nodes`` x ``gpus``."""

    name: str
    args: list[str]
    nodes: int
    gpus: int
    run_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)


def build(spec: StepSpec, request: TrainJobRequest, settings=None) -> dict:
    """The TrainJob resource (a plain dict, as the API server receives it).

    Raises:
        ValueError: fewer than 2 nodes or no GPU (one node is the plain pod's job).
    """
    from fracture_ops.orchestration.pods import (PodSettings, container_security_context, pod_security_context,
                                                 step_environment, step_labels, step_placement, step_volumes)

    s = settings or PodSettings()
    if request.nodes < 2:
        raise ValueError(f"a TrainJob is for 2 or more nodes, not {request.nodes}: one node runs as a pod")
    if request.gpus < 1:
        raise ValueError(f"each node needs at least 1 GPU, not {request.gpus}")
    resources, tolerations, selector = step_placement(spec, s, str(request.gpus))
    volumes, mounts = step_volumes(spec, s)
    env = _k8s_dicts(step_environment(s)) + secret_env(spec, s)
    labels = {**step_labels(spec), PEER_LABEL: "true", **request.labels}
    [sec_ctx, pod_sec_ctx] = _k8s_dicts([container_security_context(), pod_security_context(s)])
    pod_spec = {"serviceAccountName": s.service_account, "securityContext": pod_sec_ctx,
                "volumes": _k8s_dicts(volumes),
                "containers": [{"name": NODE_CONTAINER, "securityContext": sec_ctx,
                                "volumeMounts": _k8s_dicts(mounts)}]}
    if tolerations:
        pod_spec["tolerations"] = _k8s_dicts(tolerations)
    if selector:
        pod_spec["nodeSelector"] = selector
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": NODE_JOB, "template": {"spec": {"template": {
            "metadata": {"labels": labels}, "spec": pod_spec}}}}]}}}}
    metadata = {"name": request.name, "namespace": s.namespace, "labels": {**step_labels(spec), **request.labels}}
    if s.kueue_queue:  # Kueue admits the job (it is created suspended) when quota allows
        metadata["labels"][KUEUE_LABEL] = s.kueue_queue
    if request.run_id:
        metadata["annotations"] = {"fracture-ops/run-id": request.run_id}
    return {
        "apiVersion": API_VERSION, "kind": KIND, "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": s.trainer_runtime},
            # the Trainer fails the job past the step's timeout, even with nobody watching
            "activeDeadlineSeconds": spec.timeout_s,
            "trainer": {
                "image": s.training_image if spec.image == "training" else s.platform_image,
                "command": ["fracture-ops"],
                "args": list(request.args),
                "numNodes": request.nodes,
                "numProcPerNode": request.gpus,
                "resourcesPerNode": {"requests": resources, "limits": dict(resources)},
                "env": env,
            },
            "runtimePatches": [patch],
        },
    }


# ---------------------------------------------------------------------------------- validation


def _walk(doc: Any, node: dict, where: str, out: list[str]) -> None:
    """Fields the structural schema does not declare (the API server prunes them, or refuses
    them with strict field validation): a misspelt field would silently do nothing."""
    if isinstance(doc, dict) and "properties" in node:
        for key, value in doc.items():
            if key in node["properties"]:
                _walk(value, node["properties"][key], f"{where}.{key}", out)
            elif not (where == "" and key in ("apiVersion", "kind", "metadata")):
                out.append(f"{where}.{key}".lstrip("."))
    elif isinstance(doc, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, value in doc.items():
            _walk(value, node["additionalProperties"], f"{where}.{key}", out)
    elif isinstance(doc, list) and "items" in node:
        for i, item in enumerate(doc):
            _walk(item, node["items"], f"{where}[{i}]", out)


def unknown_fields(doc: dict, openapi_schema: dict) -> list[str]:
    """Paths of ``doc``'s fields that ``openapi_schema`` (a CRD's structural schema) lacks."""
    out: list[str] = []
    _walk(doc, openapi_schema, "", out)
    return out


def problems(doc: dict) -> list[str]:
    """Why the API server would refuse or change ``doc``: the CRD schema's errors (types,
    required fields, bounds, enums), undeclared fields, and the CRD's name rules (its CEL
    validations, which a JSON-schema validator does not run). Empty: valid."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema())
    out = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
           for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    out += [f"{path}: not a field of {KIND} {VERSION}" for path in unknown_fields(doc, schema())]
    if (doc.get("apiVersion"), doc.get("kind")) != (API_VERSION, KIND):
        out.append(f"apiVersion/kind: {doc.get('apiVersion')}/{doc.get('kind')} is not {API_VERSION}/{KIND}")
    env = [e.get("name") for e in (((doc.get("spec") or {}).get("trainer") or {}).get("env") or [])]
    dup = sorted({n for n in env if env.count(n) > 1})
    if dup:  # a list keyed by name: the API server refuses duplicates
        out.append(f"spec.trainer.env: duplicate names {dup}")
    name = str((doc.get("metadata") or {}).get("name", ""))
    if not _DNS_LABEL.match(name):
        out.append(f"metadata.name: {name!r} must match RFC 1035 DNS label format")
    if len(name) > 63:
        out.append(f"metadata.name: {name!r} must be no more than 63 characters")
    return out


def validate(doc: dict) -> dict:
    """``doc`` if it is a valid TrainJob.

    Raises:
        ValueError: naming every problem (:func:`problems`).
    """
    found = problems(doc)
    if found:
        raise ValueError(f"TrainJob {doc.get('metadata', {}).get('name')!r} is not valid against the "
                         f"Kubeflow Trainer CRD ({SCHEMA_FILE.name}):\n  " + "\n  ".join(found))
    return doc


# ------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class JobState:
    """A TrainJob as the sensor sees it.

    Attributes:
        phase: ``running`` (created, queued, suspended or training), ``succeeded``, ``failed``,
            ``timeout`` (failed by its ``activeDeadlineSeconds``, the step's timeout) or
            ``missing`` (no such TrainJob).
        message: the deciding condition's reason and message.
        exit_codes: exit codes of the nodes' training containers that terminated non-zero
            (the step's own codes: 2, 3, 4 mean bad input).
    """

    phase: str
    message: str = ""
    exit_codes: tuple[int, ...] = ()

    def bad_input(self, not_retryable: set[int]) -> bool:
        """Whether a node exited with a code a retry cannot fix."""
        return any(code in not_retryable for code in self.exit_codes)


def _condition(job: dict, kind: str) -> dict | None:
    for cond in ((job.get("status") or {}).get("conditions") or []):
        if cond.get("type") == kind and str(cond.get("status")) == "True":
            return cond
    return None


def failed_exit_codes(pods: list[dict]) -> tuple[int, ...]:
    """Non-zero exit codes of the training containers of ``pods`` (API dicts, camelCase), in pod
    order, each pod's last termination if the container restarted."""
    codes = []
    for pod in pods:
        for status in ((pod.get("status") or {}).get("containerStatuses") or []):
            if status.get("name") != NODE_CONTAINER:
                continue
            # both: a container killed (143) after it restarted keeps its own code in lastState
            for state in (status.get("lastState") or {}, status.get("state") or {}):
                term = state.get("terminated")
                if term and term.get("exitCode"):
                    codes.append(int(term["exitCode"]))
    return tuple(codes)


def state(job: dict | None, pods: list[dict] | None = None) -> JobState:
    """The phase of a TrainJob from its ``Complete``/``Failed`` conditions (Trainer v2), with
    its nodes' exit codes when it failed."""
    if not job:
        return JobState("missing", "no such TrainJob")
    for kind, phase in (("Failed", "failed"), ("Complete", "succeeded")):
        cond = _condition(job, kind)
        if cond:
            message = f"{cond.get('reason', kind)}: {cond.get('message', '')}".strip(": ")
            if phase == "failed" and cond.get("reason") == DEADLINE_REASON:
                return JobState("timeout", message)  # the step's timeout, run out in the cluster
            codes = failed_exit_codes(pods or []) if phase == "failed" else ()
            return JobState(phase, message, codes)
    suspended = _condition(job, "Suspended")
    return JobState("running", "suspended (queued)" if suspended else "running")


def log_selector(name: str) -> str:
    """The label selector of the TrainJob's pods (for ``kubectl logs -l``)."""
    return f"{JOBSET_LABEL}={name}"


def logs_hint(name: str, namespace: str) -> str:
    """How a person follows the job's logs (printed in the task log)."""
    return (f"kubectl logs -n {namespace} -l {log_selector(name)} -c {NODE_CONTAINER} --prefix "
            f"--tail=-1 -f   (TrainJob {name}: kubectl get trainjob -n {namespace} {name})")
