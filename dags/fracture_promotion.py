"""Promotion DAG: wiring only; promotes an approved, gate-passed challenger to champion."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from fracture_ops.orchestration.airflow_tasks import default_args, step_task
from fracture_ops.orchestration.params import TRAINING_PARAMS
from fracture_ops.orchestration.specs import PROMOTION_STEPS

DOC = """
### fracture_promotion
Every 15 minutes (or when triggered) this DAG looks at the `challenger` version of
`fracture-classifier` in the MLflow registry and moves the `champion` alias to it **only** when a
person approved it and the automatic gate passed:

1. In the MLflow UI, open the model version and set the tags `approval` = `approved` and
   `approved_by` = your user name (to reject: `approval` = `rejected`). With the server's
   basic-auth app only users with EDIT or MANAGE permission on the model can do this.
2. `approved_by` must be on the approvers list (`FRACTURE_OPS_APPROVERS` on the workers).
3. The version's gate must have passed against today's champion (the evidence is read from the
   version's own run and checked against the registry; tags are not trusted).

Every tick first compares the `champion` alias with the audit: a champion set by hand is
reverted (or promotions are frozen, `on_champion_drift=freeze`), and audited. Every promotion,
refusal and rollback (`fracture-ops registry rollback`) is its own record in the append-only
audit (`$FRACTURE_OPS_AUDIT_URI`, deployment config). Running it again changes nothing.

*Research and education only; not for clinical use.*
"""


@dag(
    dag_id="fracture_promotion",
    schedule="*/15 * * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={"artifact_root": Param(**TRAINING_PARAMS["artifact_root"])},
    doc_md=DOC,
    tags=["fracture-ops", "registry"],
)
def fracture_promotion():
    step_task("promote", steps=PROMOTION_STEPS)


fracture_promotion()
