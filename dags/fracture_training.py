"""Training pipeline DAG: wiring only; every task calls one fracture_ops step."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from fracture_ops.orchestration.airflow_tasks import build_tasks, default_args
from fracture_ops.orchestration.assets import CANDIDATE_MODEL, CLEAN_MANIFEST, SPLIT
from fracture_ops.orchestration.params import dag_params
from fracture_ops.orchestration.specs import TRAINING_STEPS

DOC = """
### fracture_training
Validate -> de-identify -> split -> train (GPU pod) -> calibrate -> tune thresholds -> evaluate ->
Grad-CAM report -> package the MLflow model -> register it as the `challenger` version of
`fracture-classifier` -> gate it against the `champion` on the same test set (never promotes).
Optional YOLOv8 detection branch (`detection` param).

Every task runs `fracture-ops <step>` (locally as a subprocess, or as a Kubernetes pod when
`FRACTURE_OPS_RUNNER=kubernetes`). Outputs: `<artifact_root>/runs/<run id>/<step>/`.
Bad data fails a task at once (no retries) and its log names the file and the reason;
infrastructure failures are retried with back-off. Promotion to `champion` needs a person's
approval in the MLflow registry (see the `fracture_promotion` DAG).

*Research and education only; not for clinical use.*
"""


@dag(
    dag_id="fracture_training",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={name: Param(**spec) for name, spec in dag_params("fracture_training").items()},
    doc_md=DOC,
    tags=["fracture-ops", "training"],
)
def fracture_training():
    # a task per step of TRAINING_STEPS, each after the steps whose outputs it reads
    tasks = build_tasks(TRAINING_STEPS, outlets={"validate": [CLEAN_MANIFEST], "split": [SPLIT],
                                                 "gate": [CANDIDATE_MODEL]})

    @task.short_circuit(task_id="detection_enabled", ignore_downstream_trigger_rules=False)
    def detection_enabled(params=None) -> bool:
        return bool(params["detection"])

    detection_enabled() >> tasks["detect_train"]


fracture_training()
