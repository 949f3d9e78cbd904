"""The environment variables fracture-ops reads or sets: every name is spelled here once.

Modules refer to ``envvars.DEID_SECRET`` and so on; ``tests/test_architecture.py`` fails on a
quoted ``"FRACTURE_OPS_..."`` literal anywhere else in the package or the DAGs. Prose (help text,
docstrings, error messages) may name a variable: that is documentation, not a second spelling.
"""

from __future__ import annotations

# where things go
ARTIFACT_ROOT = "FRACTURE_OPS_ARTIFACT_ROOT"  # dataset store default (else ./data/artifacts)
RAW_ROOT = "FRACTURE_OPS_RAW_ROOT"  # raw zone default (else <artifact_root>-raw)
DATA_ROOTS = "FRACTURE_OPS_DATA_ROOTS"  # the folders and s3:// prefixes a source may come from
CACHE_DIR = "FRACTURE_OPS_CACHE_DIR"  # decoded images and converted weights (the pod's volume)
MLFLOW_DIR = "FRACTURE_OPS_MLFLOW_DIR"  # the embedded MLflow store (else ./data/mlflow)
STACK_DIR = "FRACTURE_OPS_STACK_DIR"  # `make up`'s state folder (else ./data/stack)
AUDIT_URI = "FRACTURE_OPS_AUDIT_URI"  # the promotion audit chain's folder or s3:// prefix

# how steps run
RUNNER = "FRACTURE_OPS_RUNNER"  # local (default) or kubernetes
XCOM_FILE = "FRACTURE_OPS_XCOM_FILE"  # where a step writes its JSON summary for Airflow
NO_PROGRESS = "FRACTURE_OPS_NO_PROGRESS"  # 1: no progress bars (logs, tests)
PLATFORM_IMAGE = "FRACTURE_OPS_PLATFORM_IMAGE"  # the CPU steps' container image
TRAINING_IMAGE = "FRACTURE_OPS_TRAINING_IMAGE"  # the CUDA steps' container image
TRAINER_RUNTIME = "FRACTURE_OPS_TRAINER_RUNTIME"  # the Kubeflow Trainer runtime of TrainJobs
K8S_NAMESPACE = "FRACTURE_OPS_K8S_NAMESPACE"  # the namespace step pods run in
K8S_STEP_SERVICE_ACCOUNT = "FRACTURE_OPS_K8S_STEP_SERVICE_ACCOUNT"  # step pods' service account
K8S_CA_SECRET = "FRACTURE_OPS_K8S_CA_SECRET"  # the Secret with the CA bundle pods trust
KUEUE_QUEUE = "FRACTURE_OPS_KUEUE_QUEUE"  # the Kueue local queue GPU pods are admitted through
GIT_REVISION = "FRACTURE_OPS_GIT_REVISION"  # the code revision recorded with a model (images)

# secrets and identities
DEID_SECRET = "FRACTURE_OPS_DEID_SECRET"  # the de-identification key (pseudonyms, date shifts)
APPROVERS = "FRACTURE_OPS_APPROVERS"  # accounts that may approve a model version
PROMOTERS = "FRACTURE_OPS_PROMOTERS"  # accounts that may move the champion
PIPELINE_USERS = "FRACTURE_OPS_PIPELINE_USERS"  # the pipeline identity's accounts
GATE_USERS = "FRACTURE_OPS_GATE_USERS"  # the gate identity's accounts
APPROVAL_KEY = "FRACTURE_OPS_APPROVAL_KEY"  # the registry server's approval signing key
APPROVAL_PUBKEY = "FRACTURE_OPS_APPROVAL_PUBKEY"  # its public half, for whoever verifies
WEBHOOK_SECRET = "FRACTURE_OPS_WEBHOOK_SECRET"  # MLflow webhook HMAC secret
NOTIFY_URL = "FRACTURE_OPS_NOTIFY_URL"  # where promotion notices are posted

# the gate's reference test set
REFERENCE_TEST_URI = "FRACTURE_OPS_REFERENCE_TEST_URI"
REFERENCE_TEST_HASH = "FRACTURE_OPS_REFERENCE_TEST_HASH"
REQUIRE_REFERENCE_TEST = "FRACTURE_OPS_REQUIRE_REFERENCE_TEST"
MIN_TEST_SIZE = "FRACTURE_OPS_MIN_TEST_SIZE"

# the hospital's PACS (DICOMweb)
PACS_URL = "FRACTURE_OPS_PACS_URL"
PACS_USERNAME = "FRACTURE_OPS_PACS_USERNAME"
PACS_PASSWORD = "FRACTURE_OPS_PACS_PASSWORD"
PACS_CONNECTION = "FRACTURE_OPS_PACS_CONNECTION"  # the Airflow connection id errors name
