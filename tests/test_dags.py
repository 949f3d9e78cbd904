"""DAG integrity and the rendered training pod (no cluster, no database needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fracture_ops.orchestration.specs import TRAINING_STEPS

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
HEAVY = ["torch", "pandas", "pydicom", "mlflow", "evidently", "timm", "albumentations",
         "great_expectations", "sklearn", "ultralytics", "pytorch_grad_cam", "cv2"]
# the edges follow the data: each task after the steps whose outputs it reads (the specs'
# `reads`), and the detection branch behind its switch
TRAINING_EDGES = {(r, s.name) for s in TRAINING_STEPS.values() for r in s.reads} | {
    ("detection_enabled", "detect_train")}
# the lifecycle's order, whatever steps a site adds in between: each one upstream of the next
TRAINING_CHAIN = ("ingest", "validate", "deidentify", "split", "train", "calibrate",
                  "tune_thresholds", "evaluate", "package", "register", "gate")
EXPECTED_EDGES = {
    "fracture_training": TRAINING_EDGES,
    "fracture_promotion": set(),
    # infer is mapped (one task per shard) over the list infer_shards reads from the plan
    "fracture_inference": {("reference", "infer_plan"), ("infer_plan", "infer_shards"),
                           ("infer_shards", "infer"), ("infer_plan", "infer"),
                           ("infer_plan", "infer_merge"), ("infer", "infer_merge"),
                           ("pacs_results_enabled", "pacs_report")},
    "fracture_drift": {("drift", "drift_detected"), ("drift", "retraining_signal"),
                       ("drift_detected", "retraining_signal")},
    "fracture_pacs_ingest": set(),
}


def _dagbag(env: dict | None = None):
    from airflow.models import DagBag

    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return DagBag(dag_folder=str(DAGS))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def dagbag():
    return _dagbag()


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(EXPECTED_EDGES) <= set(dagbag.dags)


@pytest.mark.parametrize("dag_file", sorted(p.name for p in DAGS.glob("*.py")))
def test_dag_file_is_light_and_fast(dag_file):
    """Parsing a DAG file imports no heavy library and takes < 1 s once Airflow is imported."""
    probe = f"""
import json, sys, time
import airflow.sdk, airflow.models  # Airflow itself is paid for once per parser process
from airflow.models import DagBag
before = set(sys.modules)
t = time.perf_counter()
bag = DagBag(dag_folder={str(DAGS / dag_file)!r})
elapsed = time.perf_counter() - t
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before)
print(json.dumps({{"s": elapsed, "heavy": heavy, "errors": list(bag.import_errors), "dags": list(bag.dags)}}))
"""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\n{dag_file}: parsed in {out['s']:.3f} s")
    assert out["errors"] == [] and out["dags"]
    assert out["heavy"] == [], f"{dag_file} imports heavy libraries at parse time: {out['heavy']}"
    assert out["s"] < 1.0


def test_every_task_has_owner_and_retries(dagbag):
    for dag in dagbag.dags.values():
        for t in dag.tasks:
            assert t.owner and t.owner != "airflow", (dag.dag_id, t.task_id)
            assert t.retries >= 1, (dag.dag_id, t.task_id)
        assert dag.doc_md and dag.tags


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_EDGES))
def test_task_graph_equals_declared_edges(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == EXPECTED_EDGES[dag_id]


def test_the_training_dag_keeps_the_lifecycle_order(dagbag):
    """Whatever the specs add, ingest ... gate stay in order (each upstream of the next), box
    supervision and Grad-CAM read the de-identified boxes, and the gate follows the split."""
    dag = dagbag.dags["fracture_training"]

    def upstream(task_id: str) -> set[str]:
        return {t.task_id for t in dag.get_task(task_id).get_flat_relatives(upstream=True)}

    for before, after in zip(TRAINING_CHAIN, TRAINING_CHAIN[1:]):
        assert before in upstream(after), (before, after)
    for task in ("train", "cam", "detect_train"):
        assert "deidentify" in upstream(task), task
    assert "split" in upstream("gate") and "detection_enabled" in upstream("detect_train")
    assert {"tune_thresholds"} <= upstream("cam") and "cam" in upstream("package")


def test_trigger_form_params_have_descriptions(dagbag):
    params = dagbag.dags["fracture_training"].params
    for name in ("source_uri", "layout", "backbone", "image_size", "epochs", "batch_size", "loss",
                 "seed", "detection"):
        assert params.get_param(name).description, name


def _rendered_training_pod(image: str, **params):
    from kubernetes.client import ApiClient

    from fracture_ops.orchestration.params import defaults

    bag = _dagbag({"FRACTURE_OPS_RUNNER": "kubernetes", "FRACTURE_OPS_TRAINING_IMAGE": image})
    assert bag.import_errors == {}
    dag = bag.dags["fracture_training"]
    op = dag.get_task("train")
    context = {"params": defaults(artifact_root="s3://fracture-ops-artifacts", **params),
               "run_id": "manual__2026-01-01T00:00:00+00:00", "dag": dag, "task": op}
    op.render_template_fields(context)
    pod = op.build_pod_request_obj(dry_run=True)
    return ApiClient().sanitize_for_serialization(pod), context, op


def test_rendered_training_pod(tmp_path):
    from fracture_ops.orchestration.local_runner import command_for
    from fracture_ops.orchestration.specs import TRAINING_STEPS

    image = "registry.example.org/fracture-ops/training:1.2.3"
    manifest, context, op = _rendered_training_pod(image)
    spec = manifest["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "base"]
    assert c["image"] == image
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec["nodeSelector"] == {"fracture-ops/pool": "gpu"}
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/cache"}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"fracture-ops-cache"}
    # secrets by reference only: envFrom secretRef, no literal credentials in env
    assert {e["secretRef"]["name"] for e in c["envFrom"]} == {"fracture-ops-mlflow", "fracture-ops-s3"}
    assert spec["serviceAccountName"] == "fracture-ops-step" and spec["automountServiceAccountToken"] is False
    for e in c.get("env", []):
        assert not any(w in e["name"].upper() for w in ("SECRET", "PASSWORD", "TOKEN", "KEY")), e
    # the same command as the local runner
    local = command_for(TRAINING_STEPS["train"], context)
    assert c["command"] == ["fracture-ops"] and Path(local[0]).name == "fracture-ops"
    assert c["args"] == local[1:]
    from fracture_ops.catalog import input_of

    run = "s3://fracture-ops-artifacts/runs/manual__2026-01-01T00-00-00-00-00"
    assert "--epochs" in c["args"] and f"{run}/{input_of('train').path}" in c["args"]
    assert op.startup_timeout_seconds >= 900 and op.on_finish_action.value == "delete_pod"
    # valid against the Kubernetes schema
    import kubernetes_validate

    kubernetes_validate.validate(manifest, "1.30.0", strict=True)


def test_multi_gpu_training_pod_requests_n_gpus_and_runs_the_same_command_under_torchrun():
    """gpus=4: the pod requests and is limited to 4 GPUs and passes --nproc-per-node 4 (the CLI
    then runs the step under torchrun, one process per GPU); every other argument is the
    one-GPU pod's; the pod validates against the Kubernetes schema."""
    import kubernetes_validate

    image = "registry.example.org/fracture-ops/training:1.2.3"
    pods = {n: _rendered_training_pod(image, gpus=n)[0] for n in (1, 4)}
    args = {}
    for n, manifest in pods.items():
        (c,) = [c for c in manifest["spec"]["containers"] if c["name"] == "base"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(n)
        assert c["resources"]["requests"]["nvidia.com/gpu"] == str(n)
        assert c["command"] == ["fracture-ops"]
        at = c["args"].index("--nproc-per-node")
        assert c["args"][at + 1] == str(n)
        args[n] = c["args"][:at] + c["args"][at + 2:]
        kubernetes_validate.validate(manifest, "1.30.0", strict=True)
    assert args[1] == args[4]


def test_cpu_steps_do_not_request_gpus():
    from fracture_ops.orchestration.specs import TRAINING_STEPS

    gpu_steps = {n for n, s in TRAINING_STEPS.items() if s.gpu}
    assert gpu_steps == {"train", "detect_train"}


def test_every_step_spec_renders_to_a_valid_cli_command():
    """Each spec's rendered arguments parse with the real CLI (catches drift between the two)."""
    from fracture_ops.cli import build_parser
    from fracture_ops.orchestration.params import defaults
    from fracture_ops.orchestration.specs import (DRIFT_STEPS, INFERENCE_STEPS, PROMOTION_STEPS,
                                                  TRAINING_STEPS, render_args)

    params = defaults(artifact_root="/data/art") | {"incoming_uri": "/data/incoming", "window_days": 1,
                                                     "drift_share_threshold": 0.3, "shards": 4,
                                                     "pacs_dataset": "pacs", "dataset": "pacs", "max_studies": 5}
    from types import SimpleNamespace

    from airflow.sdk.execution_time import macros

    ti = SimpleNamespace(xcom_pull=lambda task_ids=None, **kw: {"model_version": "3", "model_uri": "models:/fracture-classifier/3"})
    context = {"params": params, "run_id": "scheduled__2026-11-20T00:00:00+00:00", "ds": "2026-11-20",
               "macros": macros, "ti": ti,
               "inputs": {"model_uri": "models:/fracture-classifier/3", "shard": 2}}
    for steps in (TRAINING_STEPS, PROMOTION_STEPS, INFERENCE_STEPS, DRIFT_STEPS):
        for spec in steps.values():
            args = render_args(spec, context)
            parsed = build_parser(only=args[0]).parse_args(args)
            assert parsed.command == args[0]
            assert parsed.run_id == "scheduled__2026-11-20T00-00-00-00-00", spec.name
            assert parsed.artifact_root == "/data/art"
            if spec.name == "drift":
                assert parsed.date == "2026-11-19"  # the complete day before the logical date
            if spec.name == "infer_plan":
                assert (parsed.date, parsed.model_uri) == ("2026-11-20", "models:/fracture-classifier/3")
                assert (parsed.shards, parsed.incoming) == (4, "/data/incoming")
            if spec.name == "infer":  # one shard of this run's plan
                assert parsed.shard == 2 and parsed.incoming == "/data/incoming"
                assert parsed.plan_uri.endswith("/infer_plan/plan.json")


@pytest.mark.parametrize("exit_code,fails_fast", [(3, True), (4, True), (2, True), (1, False), (137, False)])
def test_pod_bad_input_exit_codes_fail_without_retry(monkeypatch, exit_code, fails_fast):
    """In Kubernetes mode too, exit codes 2/3/4 fail the task at once; others stay retryable."""
    from types import SimpleNamespace

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from fracture_ops.orchestration.airflow_tasks import task_kwargs
    from fracture_ops.orchestration.pods import pod_operator
    from fracture_ops.orchestration.specs import TRAINING_STEPS

    def provider_cleanup(self, pod, remote_pod):
        raise AirflowException("Pod fracture-ops-split returned a failure.")

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", provider_cleanup)
    spec = TRAINING_STEPS["split"]
    op = pod_operator(spec, **task_kwargs(spec))
    terminated = SimpleNamespace(exit_code=exit_code)
    status = SimpleNamespace(name="base", state=SimpleNamespace(terminated=terminated))
    remote = SimpleNamespace(status=SimpleNamespace(container_statuses=[status]))
    with pytest.raises(AirflowException) as err:
        op.cleanup(SimpleNamespace(metadata=SimpleNamespace(name="p")), remote)
    assert isinstance(err.value, AirflowFailException) is fails_fast


def test_profile_sets_the_model_fields_left_at_their_defaults():
    """The trigger form's profile: cpu-quick by default on the local runner, gpu with pods; it
    fills only the fields left at their defaults, and the rendered train command (Airflow's Jinja)
    says exactly what resolve_profile says."""
    from fracture_ops.orchestration.params import (
        PROFILE_FIELDS,
        PROFILES,
        RECIPE_FIELDS,
        defaults,
        resolve_profile,
    )
    from fracture_ops.orchestration.specs import TRAINING_STEPS, render_args

    local = _dagbag({"FRACTURE_OPS_RUNNER": "local"}).dags["fracture_training"].params
    assert local["profile"] == "cpu-quick"
    pods = _dagbag({"FRACTURE_OPS_RUNNER": "kubernetes"}).dags["fracture_training"].params
    assert pods["profile"] == "gpu"
    for over in ({"profile": "cpu-quick"}, {"profile": "gpu"},
                 {"profile": "cpu-quick", "image_size": 256, "backbone": "resnet18"},
                 {"profile": "cpu-quick", "lr": 0.01, "epochs": 3}, {"profile": "gpu", "epochs": 2},
                 {"profile": "gpu", "crop_scale": 0.7, "rotate_limit": 5.0}):
        params = defaults(**over)
        args = render_args(TRAINING_STEPS["train"], {"params": params, "run_id": "r"})
        want = resolve_profile(params)
        got = {"backbone": args[args.index("--backbone") + 1],
               "image_size": int(args[args.index("--image-size") + 1]),
               "epochs": int(args[args.index("--epochs") + 1]),
               "batch_size": int(args[args.index("--batch-size") + 1]),
               "lr": float(args[args.index("--lr") + 1]),
               "cv_below_images": int(args[args.index("--cv-below-images") + 1])}
        import yaml

        for f in RECIPE_FIELDS:  # each as its own flag (a boolean: --flag or --no-flag)
            flag = "--" + f.replace("_", "-")
            got[f] = (flag in args if isinstance(want[f], bool)
                      else yaml.safe_load(args[args.index(flag) + 1]))
        assert got == {f: want[f] for f in PROFILE_FIELDS}, over
        for f in PROFILE_FIELDS:  # a field the user set wins over the profile
            if f in over:
                assert got[f] == over[f]
            elif f in PROFILES[over["profile"]]:
                assert got[f] == PROFILES[over["profile"]][f]
