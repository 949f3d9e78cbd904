"""PACS ingest DAG: wiring only; new radiograph studies from the PACS, hourly."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from fracture_ops.orchestration.airflow_tasks import build_tasks, default_args
from fracture_ops.orchestration.params import dag_params
from fracture_ops.orchestration.specs import PACS_STEPS

DOC = """
### fracture_pacs_ingest
Hourly: asks the PACS (DICOMweb, QIDO-RS) for CR/DX studies newer than the watermark, retrieves
each instance (WADO-RS) and de-identifies it on arrival with the `deidentify` step's profile and
burned-in text scrub: identified images never reach the dataset store. Each study becomes one
part of `<artifact_root>/pacs/<dataset>/manifest.parquet` (pseudonymous ids, no labels); a study
is never ingested twice, an interrupted run resumes, and the watermark (kept in the raw zone)
moves only after the data is written. The PACS endpoint and account come from the Airflow
connection `fracture_ops_pacs` (local runner) or the Secret `fracture-ops-pacs` (pods); a 401
fails at once naming the connection, an unreachable PACS is retried with back-off.

*Research and education only; not for clinical use.*
"""


@dag(
    dag_id="fracture_pacs_ingest",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={name: Param(**spec) for name, spec in dag_params("fracture_pacs_ingest").items()},
    doc_md=DOC,
    tags=["fracture-ops", "pacs"],
)
def fracture_pacs_ingest():
    build_tasks(PACS_STEPS)


fracture_pacs_ingest()
