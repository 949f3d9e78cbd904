"""Offline checks of the deployment under infra/: Kubernetes manifests and the Airflow Helm values.

The manifests are validated against the Kubernetes OpenAPI schema shipped with kubernetes-validate
(strict: unknown fields fail), so no cluster is needed. The names the step pods rely on (namespace,
ServiceAccount, GPU label and taint, Secrets, cache PVC) are checked against infra/README.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
VALUES_FILE = INFRA / "airflow" / "values.yaml"
README = (INFRA / "README.md").read_text()
K8S_VERSION = "1.34.0"  # a recent release whose schema kubernetes-validate ships
NAMESPACE = "fracture-ops"
STEPS_NAMESPACE = "fracture-ops-steps"
# what the step pods use lives beside them; the platform's services do not
STEP_SIDE = {("ServiceAccount", "fracture-ops-step"), ("Role", "fracture-ops-pod-launcher"),
             ("RoleBinding", "fracture-ops-pod-launcher"), ("Role", "fracture-ops-job-watcher"),
             ("RoleBinding", "fracture-ops-job-watcher"),
             ("PersistentVolumeClaim", "fracture-ops-cache"), ("Secret", "fracture-ops-deid"),
             ("Secret", "fracture-ops-mlflow-promoter"), ("Secret", "fracture-ops-pacs"),
             ("Secret", "fracture-ops-mlflow-gate")}
LAUNCHER = "fracture-ops-launcher"
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
GPU_NODE_LABEL = {"fracture-ops/pool": "gpu"}
CLUSTER_SCOPED = {"Namespace", "RuntimeClass", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                  "ClusterTrainingRuntime"}
CLIENT_SECRETS = {
    "fracture-ops-mlflow": {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    "fracture-ops-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"},
}


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under infra/ (not the kustomization, not the Helm values)."""
    return sorted(p for p in INFRA.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and "airflow" not in p.relative_to(INFRA).parts)


def resources() -> list[tuple[str, dict]]:
    """(file relative to infra/, document) for every non-empty YAML document of the manifests."""
    found = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.relative_to(INFRA).as_posix(), doc))
    return found


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in resources() if doc["kind"] == kind]


def one(kind: str, name: str, namespace: str | None = None) -> dict:
    matches = [d for d in by_kind(kind) if d["metadata"]["name"] == name
               and namespace in (None, d["metadata"].get("namespace"))]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs() -> list[tuple[str, dict]]:
    """(workload name, pod template spec) of every Deployment, StatefulSet and Job."""
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for _, d in resources() if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def secret_value_problems(doc: dict) -> list[str]:
    """Non-empty values in a Secret's data/stringData (a template must carry none)."""
    problems = []
    for field in ("data", "stringData"):
        for key, value in (doc.get(field) or {}).items():
            if value not in ("", None):
                problems.append(f"{doc['metadata']['name']}.{field}.{key} is not empty")
    return problems


def granted_verbs(role: dict, resource: str, group: str = "") -> set[str]:
    """Verbs a Role grants on a resource of an API group (default: the core group)."""
    verbs: set[str] = set()
    for rule in role.get("rules", []):
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
            verbs |= set(rule.get("verbs", []))
    return verbs


def values() -> dict:
    return yaml.safe_load(VALUES_FILE.read_text())


def values_env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in values()["env"]}


# ------------------------------------------------------------------ Kubernetes schema


def test_manifests_cover_the_platform():
    kinds = {doc["kind"] for _, doc in resources()}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Deployment",
            "Service", "StatefulSet", "RuntimeClass", "Secret", "Job"} <= kinds


CRD_SCHEMAS = {  # custom resources, validated against the CRD their operator releases
    ("cert-manager.io/v1", "Certificate"): REPO / "tests" / "schemas" / "cert-manager.io_certificates.yaml",
    # the served version's schema of the Kubeflow Trainer v2.3.0 CRD (JSON, which YAML reads)
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"):
        REPO / "tests" / "schemas" / "trainer.kubeflow.org_clustertrainingruntimes.json",
}


def _crd_schema(path: Path, version: str) -> dict:
    crd = yaml.safe_load(path.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def _unknown_fields(doc, schema, where="") -> list[str]:
    """Fields the schema does not declare (the API server prunes or, strict, refuses them)."""
    out = []
    if isinstance(doc, dict) and "properties" in schema:
        for key, value in doc.items():
            if key not in schema["properties"]:
                if where or key not in ("apiVersion", "kind", "metadata"):
                    out.append(f"{where}.{key}")
            else:
                out += _unknown_fields(value, schema["properties"][key], f"{where}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            out += _unknown_fields(item, schema["items"], f"{where}[{i}]")
    return out


def validate_custom_resource(doc: dict) -> None:
    import jsonschema

    group, version = doc["apiVersion"].split("/")
    schema = _crd_schema(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])], version)
    jsonschema.validate(doc, schema)
    assert _unknown_fields(doc, schema) == [], doc["metadata"]["name"]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(INFRA).as_posix())
def test_manifest_validates_against_kubernetes_schema(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no document"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            validate_custom_resource(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_custom_resource_validation_rejects_broken_certificates():
    import jsonschema

    good = one("Certificate", "mlflow-tls")
    validate_custom_resource(good)
    typo = {**good, "spec": {**good["spec"], "dnsName": ["x"]}}
    with pytest.raises(AssertionError):
        validate_custom_resource(typo)
    no_secret = {**good, "spec": {k: v for k, v in good["spec"].items() if k != "secretName"}}
    with pytest.raises(jsonschema.ValidationError):
        validate_custom_resource(no_secret)


def _tls_mount(spec: dict, container: dict, secret: str) -> str:
    volume = next(v["name"] for v in spec["volumes"] if (v.get("secret") or {}).get("secretName") == secret)
    return next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume)


def test_mlflow_and_minio_serve_tls_from_their_certificates():
    certs = {c["metadata"]["name"]: c["spec"] for c in by_kind("Certificate")}
    services = {s["metadata"]["name"] for s in by_kind("Service")}
    for name, workload in (("mlflow", "mlflow"), ("minio", "minio")):
        cert = certs[f"{name}-tls"]
        assert f"{name}.{NAMESPACE}.svc" in cert["dnsNames"] and name in services
        assert cert["issuerRef"]["name"] == "fracture-ops-ca"
        spec = next(s for n, s in pod_specs() if n == workload)
        container = spec["containers"][0]
        mount = _tls_mount(spec, container, cert["secretName"])
        probes = [container[p] for p in ("readinessProbe", "livenessProbe", "startupProbe") if p in container]
        assert probes and all(p["httpGet"]["scheme"] == "HTTPS" for p in probes)
        if name == "mlflow":
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MLFLOW_TLS_CERT_FILE"] == f"{mount}/tls.crt"
            assert env["MLFLOW_TLS_KEY_FILE"] == f"{mount}/tls.key"
            assert env["AWS_CA_BUNDLE"] == _tls_mount(spec, container, "fracture-ops-ca") + "/ca.crt"
        else:
            args = container["args"]
            assert args[args.index("--certs-dir") + 1] == mount
            items = {i["key"]: i["path"] for v in spec["volumes"] if v["name"] == "tls"
                     for i in v["secret"]["items"]}
            assert items["tls.crt"] == "public.crt" and items["tls.key"] == "private.key"
    # the bucket Job talks HTTPS to MinIO and trusts the CA
    script = " ".join(_container("minio-create-buckets")["args"])
    assert "https://minio.fracture-ops.svc:9000" in script and "http://" not in script
    # step pods trust the same CA for both clients
    from fracture_ops.orchestration.pods import PodSettings, pod_operator
    from fracture_ops.orchestration.specs import TRAINING_STEPS

    op = pod_operator(TRAINING_STEPS["train"], task_id="train")
    env = {e.name: e.value for e in op.env_vars}
    assert env["AWS_CA_BUNDLE"] == env["MLFLOW_TRACKING_SERVER_CERT_PATH"] == \
        f"{PodSettings().ca_mount}/ca.crt"
    assert PodSettings().ca_secret in {v.secret.secret_name for v in op.volumes if v.secret}
    assert one("Secret", PodSettings().ca_secret, STEPS_NAMESPACE)


def test_schema_validation_rejects_broken_manifests():
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"ports": [{"port": "http-port"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    typo = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"},
            "spec": {"accessMode": ["ReadWriteOnce"]}}  # strict mode: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_namespaced_resources_live_in_their_namespace():
    """Step-side objects in fracture-ops-steps, the platform in fracture-ops; client Secrets in
    both (Secrets are per namespace)."""
    for path, doc in resources():
        if doc["kind"] in CLUSTER_SCOPED:
            continue
        ns = doc["metadata"].get("namespace")
        key = (doc["kind"], doc["metadata"]["name"])
        if key in STEP_SIDE or (doc["kind"] == "NetworkPolicy" and key[1] != "orthanc-ingress"):
            assert ns == STEPS_NAMESPACE, f"{path}: {key}"
        elif doc["kind"] == "Secret" and doc["metadata"]["name"] in {*CLIENT_SECRETS, "fracture-ops-ca"}:
            assert ns in (NAMESPACE, STEPS_NAMESPACE), f"{path}: {key}"
        else:
            assert ns == NAMESPACE, f"{path}: {key}"
    for name in CLIENT_SECRETS:
        assert one("Secret", name, NAMESPACE) and one("Secret", name, STEPS_NAMESPACE)
    assert one("Namespace", NAMESPACE) and one("Namespace", STEPS_NAMESPACE)


def test_step_namespace_enforces_the_restricted_profile():
    labels = one("Namespace", STEPS_NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    from fracture_ops.orchestration.pods import PodSettings

    settings = PodSettings()
    assert settings.namespace == STEPS_NAMESPACE
    assert one("ServiceAccount", settings.service_account, STEPS_NAMESPACE)
    assert one("PersistentVolumeClaim", settings.cache_claim, STEPS_NAMESPACE)
    for _, name in settings.secrets:
        assert one("Secret", name, STEPS_NAMESPACE)


def _egress(policy: dict) -> list[tuple[str, str, int]]:
    """(namespace, app name or k8s-app, port) of every egress rule's peers and ports."""
    out = []
    for rule in policy["spec"].get("egress", []):
        for peer in rule["to"]:
            if "namespaceSelector" not in peer:  # a pod of the policy's own namespace
                labels = peer["podSelector"]["matchLabels"]
                out.append((policy["metadata"]["namespace"], "distributed" if labels.get(
                    "fracture-ops/distributed") == "true" else str(labels), None))
                assert "ports" not in rule  # NCCL/gloo choose their ports
                continue
            ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            labels = peer["podSelector"]["matchLabels"]
            app = labels.get("app.kubernetes.io/name") or labels.get("k8s-app")
            out += [(ns, app, p["port"]) for p in rule["ports"]]
    return out


def test_network_policies_let_steps_reach_only_mlflow_the_store_dns_and_pacs():
    policies = {p["metadata"]["name"]: p for p in by_kind("NetworkPolicy")
                if p["metadata"]["namespace"] == STEPS_NAMESPACE}
    deny = policies["steps-default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    # no policy admits ingress to a step pod, but the nodes of a multi-node TrainJob admit
    # each other (and only each other)
    peers = {"app.kubernetes.io/component": "step", "fracture-ops/distributed": "true"}
    admitting = {n: p for n, p in policies.items() if p["spec"].get("ingress")}
    assert list(admitting) == ["steps-distributed-peers"]
    peer_policy = admitting["steps-distributed-peers"]["spec"]
    assert peer_policy["podSelector"]["matchLabels"] == peers
    assert [f for r in peer_policy["ingress"] for f in r["from"]] == [{"podSelector": {"matchLabels": peers}}]
    assert [t for r in peer_policy["egress"] for t in r["to"]] == [{"podSelector": {"matchLabels": peers}}]
    reach = {e for p in policies.values() for e in _egress(p)}
    assert reach == {("kube-system", "kube-dns", 53), (NAMESPACE, "mlflow", 5000),
                     (NAMESPACE, "minio", 9000), (NAMESPACE, "orthanc", 8042),
                     (NAMESPACE, "orthanc", 4242), (STEPS_NAMESPACE, "distributed", None)}
    # only TrainJob nodes carry the peer label; a step pod does not
    from fracture_ops.orchestration.specs import TRAINING_STEPS
    from fracture_ops.orchestration.trainjob import TrainJobRequest, build

    job = build(TRAINING_STEPS["train"], TrainJobRequest("fracture-ops-train-x", ["fit"], nodes=2, gpus=1))
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert peers.items() <= node["template"]["spec"]["template"]["metadata"]["labels"].items()
    # the ports are the ones the Services serve, and the PACS rule applies to PACS steps only
    ports = {(s["metadata"]["name"], p["port"]) for s in by_kind("Service") for p in s["spec"]["ports"]}
    assert ("mlflow", 5000) in ports and ("minio", 9000) in ports
    pacs = policies["steps-egress-pacs"]["spec"]["podSelector"]["matchLabels"]
    assert pacs.get("fracture-ops/pacs") == "true"
    # the step pods carry the label the platform rule selects
    platform = policies["steps-egress-platform"]["spec"]["podSelector"]["matchLabels"]
    from fracture_ops.orchestration.pods import pod_operator
    from fracture_ops.orchestration.specs import TRAINING_STEPS

    labels = pod_operator(TRAINING_STEPS["ingest"], task_id="ingest").labels
    assert platform.items() <= labels.items()


def test_container_images_have_pinned_tags():
    for name, spec in pod_specs():
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{name}: {image}"


def test_kustomization_applies_every_manifest_but_no_secret_template():
    kustomization = yaml.safe_load((INFRA / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    # infra/trainer/ is applied after the Kubeflow Trainer is installed (its CRDs), not by -k
    expected = {p.relative_to(INFRA).as_posix() for p in manifest_files()
                if "secrets" not in p.parts and "trainer" not in p.relative_to(INFRA).parts}
    assert listed == expected
    images = {i["name"]: i.get("newTag") for i in kustomization["images"]}
    for name, spec in pod_specs():
        for container in spec["containers"]:
            repo, _, tag = container["image"].rpartition(":")
            assert images.get(repo) == tag, f"{name}: kustomization tag for {repo} differs from {tag}"


# ------------------------------------------------------------------ Secrets


def test_secret_value_check_flags_values():
    doc = {"metadata": {"name": "s"}, "stringData": {"A": "", "B": "x"}, "data": {"C": "eA=="}}
    assert secret_value_problems(doc) == ["s.data.C is not empty", "s.stringData.B is not empty"]


def test_secrets_are_templates_without_values():
    secrets = [(path, doc) for path, doc in resources() if doc["kind"] == "Secret"]
    assert secrets
    for path, doc in secrets:
        assert re.fullmatch(r"secrets/[\w-]+\.template\.yaml", path), f"Secret outside templates: {path}"
        assert doc.get("stringData") or doc.get("data"), f"{path}: template names no keys"
        assert secret_value_problems(doc) == []


def test_client_secrets_name_the_keys_step_pods_read():
    for name, keys in CLIENT_SECRETS.items():
        for ns in (NAMESPACE, STEPS_NAMESPACE):
            assert set(one("Secret", name, ns)["stringData"]) == keys
        assert name in README and all(k in README for k in keys)


def _referenced_secrets() -> dict[str, set[str]]:
    """Secret name -> keys referenced by the manifests and the Helm values ({} = whole Secret)."""
    refs: dict[str, set[str]] = {}
    for _, spec in pod_specs():
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                refs.setdefault(source["secretRef"]["name"], set())
            for var in container.get("env", []):
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.setdefault(ref["name"], set()).add(ref["key"])
    v = values()
    chart_keys = {"data.metadataSecretName": "connection", "fernetKeySecretName": "fernet-key",
                  "apiSecretKeySecretName": "api-secret-key", "jwtSecretName": "jwt-secret"}
    for dotted, key in chart_keys.items():
        node = v
        for part in dotted.split("."):
            node = node[part]
        refs.setdefault(node, set()).add(key)
    for item in v.get("secret", []):
        refs.setdefault(item["secretName"], set()).add(item["secretKey"])
    for source in yaml.safe_load(v.get("extraEnvFrom") or "[]"):
        refs.setdefault(source["secretRef"]["name"], set())
    return refs


def test_every_referenced_secret_has_a_template_with_its_keys():
    templates = {d["metadata"]["name"]: set(d.get("stringData") or d.get("data")) for d in by_kind("Secret")}
    refs = _referenced_secrets()
    assert set(CLIENT_SECRETS) <= set(refs)
    for name, keys in refs.items():
        assert name in templates, f"Secret {name} is referenced but has no template"
        assert keys <= templates[name], f"{name}: keys {keys - templates[name]} missing in template"


# ------------------------------------------------------------------ RBAC, GPU pool, cache


def test_launcher_role_grants_pod_lifecycle_in_the_step_namespace_only():
    assert one("ServiceAccount", LAUNCHER)["metadata"]["namespace"] == NAMESPACE
    assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding")
    bindings = [b for b in by_kind("RoleBinding")
                if {"kind": "ServiceAccount", "name": LAUNCHER, "namespace": NAMESPACE} in b["subjects"]]
    assert len(bindings) == 1 and bindings[0]["roleRef"]["kind"] == "Role"
    # pods and pods/exec only where no platform service runs
    assert bindings[0]["metadata"]["namespace"] == STEPS_NAMESPACE
    assert not [r for r in by_kind("Role") if r["metadata"]["namespace"] == NAMESPACE]
    role = one("Role", bindings[0]["roleRef"]["name"])
    assert {"create", "delete", "get", "list", "watch"} <= granted_verbs(role, "pods")
    assert "get" in granted_verbs(role, "pods/log")
    assert "create" in granted_verbs(role, "pods/exec")  # xcom sidecar read-out
    assert {"get", "list", "watch"} <= granted_verbs(role, "events")
    # multi-node training: the TrainJob's lifecycle (Kubeflow Trainer), in the same namespace
    assert {"create", "get", "delete"} <= granted_verbs(role, "trainjobs", "trainer.kubeflow.org")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "secrets" not in rule["resources"], "the launcher must not read Secrets"


def test_gpu_taint_and_label_match_the_readme():
    runtime = one("RuntimeClass", "fracture-ops-gpu")
    assert runtime["scheduling"]["nodeSelector"] == GPU_NODE_LABEL
    assert runtime["scheduling"]["tolerations"] == [GPU_TAINT]
    taint = f"{GPU_TAINT['key']}={GPU_TAINT['value']}:{GPU_TAINT['effect']}"
    assert f"kubectl taint nodes <gpu-node> {taint}" in README
    assert "kubectl label nodes <gpu-node> fracture-ops/pool=gpu" in README
    assert "nvidia.com/gpu: 1" in README and "fracture-ops-gpu" in README


def test_platform_services_stay_off_gpu_nodes():
    for name, spec in pod_specs():
        assert all(t.get("key") != GPU_TAINT["key"] for t in spec.get("tolerations", [])), name
        assert "nvidia.com/gpu" not in json.dumps(spec.get("containers")), name


def test_cache_pvc_matches_the_readme():
    pvc = one("PersistentVolumeClaim", "fracture-ops-cache")
    assert pvc["spec"]["resources"]["requests"]["storage"]
    assert "`fracture-ops-cache` at `/cache`, `FRACTURE_OPS_CACHE_DIR=/cache`" in README


# ------------------------------------------------------------------ MLflow and MinIO


def _container(workload: str) -> dict:
    return next(spec for name, spec in pod_specs() if name == workload)["containers"][0]


def test_mlflow_deployment_runs_basic_auth_with_probes_and_resources():
    container = _container("mlflow")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_APP_NAME"] == "fracture-ops" and env["MLFLOW_HOST"] == "0.0.0.0"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://fracture-ops-mlflow"
    assert "mlflow.fracture-ops.svc" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert {s["secretRef"]["name"] for s in container["envFrom"]} == {"fracture-ops-mlflow-server", "fracture-ops-s3"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    server_keys = set(one("Secret", "fracture-ops-mlflow-server")["stringData"])
    script = (REPO / "mlflow" / "start-server.sh").read_text()
    assert all(key in script for key in server_keys), "start script must document every server key"


def test_services_route_to_declared_container_ports():
    pods = [(d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"])
            for d in by_kind("Deployment") + by_kind("StatefulSet")]
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [spec for labels, spec in pods if selector.items() <= labels.items()]
        assert matched, f"Service {service['metadata']['name']} selects no pod"
        port_names = {p["name"] for c in matched[0]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)


def test_minio_statefulset_and_buckets_match_the_platform():
    minio = one("StatefulSet", "minio")
    assert minio["spec"]["volumeClaimTemplates"], "MinIO needs a PVC"
    assert _container("minio")["envFrom"] == [{"secretRef": {"name": "fracture-ops-minio"}}]
    script = " ".join(_container("minio-create-buckets")["args"])
    created = set(re.findall(r"fracture-ops-[a-z-]+", script.split("for bucket in")[1].split(";")[0]))
    cfg = values()["config"]["logging"]
    needed = {values_env()["FRACTURE_OPS_ARTIFACT_ROOT"], values_env()["FRACTURE_OPS_RAW_ROOT"],
              values_env()["FRACTURE_OPS_AUDIT_URI"],
              cfg["remote_base_log_folder"],
              dict((e["name"], e.get("value")) for e in _container("mlflow")["env"])["MLFLOW_ARTIFACTS_DESTINATION"]}
    assert {re.match(r"s3://([^/]+)", uri).group(1) for uri in needed} == created
    # the raw zone's bucket expires its objects server-side
    raw_bucket = re.match(r"s3://([^/]+)", values_env()["FRACTURE_OPS_RAW_ROOT"]).group(1)
    assert re.search(rf"ilm rule add --expire-days \d+ platform/{raw_bucket}", script)


# ------------------------------------------------------------------ Airflow Helm values

# Top-level keys of the official chart's values.yaml (apache/airflow chart/, the releases for
# Airflow 3.x); a key outside this set is ignored by the chart, i.e. almost surely a typo.
CHART_TOP_LEVEL_KEYS = frozenset("""
fullnameOverride nameOverride useStandardNaming revisionHistoryLimit uid gid securityContext
securityContexts containerLifecycleHooks airflowHome defaultAirflowRepository defaultAirflowTag
defaultAirflowDigest airflowVersion images nodeSelector affinity tolerations topologySpreadConstraints
schedulerName labels imagePullSecrets ingress networkPolicies airflowPodAnnotations
airflowConfigAnnotations airflowLocalSettings rbac executor allowPodLaunching allowJobLaunching env
volumes volumeMounts secret enableBuiltInSecretEnvVars priorityClasses extraSecrets extraConfigMaps
extraEnv extraEnvFrom data fernetKey fernetKeySecretName fernetKeySecretAnnotations apiSecretKey
apiSecretAnnotations apiSecretKeySecretName jwtSecret jwtSecretAnnotations jwtSecretName
webserverSecretKey webserverSecretAnnotations webserverSecretKeySecretName kerberos workers scheduler
createUserJob migrateDatabaseJob apiServer webserver triggerer dagProcessor flower statsd pgbouncer
redis registry elasticsearch opensearch ports quotas limits cleanup databaseCleanup postgresql config
multiNamespaceMode podTemplate dags logs devMode
""".split())


def test_values_choose_executor_and_images():
    v = values()
    assert v["executor"] in ("KubernetesExecutor", "CeleryExecutor")
    if v["executor"] == "KubernetesExecutor":
        assert v["redis"]["enabled"] is False, "no broker needed without Celery"
    assert v["airflowVersion"] == next(
        line.split("==")[1] for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.startswith("apache-airflow=="))
    for image in (f"{v['images']['airflow']['repository']}:{v['images']['airflow']['tag']}",
                  values_env()["FRACTURE_OPS_TRAINING_IMAGE"], values_env()["FRACTURE_OPS_PLATFORM_IMAGE"]):
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image


def test_values_set_platform_env():
    env = values_env()
    assert env["FRACTURE_OPS_RUNNER"] == "kubernetes"
    assert env["FRACTURE_OPS_ARTIFACT_ROOT"] == "s3://fracture-ops-artifacts"
    assert values()["workers"]["serviceAccount"] == {"create": False, "name": LAUNCHER}


def test_triggerer_watches_trainjobs_and_changes_nothing():
    """The TrainJob sensor polls from the triggerer: its account reads TrainJobs and pods in the
    step namespace, and may create, change or delete nothing."""
    watcher = values()["triggerer"]["serviceAccount"]
    assert watcher["create"] is False
    assert one("ServiceAccount", watcher["name"], NAMESPACE)
    bindings = [b for b in by_kind("RoleBinding") if {"kind": "ServiceAccount", "name": watcher["name"],
                                                      "namespace": NAMESPACE} in b["subjects"]]
    assert [b["metadata"]["namespace"] for b in bindings] == [STEPS_NAMESPACE]
    role = one("Role", bindings[0]["roleRef"]["name"], STEPS_NAMESPACE)
    assert granted_verbs(role, "trainjobs", "trainer.kubeflow.org") == {"get", "list", "watch"}
    assert granted_verbs(role, "pods") == {"get", "list", "watch"}
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in role["rules"])


def test_values_log_remotely_to_s3_with_a_provided_connection():
    logging_cfg = values()["config"]["logging"]
    assert logging_cfg["remote_logging"] == "True"
    assert logging_cfg["remote_base_log_folder"].startswith("s3://")
    conn_env = f"AIRFLOW_CONN_{logging_cfg['remote_log_conn_id'].upper()}"
    assert conn_env in {item["envName"] for item in values()["secret"]}
    assert values()["logs"]["persistence"]["enabled"] is False


def test_values_take_database_and_keys_from_secrets():
    v = values()
    assert v["postgresql"]["enabled"] is False and v["data"]["metadataSecretName"]
    assert v["apiSecretKeySecretName"] and v["jwtSecretName"] and v["fernetKeySecretName"]
    for inline in ("fernetKey", "apiSecretKey", "jwtSecret", "webserverSecretKey"):
        assert not v.get(inline), f"{inline} must come from a Secret"
    assert "metadataConnection" not in v["data"]


def test_values_bake_dags_into_the_image():
    dags = values()["dags"]
    assert dags["gitSync"]["enabled"] is False and dags["persistence"]["enabled"] is False
    assert "COPY --chown=airflow:0 dags/ /opt/airflow/dags/" in (REPO / "docker/airflow/Dockerfile").read_text()


def test_values_use_keys_the_chart_knows():
    unknown = set(values()) - CHART_TOP_LEVEL_KEYS
    assert not unknown, f"keys the official chart does not define: {unknown}"


def test_values_config_options_exist_in_airflow(tmp_path):
    pytest.importorskip("airflow", reason="apache-airflow not installed (extra [airflow])")
    pairs = [[section, key] for section, opts in values()["config"].items() for key in opts]
    code = ("import json, sys; from airflow.configuration import conf; "
            "print(json.dumps([p for p in json.loads(sys.argv[1]) if not conf.has_option(*p)]))")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(pairs)], capture_output=True,
                         text=True, env=env, timeout=120, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_identities_reach_only_their_steps():
    """The promoter's credentials reach the promotion step alone; steps that parse untrusted
    input get no registry credentials; the README's identity table says the same."""
    from fracture_ops.orchestration.pods import PodSettings, pod_operator
    from fracture_ops.orchestration.specs import (DRIFT_STEPS, INFERENCE_STEPS, PROMOTION_STEPS,
                                                  TRAINING_STEPS)

    names = dict(PodSettings().secrets)
    every = {**TRAINING_STEPS, **PROMOTION_STEPS, **INFERENCE_STEPS, **DRIFT_STEPS}
    mounted = {}
    for name, spec in every.items():
        op = pod_operator(spec, task_id=name, inputs={n: "models:/m/1" for n, _, _ in spec.inputs})
        mounted[name] = {s.secret for s in op.secrets}
    assert {n for n, m in mounted.items() if names["promoter"] in m} == {"promote"}
    assert names["mlflow"] not in mounted["promote"]
    assert {n for n, m in mounted.items() if names["gate"] in m} == {"gate"}
    assert names["mlflow"] not in mounted["gate"]
    for step in ("ingest", "validate", "deidentify", "split"):
        assert not mounted[step] & {names["mlflow"], names["promoter"], names["gate"]}, step
    pipeline = sorted(n for n, m in mounted.items() if names["mlflow"] in m)
    readme = (INFRA / "secrets" / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| pipeline |"))
    assert sorted(re.findall(r"\w+", row.rsplit(":", 1)[1])) == pipeline
    assert "promote only" in next(line for line in readme.splitlines() if line.startswith("| promoter |"))
    # both identities exist as Secrets where the step pods run, with the client keys
    assert "gate only" in next(line for line in readme.splitlines() if line.startswith("| gate |"))
    for kind in ("mlflow", "promoter", "gate"):
        keys = CLIENT_SECRETS["fracture-ops-mlflow"]
        assert set(one("Secret", names[kind], STEPS_NAMESPACE)["stringData"]) == keys


def test_bundled_orthanc_serves_dicomweb_with_auth_on_the_ports_the_pacs_policy_opens():
    container = _container("orthanc")
    env = {e["name"]: e for e in container["env"]}
    assert env["DICOM_WEB_PLUGIN_ENABLED"]["value"] == "true"
    assert env["ORTHANC__AUTHENTICATION_ENABLED"]["value"] == "true"
    assert env["ORTHANC__DICOM_WEB__ROOT"]["value"] == "/dicom-web/"
    # accounts come from the Secret, never from the manifest
    assert env["ORTHANC__REGISTERED_USERS"]["valueFrom"]["secretKeyRef"] == {
        "name": "fracture-ops-orthanc", "key": "ORTHANC__REGISTERED_USERS"}
    service = one("Service", "orthanc", NAMESPACE)
    ports = {p["port"] for p in service["spec"]["ports"]}
    pacs_rule = one("NetworkPolicy", "steps-egress-pacs", STEPS_NAMESPACE)
    assert ports == {p["port"] for r in pacs_rule["spec"]["egress"] for p in r["ports"]} == {8042, 4242}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert env["ORTHANC__DICOM_ALWAYS_ALLOW_STORE"]["value"] == "false"
    # and only the PACS step pods reach it (its own ingress policy, both ports)
    ingress = one("NetworkPolicy", "orthanc-ingress", NAMESPACE)["spec"]
    assert ingress["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "orthanc"}
    (rule,) = ingress["ingress"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": STEPS_NAMESPACE}
    assert peer["podSelector"]["matchLabels"]["fracture-ops/pacs"] == "true"
    assert {p["port"] for p in rule["ports"]} == ports


def test_trainer_runtime_keeps_bad_input_exit_codes_and_never_restarts_in_place():
    """The TrainJob's runtime: a failed node fails the job at once with its own exit code (no
    in-place restart, no Job retry), exit 2/3/4 fail it by the pod failure policy, evictions do
    not count; and it is the runtime the platform's TrainJobs name."""
    from fracture_ops.errors import NOT_RETRYABLE
    from fracture_ops.orchestration.pods import PodSettings

    runtime = one("ClusterTrainingRuntime", PodSettings().trainer_runtime)
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    job = node["template"]["spec"]
    assert node["name"] == "node" and job["backoffLimit"] == 0
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["template"]["spec"]["containers"][0]["name"] == "node"
    fail, ignore = job["podFailurePolicy"]["rules"]
    assert fail["action"] == "FailJob" and fail["onExitCodes"]["containerName"] == "node"
    assert sorted(fail["onExitCodes"]["values"]) == sorted(NOT_RETRYABLE)
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # the Job template is a valid batch/v1 Job spec as well
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
                                  "spec": job}, K8S_VERSION, strict=True)
