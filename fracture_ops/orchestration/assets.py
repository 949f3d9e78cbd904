"""Airflow assets the training DAG emits, so downstream DAGs can be data-aware."""

from __future__ import annotations

from airflow.sdk import Asset

from fracture_ops.registry.client import CLASSIFIER
from fracture_ops.registry.webhooks import REGISTRY_EVENTS_NAME, REGISTRY_EVENTS_URI

CLEAN_MANIFEST = Asset(name="fracture_ops_clean_manifest", uri="fracture-ops://datasets/clean-manifest")
SPLIT = Asset(name="fracture_ops_split", uri="fracture-ops://datasets/split")
CANDIDATE_MODEL = Asset(name="fracture_ops_candidate_model", uri=f"fracture-ops://models/{CLASSIFIER}")
PREDICTION_LOG = Asset(name="fracture_ops_prediction_log", uri="fracture-ops://logs/predictions")
DRIFT_DETECTED = Asset(name="fracture_ops_drift_detected", uri="fracture-ops://monitoring/drift")
# created by the registry webhook receiver (fracture_ops.registry.webhooks) on a new version,
# an approval or gate tag, or an alias change: the promotion DAG runs on it within seconds
REGISTRY_EVENTS = Asset(name=REGISTRY_EVENTS_NAME, uri=REGISTRY_EVENTS_URI)
