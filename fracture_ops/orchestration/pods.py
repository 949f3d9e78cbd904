"""The ``kubernetes`` runner: a KubernetesPodOperator per step spec.

GPU steps request ``nvidia.com/gpu``, tolerate the GPU pool's taint and select its nodes; every
pod takes MLflow and S3 credentials from Kubernetes Secrets (names only here, never values),
mounts the dataset cache volume, waits long enough for a GPU node to scale up, is deleted when
done, and hands its JSON summary back as XCom through ``/airflow/xcom/return.json``.
Image names and cluster names are configuration (environment of the scheduler/worker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fracture_ops.orchestration.specs import StepSpec

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class PodSettings:
    """Cluster-side names, from the environment (see infra/README.md)."""

    namespace: str = field(default_factory=lambda: os.environ.get("FRACTURE_OPS_K8S_NAMESPACE", "fracture-ops"))
    service_account: str = field(default_factory=lambda: os.environ.get(
        "FRACTURE_OPS_K8S_SERVICE_ACCOUNT", "fracture-ops-launcher"))
    training_image: str = field(default_factory=lambda: os.environ.get(
        "FRACTURE_OPS_TRAINING_IMAGE", "ghcr.io/fracture-ops/training:0.1.0"))
    platform_image: str = field(default_factory=lambda: os.environ.get(
        "FRACTURE_OPS_PLATFORM_IMAGE", "ghcr.io/fracture-ops/training:0.1.0"))
    gpu_taint_key: str = "nvidia.com/gpu"
    gpu_node_selector: tuple[tuple[str, str], ...] = (("fracture-ops/pool", "gpu"),)
    secrets: tuple[str, ...] = ("fracture-ops-mlflow", "fracture-ops-s3")
    cache_claim: str = "fracture-ops-cache"
    cache_mount: str = "/cache"
    startup_timeout_s: int = 1800  # GPU node scale-up can take many minutes


def pod_operator(spec: StepSpec, settings: PodSettings | None = None, **task_kwargs):
    """Build the KubernetesPodOperator for a spec (same task kwargs as the local runner's task)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    s = settings or PodSettings()
    requests = {"cpu": spec.cpu, "memory": spec.memory}
    limits = {"memory": spec.memory}
    tolerations, selector = [], {}
    if spec.gpu:
        limits[GPU_RESOURCE] = str(spec.gpu)
        requests[GPU_RESOURCE] = str(spec.gpu)
        tolerations = [k8s.V1Toleration(key=s.gpu_taint_key, operator="Exists", effect="NoSchedule")]
        selector = dict(s.gpu_node_selector)
    volume = k8s.V1Volume(name="dataset-cache", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=s.cache_claim))
    mount = k8s.V1VolumeMount(name="dataset-cache", mount_path=s.cache_mount)
    return KubernetesPodOperator(
        name=f"fracture-ops-{spec.name.replace('_', '-')}",
        namespace=s.namespace,
        service_account_name=s.service_account,
        image=s.training_image if spec.image == "training" else s.platform_image,
        cmds=["fracture-ops"],
        arguments=list(spec.args),  # Airflow renders the same Jinja templates as the local runner
        env_vars=[k8s.V1EnvVar(name="FRACTURE_OPS_CACHE_DIR", value=s.cache_mount),
                  k8s.V1EnvVar(name="FRACTURE_OPS_XCOM_FILE", value="/airflow/xcom/return.json"),
                  k8s.V1EnvVar(name="FRACTURE_OPS_NO_PROGRESS", value="1"),
                  k8s.V1EnvVar(name="HF_HUB_OFFLINE", value="1"),
                  k8s.V1EnvVar(name="YOLO_OFFLINE", value="1")],
        secrets=[Secret("env", None, name) for name in s.secrets],
        container_resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        tolerations=tolerations,
        node_selector=selector,
        volumes=[volume],
        volume_mounts=[mount],
        startup_timeout_seconds=s.startup_timeout_s,
        on_finish_action="delete_pod",
        do_xcom_push=True,
        get_logs=True,
        labels={"app.kubernetes.io/part-of": "fracture-ops", "fracture-ops/step": spec.name},
        **task_kwargs,
    )
