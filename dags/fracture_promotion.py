"""Promotion DAG: wiring only; promotes an approved, gate-passed challenger to champion."""

from __future__ import annotations

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag

from fracture_ops.orchestration.airflow_tasks import build_tasks, default_args
from fracture_ops.orchestration.assets import REGISTRY_EVENTS
from fracture_ops.orchestration.params import dag_params
from fracture_ops.orchestration.specs import PROMOTION_STEPS

DOC = """
### fracture_promotion
On every registry event (a new version, an `approval` or `gate` tag, an alias change: MLflow's
webhook reaches `fracture-ops registry webhooks serve`, which creates an event on the asset
`fracture-ops://registry/events`), every 15 minutes as a fallback, or when triggered, this DAG
looks at the `challenger` version of
`fracture-classifier` in the MLflow registry and moves the `champion` alias to it **only** when a
person approved it and the automatic gate passed:

1. In the MLflow UI, open the model version and set the tag `approval` = `approved` (to reject:
   `rejected`). The server's fracture-ops app accepts it only from a user on its approvers list
   and stamps that user's name into `approval.verified_by` (with a local store, no server, the
   typed `approved_by` tag stands in).
2. The approver must also be on the workers' `FRACTURE_OPS_APPROVERS`.
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
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("*/15 * * * *", timezone="UTC"),
                                 assets=REGISTRY_EVENTS),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={name: Param(**spec) for name, spec in dag_params("fracture_promotion").items()},
    doc_md=DOC,
    tags=["fracture-ops", "registry"],
)
def fracture_promotion():
    build_tasks(PROMOTION_STEPS)


fracture_promotion()
