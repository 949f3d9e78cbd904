"""Drift monitoring DAG: wiring only; Evidently reports on the prediction log, daily."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from fracture_ops.orchestration.airflow_tasks import build_tasks, default_args
from fracture_ops.orchestration.assets import DRIFT_DETECTED
from fracture_ops.orchestration.params import dag_params
from fracture_ops.orchestration.specs import DRIFT_STEPS

DOC = """
### fracture_drift
Daily: compares the latest window of the prediction log with the champion's reference (its
validation set's features and scores) with Evidently: data drift on image features, prediction
drift, and performance drift where labels have arrived. Reports (HTML + JSON) go to
`<artifact_root>/monitoring/drift/<date>/`, are listed newest first on
`<artifact_root>/monitoring/drift/index.html`, and are logged to the MLflow experiment
`fracture-drift`. When drift passes the threshold, the task `drift_detected` succeeds (instead of
being skipped) and `retraining_signal` emits the `fracture_ops_drift_detected` asset, which can
trigger retraining.

*Research and education only; not for clinical use.*
"""


@dag(
    dag_id="fracture_drift",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={name: Param(**spec) for name, spec in dag_params("fracture_drift").items()},
    doc_md=DOC,
    tags=["fracture-ops", "monitoring"],
)
def fracture_drift():
    report = build_tasks(DRIFT_STEPS)["drift"]

    @task.short_circuit(task_id="drift_detected")
    def drift_detected(summary: dict) -> bool:
        return bool(summary.get("drift_detected"))

    @task(task_id="retraining_signal", outlets=[DRIFT_DETECTED])
    def retraining_signal(summary: dict) -> dict:
        return {k: summary.get(k) for k in ("report_date", "drift_share", "drifted_features", "report_uri")}

    flagged = drift_detected(report)
    flagged >> retraining_signal(report)


fracture_drift()
