"""The training DAG end to end on real services: ``airflow dags test`` with the local runner,
Airflow's metadata DB on PostgreSQL, an MLflow server on PostgreSQL with artifacts in S3, on the
synthetic set; plus the retry policy (infrastructure failures retried, bad data not)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.services import MlflowServer, S3Server, airflow, airflow_env, create_database, drop_database

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    work = tmp_path_factory.mktemp("services")
    s3 = S3Server()
    mlflow_db, airflow_db = create_database("fo_mlflow"), create_database("fo_airflow")
    server = MlflowServer(mlflow_db, s3, work)
    yield {"s3": s3, "mlflow": server, "airflow_db": airflow_db, "work": work}
    server.stop()
    s3.stop()
    for db in (mlflow_db, airflow_db):
        drop_database(db)


def _airflow_home(services, dags: Path, name: str) -> dict:
    env = airflow_env(services["work"] / name, services["airflow_db"], dags)
    env.update(MLFLOW_TRACKING_URI=services["mlflow"].url, FRACTURE_OPS_RUNNER="local",
               FRACTURE_OPS_DEID_SECRET="integration-test-secret-0123456789abcdef", FRACTURE_OPS_NO_PROGRESS="1",
               MLFLOW_S3_ENDPOINT_URL=services["s3"].endpoint, S3_ENDPOINT_URL=services["s3"].endpoint,
               PYTHONPATH=str(REPO))
    res = airflow(["db", "migrate"], env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return env


def _task_states(db_url: str, dag_id: str) -> dict[str, tuple[str, int]]:
    import sqlalchemy as sa

    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://"))
    with engine.connect() as c:
        rows = c.execute(sa.text("SELECT task_id, state, try_number FROM task_instance WHERE dag_id = :d"),
                         {"d": dag_id}).fetchall()
    engine.dispose()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_training_dag_green_on_postgres_mlflow_s3(services, tmp_path):
    from fracture_ops.data.synthetic import SynthConfig, synth_step

    env = _airflow_home(services, REPO / "dags", "airflow_training")
    synth_step(SynthConfig(out_dir=str(tmp_path / "syn"), n_patients=40, image_size=96,
                           dicom_fraction=0.25, seed=3))
    conf = {"source_uri": str(tmp_path / "syn" / "manifest.csv"), "layout": "csv",
            "artifact_root": str(tmp_path / "art"), "backbone": "test_resnet", "image_size": 96,
            "epochs": 2, "batch_size": 16, "lr": 0.003, "detection": False}
    res = airflow(["dags", "test", "fracture_training", "-c", json.dumps(conf)], env, timeout=1500)
    out = res.stdout + res.stderr
    (tmp_path / "dags_test.log").write_text(out)
    states = _task_states(services["airflow_db"], "fracture_training")
    failed = [t for t, (s, _) in states.items() if s == "failed"]
    assert res.returncode == 0, f"failed tasks {failed}; log {tmp_path / 'dags_test.log'}\n{out[-3000:]}"
    expected = {"ingest", "validate", "deidentify", "split", "train", "calibrate", "tune_thresholds",
                "evaluate", "cam", "package", "register", "gate"}
    assert {t for t, (s, _) in states.items() if s == "success"} >= expected, states
    assert states["detect_train"][0] == "skipped"
    # MLflow: the run, the registered challenger, and the artifacts in S3
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=services["mlflow"].url)
    version = client.get_model_version_by_alias("fracture-classifier", "challenger")
    run = client.get_run(version.run_id)
    assert run.data.params["backbone"] == "test_resnet" and "best_val_auroc" in run.data.metrics
    assert version.tags["approval"] == "pending" and "metric.auroc" in version.tags
    assert version.tags["gate"] in ("passed", "failed") and version.tags["gate.champion_version"] == "none"
    keys = services["s3"].keys("fracture-ops-mlflow")
    assert any(k.endswith("evaluation/evaluation.json") for k in keys), keys[:20]
    assert any(k.endswith("explain/gradcam_report.html") for k in keys)
    assert any(k.endswith("MLmodel") for k in keys) and any(k.endswith("model.pt") for k in keys)


INJECT_DAG = '''
"""Fault-injection DAG for the retry-policy test: real step specs, failing inputs."""
import pendulum
from airflow.sdk import dag
from fracture_ops.orchestration.airflow_tasks import default_args, step_task
from fracture_ops.orchestration.specs import StepSpec, COMMON

STEPS = {
    "infra_failure": StepSpec("infra_failure", ("split", "{{ params.corrupt }}", *COMMON), retries=2,
                              retry_delay_s=1),
    "bad_data": StepSpec("bad_data", ("validate", "{{ params.bad_manifest }}", *COMMON), retries=2,
                         retry_delay_s=1),
}


@dag(dag_id="fracture_fault_injection", schedule=None, start_date=pendulum.datetime(2026, 1, 1),
     default_args=default_args(), params={"artifact_root": "", "corrupt": "", "bad_manifest": ""},
     doc_md="retry policy test", tags=["test"])
def fracture_fault_injection():
    step_task("infra_failure", steps=STEPS)
    step_task("bad_data", steps=STEPS)


fracture_fault_injection()
'''


def test_retry_policy_infra_retried_bad_data_not(services, tmp_path):
    import pandas as pd

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "fault_injection.py").write_text(textwrap.dedent(INJECT_DAG))
    env = _airflow_home(services, dags, "airflow_faults")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")  # the reader crashes: exit 1, an internal error
    bad = tmp_path / "manifest.parquet"
    pd.DataFrame({"image_id": ["a"], "image_uri": [str(tmp_path / "missing_image.png")],
                  "patient_id": ["P1"], "study_id": ["S1"], "label": ["fracture"]}).to_parquet(bad)
    conf = {"artifact_root": str(tmp_path / "art"), "corrupt": str(corrupt), "bad_manifest": str(bad)}
    res = airflow(["dags", "test", "fracture_fault_injection", "-c", json.dumps(conf)], env, timeout=600)
    out = res.stdout + res.stderr
    states = _task_states(services["airflow_db"], "fracture_fault_injection")
    assert states["infra_failure"] == ("failed", 3), states  # 1 try + 2 retries
    assert states["bad_data"] == ("failed", 1), states  # bad input: no retry
    # the log names the bad row and the reason (by row number: ids and paths may carry PHI
    # before de-identification)
    assert "quarantined row 0 of the manifest: missing_file" in out
    assert str(tmp_path / "missing_image.png") not in out
    assert "step bad_data exited 4: bad input (not retried)" in out
    assert "validate/report.html" in out  # where the full report with the file list is
    assert "step infra_failure exited 1: infrastructure/internal error (retryable)" in out


def test_promotion_inference_and_drift_dags_green(services, tmp_path):
    """After a training run: the promotion DAG leaves an unapproved challenger alone; with a
    champion in place the inference DAG fills the prediction log (no duplicates on rerun) and
    the drift DAG writes its report and index."""
    import mlflow

    from fracture_ops.data.synthetic import SynthConfig, synth_step

    env = _airflow_home(services, REPO / "dags", "airflow_ops")
    client = mlflow.MlflowClient(tracking_uri=services["mlflow"].url)
    challenger = client.get_model_version_by_alias("fracture-classifier", "challenger")
    art = tmp_path / "art"
    env["FRACTURE_OPS_APPROVERS"] = "alice"
    res = airflow(["dags", "test", "fracture_promotion", "-c", json.dumps({"artifact_root": str(art)})], env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert _task_states(services["airflow_db"], "fracture_promotion")["promote"][0] == "success"
    versions = client.search_model_versions("name = 'fracture-classifier'")
    assert not any("champion" in v.aliases for v in versions)  # not approved: not promoted
    # an administrator names today's champion (promotion itself is covered in test_promotion.py)
    client.set_registered_model_alias("fracture-classifier", "champion", challenger.version)
    synth_step(SynthConfig(out_dir=str(tmp_path / "incoming"), n_patients=20, image_size=96,
                           dicom_fraction=0.3, seed=11))
    n_images = len(list((tmp_path / "incoming" / "images").iterdir()))
    conf = {"incoming_uri": str(tmp_path / "incoming" / "images"), "artifact_root": str(art),
            "shards": 3}
    for _ in range(2):  # the second run of the same date must not duplicate rows
        res = airflow(["dags", "test", "fracture_inference", "2026-11-20", "-c", json.dumps(conf)], env)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        import pandas as pd

        part = pd.concat(pd.read_parquet(p) for p in (art / "prediction_log" / "date=2026-11-20").glob("part-*.parquet"))
        assert len(part) == n_images and part["image_id"].is_unique
        assert set(part["model_version"].astype(str)) == {challenger.version}
    # infer ran as three mapped task instances (one per shard), all green, then one merge
    import sqlalchemy as sa

    engine = sa.create_engine(services["airflow_db"].replace("postgresql://", "postgresql+psycopg2://"))
    with engine.connect() as c:
        mapped = c.execute(sa.text("SELECT DISTINCT map_index, state FROM task_instance WHERE dag_id = "
                                   "'fracture_inference' AND task_id = 'infer'")).fetchall()
    engine.dispose()
    assert sorted(mapped) == [(0, "success"), (1, "success"), (2, "success")]
    assert _task_states(services["airflow_db"], "fracture_inference")["infer_merge"][0] == "success"
    # the drift run of 2026-11-21 reports on the complete day before: 2026-11-20
    res = airflow(["dags", "test", "fracture_drift", "2026-11-21", "-c",
                   json.dumps({"artifact_root": str(art), "window_days": 1, "drift_share_threshold": 0.3})], env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    states = _task_states(services["airflow_db"], "fracture_drift")
    assert states["drift"][0] == "success"
    assert states["drift_detected"][0] in ("success", "skipped")
    drift_dir = art / "monitoring" / "drift"
    assert (drift_dir / "2026-11-20" / "report.html").exists() and (drift_dir / "index.html").exists()
