"""Batch inference DAG: wiring only; scores new studies with the champion model."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from fracture_ops.orchestration.airflow_tasks import build_tasks, default_args
from fracture_ops.orchestration.assets import PREDICTION_LOG
from fracture_ops.orchestration.params import dag_params
from fracture_ops.orchestration.specs import INFERENCE_STEPS

DOC = """
### fracture_inference
Daily (or when triggered): make sure the champion's drift reference exists (its validation split
scored once per model version), then score the studies under `incoming_uri` (a folder or an s3://
prefix; DICOM is de-identified first) with `models:/fracture-classifier@champion`, pinned to one
version for the whole run. `infer_plan` splits the day's new images into at most `shards` shards;
`infer` runs once per shard (mapped tasks: a failed shard is retried alone); `infer_merge` writes
every shard's rows as one part of `<artifact_root>/prediction_log/date=<ds>/` (predictions,
model version, per-image features). Re-running a date, a shard or the merge replaces rows, never
duplicates or loses them. With `pacs_results` on, `pacs_report` sends the champion's results
on the studies pulled from the PACS (`pacs_dataset`) back to the PACS: a DICOM SR and a Grad-CAM
secondary capture per radiograph, under the original study (see docs/pacs.md).

*Research and education only; not for clinical use.*
"""


@dag(
    dag_id="fracture_inference",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={name: Param(**spec) for name, spec in dag_params("fracture_inference").items()},
    doc_md=DOC,
    tags=["fracture-ops", "inference"],
)
def fracture_inference():
    # reference -> infer_plan (the version the reference was built for, pinned) -> infer, one
    # mapped task per shard -> infer_merge into the date partition
    tasks = build_tasks(INFERENCE_STEPS, outlets={"infer_merge": [PREDICTION_LOG]})

    # optional: results back to the PACS (trigger parameter pacs_results, off by default)
    @task.short_circuit(task_id="pacs_results_enabled", ignore_downstream_trigger_rules=False)
    def pacs_results_enabled(params=None) -> bool:
        return bool(params["pacs_results"])

    pacs_results_enabled() >> tasks["pacs_report"]


fracture_inference()
