"""Airflow assets the training DAG emits, so downstream DAGs can be data-aware."""

from __future__ import annotations

from airflow.sdk import Asset

CLEAN_MANIFEST = Asset(name="fracture_ops_clean_manifest", uri="fracture-ops://datasets/clean-manifest")
SPLIT = Asset(name="fracture_ops_split", uri="fracture-ops://datasets/split")
CANDIDATE_MODEL = Asset(name="fracture_ops_candidate_model", uri="fracture-ops://models/fracture-classifier")
PREDICTION_LOG = Asset(name="fracture_ops_prediction_log", uri="fracture-ops://logs/predictions")
DRIFT_DETECTED = Asset(name="fracture_ops_drift_detected", uri="fracture-ops://monitoring/drift")
