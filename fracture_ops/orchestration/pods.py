"""The ``kubernetes`` runner: a KubernetesPodOperator per step spec.

GPU steps request ``nvidia.com/gpu``, tolerate the GPU pool's taint and select its nodes; every
pod takes the credentials its spec names (``spec.secrets``) from Kubernetes Secrets (names only
here, never values), mounts the dataset cache volume, waits long enough for a GPU node to scale
up, is deleted when done, and hands its JSON summary back as XCom through
``/airflow/xcom/return.json``. Image names and cluster names are configuration (environment of
the scheduler/worker).

Step pods run in their own namespace (``fracture-ops-steps``, Pod Security ``restricted``
enforced) and meet that profile in every container, the XCom sidecar included: non-root user,
no privilege escalation, all capabilities dropped, the runtime's default seccomp profile, a
read-only root filesystem (``/tmp`` is a size-limited emptyDir, ``HOME`` points there), and
CPU, memory and ephemeral-storage requests equal to limits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fracture_ops.orchestration.specs import StepSpec
from fracture_ops import envvars

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class PodSettings:
    """Cluster-side names, from the environment (see infra/README.md)."""

    namespace: str = field(default_factory=lambda: os.environ.get(envvars.K8S_NAMESPACE,
                                                                  "fracture-ops-steps"))
    # step pods parse untrusted images: they run under an account with no API rights and no token
    service_account: str = field(default_factory=lambda: os.environ.get(
        envvars.K8S_STEP_SERVICE_ACCOUNT, "fracture-ops-step"))
    training_image: str = field(default_factory=lambda: os.environ.get(
        envvars.TRAINING_IMAGE, "ghcr.io/fracture-ops/training:0.1.0"))
    platform_image: str = field(default_factory=lambda: os.environ.get(
        envvars.PLATFORM_IMAGE, "ghcr.io/fracture-ops/training:0.1.0"))
    gpu_taint_key: str = "nvidia.com/gpu"
    gpu_node_selector: tuple[tuple[str, str], ...] = (("fracture-ops/pool", "gpu"),)
    # Kubernetes Secret per credential kind; a pod gets only those its spec names (spec.secrets)
    # (mlflow: the pipeline identity, which cannot move the champion; promoter: the identity that
    # can, given to the promotion step alone)
    secrets: tuple[tuple[str, str], ...] = (("mlflow", "fracture-ops-mlflow"),
                                            ("promoter", "fracture-ops-mlflow-promoter"),
                                            ("gate", "fracture-ops-mlflow-gate"),
                                            ("s3", "fracture-ops-s3"),
                                            ("deid", "fracture-ops-deid"),
                                            ("pacs", "fracture-ops-pacs"))
    # the keys of each Secret (infra/secrets/*.template.yaml), for the TrainJob's nodes, whose
    # container takes no envFrom; True: the key may be absent (the MinIO endpoints on AWS S3)
    secret_keys: tuple[tuple[str, tuple[tuple[str, bool], ...]], ...] = (
        ("mlflow", (("MLFLOW_TRACKING_URI", False), ("MLFLOW_TRACKING_USERNAME", False),
                    ("MLFLOW_TRACKING_PASSWORD", False))),
        ("promoter", (("MLFLOW_TRACKING_URI", False), ("MLFLOW_TRACKING_USERNAME", False),
                      ("MLFLOW_TRACKING_PASSWORD", False))),
        ("gate", (("MLFLOW_TRACKING_URI", False), ("MLFLOW_TRACKING_USERNAME", False),
                  ("MLFLOW_TRACKING_PASSWORD", False))),
        ("s3", (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                ("S3_ENDPOINT_URL", True), ("MLFLOW_S3_ENDPOINT_URL", True))),
        ("deid", ((envvars.DEID_SECRET, False),)),
        ("pacs", ((envvars.PACS_URL, False), (envvars.PACS_USERNAME, False),
                  (envvars.PACS_PASSWORD, False))))
    # the Kubeflow Trainer runtime of multi-node training: infra/trainer/fracture-ops-torch.yaml
    # (torch-distributed with the steps' failure rules: no in-place restarts, exit 2/3/4 kept)
    trainer_runtime: str = field(default_factory=lambda: os.environ.get(
        envvars.TRAINER_RUNTIME, "fracture-ops-torch"))
    # Kueue LocalQueue the TrainJobs are queued in ("" = no Kueue: they start at once)
    kueue_queue: str = field(default_factory=lambda: os.environ.get(envvars.KUEUE_QUEUE, ""))
    # passed through from the scheduler/worker environment (configuration, not secrets)
    passthrough_env: tuple[str, ...] = (envvars.APPROVERS, envvars.GATE_USERS,
                                        envvars.APPROVAL_PUBKEY, envvars.DATA_ROOTS,
                                        envvars.AUDIT_URI,
                                        envvars.REFERENCE_TEST_URI,
                                        envvars.REFERENCE_TEST_HASH,
                                        envvars.MIN_TEST_SIZE)
    # the CA of the platform's TLS certificates (Secret with key ca.crt; "" = none, plain HTTP)
    ca_secret: str = field(default_factory=lambda: os.environ.get(envvars.K8S_CA_SECRET,
                                                                  "fracture-ops-ca"))
    ca_mount: str = "/etc/fracture-ops/ca"
    cache_claim: str = "fracture-ops-cache"
    cache_mount: str = "/cache"
    startup_timeout_s: int = 1800  # GPU node scale-up can take many minutes
    run_as_user: int = 10001  # the images' unprivileged user (docker/training/Dockerfile)
    sidecar_resources: tuple[tuple[str, str], ...] = (("cpu", "10m"), ("memory", "16Mi"),
                                                      ("ephemeral-storage", "16Mi"))


def container_security_context():
    """What the ``restricted`` Pod Security profile requires of a container, and a read-only
    root filesystem on top."""
    from kubernetes.client import models as k8s

    return k8s.V1SecurityContext(
        allow_privilege_escalation=False, read_only_root_filesystem=True, run_as_non_root=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def pod_security_context(s: PodSettings):
    from kubernetes.client import models as k8s

    return k8s.V1PodSecurityContext(
        run_as_non_root=True, run_as_user=s.run_as_user, run_as_group=s.run_as_user,
        fs_group=s.run_as_user, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def step_environment(s: PodSettings) -> list:
    """The environment of every step container (pod or TrainJob node): cache, offline switches,
    scratch paths on the writable ``/tmp``, the platform CA and the pass-through configuration."""
    from kubernetes.client import models as k8s

    env = [k8s.V1EnvVar(name=envvars.CACHE_DIR, value=s.cache_mount),
           k8s.V1EnvVar(name=envvars.NO_PROGRESS, value="1"),
           k8s.V1EnvVar(name="HF_HUB_OFFLINE", value="1"),
           k8s.V1EnvVar(name="YOLO_OFFLINE", value="1"),
           k8s.V1EnvVar(name="HOME", value="/tmp"), k8s.V1EnvVar(name="TMPDIR", value="/tmp"),
           k8s.V1EnvVar(name="XDG_CACHE_HOME", value="/tmp/.cache"),
           k8s.V1EnvVar(name="MPLCONFIGDIR", value="/tmp/matplotlib"),
           # steps in pods run for a deployment: e.g. the gate requires a pinned reference set
           k8s.V1EnvVar(name=envvars.RUNNER, value="kubernetes")]
    if s.ca_secret:  # MLflow and MinIO speak TLS: trust the platform's CA (boto3, MLflow client)
        ca_file = f"{s.ca_mount}/ca.crt"
        env += [k8s.V1EnvVar(name="AWS_CA_BUNDLE", value=ca_file),
                k8s.V1EnvVar(name="MLFLOW_TRACKING_SERVER_CERT_PATH", value=ca_file)]
    return env + [k8s.V1EnvVar(name=k, value=os.environ[k]) for k in s.passthrough_env if k in os.environ]


def step_volumes(spec: StepSpec, s: PodSettings) -> tuple[list, list]:
    """``(volumes, mounts)`` of a step container: the dataset cache, a size-limited ``/tmp``
    (the root filesystem is read-only) and the platform CA."""
    from kubernetes.client import models as k8s

    volume = k8s.V1Volume(name="dataset-cache", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=s.cache_claim))
    mount = k8s.V1VolumeMount(name="dataset-cache", mount_path=s.cache_mount)
    tmp = k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=spec.ephemeral))
    tmp_mount = k8s.V1VolumeMount(name="tmp", mount_path="/tmp")
    volumes, mounts = [volume, tmp], [mount, tmp_mount]
    if s.ca_secret:
        volumes.append(k8s.V1Volume(name="ca", secret=k8s.V1SecretVolumeSource(
            secret_name=s.ca_secret, items=[k8s.V1KeyToPath(key="ca.crt", path="ca.crt")])))
        mounts.append(k8s.V1VolumeMount(name="ca", mount_path=s.ca_mount, read_only=True))
    return volumes, mounts


def step_placement(spec: StepSpec, s: PodSettings, gpus: str) -> tuple[dict, list, dict]:
    """``(resources, tolerations, node selector)`` of a step container: CPU, memory and disk as
    the spec asks (requests = limits), and for a GPU step ``gpus`` GPUs on the GPU pool."""
    from kubernetes.client import models as k8s

    resources = {"cpu": spec.cpu, "memory": spec.memory, "ephemeral-storage": spec.ephemeral}
    if not spec.gpu:
        return resources, [], {}
    tolerations = [k8s.V1Toleration(key=s.gpu_taint_key, operator="Exists", effect="NoSchedule")]
    return {**resources, GPU_RESOURCE: gpus}, tolerations, dict(s.gpu_node_selector)


def step_labels(spec: StepSpec) -> dict[str, str]:
    """The labels of a step's pods (the network policies select on the component, and let
    the pods holding the PACS credential reach the PACS)."""
    labels = {"app.kubernetes.io/part-of": "fracture-ops", "fracture-ops/step": spec.name,
              "app.kubernetes.io/component": "step"}
    if "pacs" in spec.secrets:
        labels["fracture-ops/pacs"] = "true"
    return labels


def _exit_code(remote_pod, container: str) -> int | None:
    statuses = (remote_pod.status.container_statuses if remote_pod and remote_pod.status else None) or []
    status = next((x for x in statuses if x.name == container), None)
    term = status.state.terminated if status and status.state else None
    return term.exit_code if term else None


def _operator_class():
    """KubernetesPodOperator that fails without retries when the step exits with a code of
    :data:`fracture_ops.errors.NOT_RETRYABLE`, like the local runner; the provider itself would
    retry every failure."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowFailException

    from fracture_ops.errors import NOT_RETRYABLE

    class StepPodOperator(KubernetesPodOperator):
        sidecar_resources: dict | None = None

        def build_pod_request_obj(self, context=None, *args, **kwargs):
            """The provider's pod, with the XCom sidecar given requests and limits too (the
            provider sets requests only)."""
            from kubernetes.client import models as k8s

            pod = super().build_pod_request_obj(context, *args, **kwargs)
            for c in pod.spec.containers:
                if c.name != self.base_container_name and self.sidecar_resources:
                    c.resources = k8s.V1ResourceRequirements(
                        requests=dict(self.sidecar_resources), limits=dict(self.sidecar_resources))
            return pod

        def cleanup(self, pod, remote_pod):
            code = _exit_code(remote_pod, self.base_container_name)
            try:
                return super().cleanup(pod, remote_pod)
            except AirflowFailException:
                raise
            except Exception as exc:
                if code in NOT_RETRYABLE:
                    raise AirflowFailException(f"step exited {code}: bad input (not retried): {exc}") from exc
                raise

    return StepPodOperator


def pod_arguments(spec: StepSpec, inputs: dict | None = None) -> list:
    """The pod's arguments: the spec's templates, with each ``{{ inputs.<name> }}`` replaced by
    the XComArg itself (Airflow resolves it when it renders the arguments)."""
    from fracture_ops.orchestration.specs import input_ref

    refs = {input_ref(name): name for name, _, _ in spec.inputs}
    missing = set(refs.values()) - set(inputs or {})
    if missing:
        raise ValueError(f"step {spec.name!r} needs inputs {sorted(missing)}")
    return [inputs[refs[a]] if a in refs else a for a in spec.args]


def pod_operator(spec: StepSpec, settings: PodSettings | None = None, inputs: dict | None = None,
                 mapped_arguments=None, **task_kwargs):
    """Build the pod operator for a spec (same task kwargs as the local runner's task).

    ``mapped_arguments``: for a spec with :attr:`~StepSpec.expand`, the XComArg holding one
    rendered argument list per mapped task; the operator is then mapped over it (one pod per
    element, Airflow's dynamic task mapping). Values that come through XCom are not rendered
    as templates by Airflow, so the list arrives rendered.
    """
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    s = settings or PodSettings()
    # a trigger parameter's GPU count is a template the provider renders in the resources
    gpus = ("{{ params." + spec.gpus_param + " }}") if spec.gpus_param else str(spec.gpu)
    requests, tolerations, selector = step_placement(spec, s, gpus)
    limits = dict(requests)
    volumes, mounts = step_volumes(spec, s)
    operator = _operator_class()
    operator.sidecar_resources = dict(s.sidecar_resources)
    kwargs = dict(
        name=f"fracture-ops-{spec.name.replace('_', '-')}",
        namespace=s.namespace,
        service_account_name=s.service_account,
        automount_service_account_token=False,
        image=s.training_image if spec.image == "training" else s.platform_image,
        cmds=["fracture-ops"],
        env_vars=[*step_environment(s),
                  k8s.V1EnvVar(name=envvars.XCOM_FILE, value="/airflow/xcom/return.json")],
        secrets=[Secret("env", None, name) for kind, name in s.secrets if kind in spec.secrets],
        security_context=pod_security_context(s),
        container_security_context=container_security_context(),
        xcom_sidecar_container_security_context=container_security_context(),
        container_resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        tolerations=tolerations,
        node_selector=selector,
        volumes=volumes,
        volume_mounts=mounts,
        startup_timeout_seconds=s.startup_timeout_s,
        on_finish_action="delete_pod",
        do_xcom_push=True,
        get_logs=True,
        labels=step_labels(spec),
        **task_kwargs,
    )
    if mapped_arguments is not None:
        return operator.partial(**kwargs).expand(arguments=mapped_arguments)
    # Airflow renders the same Jinja templates as the local runner, and resolves the XComArgs
    return operator(arguments=pod_arguments(spec, inputs), **kwargs)
