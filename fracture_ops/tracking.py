"""MLflow helpers: where the tracking store is, and runs that survive a restart.

The tracking URI comes from ``MLFLOW_TRACKING_URI``. Without it, the embedded default is a local
SQLite store under the project's data folder (``$FRACTURE_OPS_MLFLOW_DIR`` or ``./data/mlflow``),
with artifacts beside it. A step that may be killed and restarted keeps its MLflow run id in its
run folder, so the restarted process logs to the same run instead of a new one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fracture_ops import storage
from fracture_ops import envvars

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the embedded SQLite store (created on first use)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = Path(os.environ.get(envvars.MLFLOW_DIR, "data/mlflow")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _artifact_location(name: str) -> str | None:
    """Artifacts beside a local SQLite store; a server decides its own (None)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None  # e.g. a server with --artifacts-destination s3://...
    folder = Path(uri[len("sqlite:///"):]).resolve().parent
    return (folder / "artifacts" / name).as_uri()


def setup(experiment: str):
    """Point mlflow at the tracking store and make sure ``experiment`` exists; returns mlflow."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    # decide the artifact location before set_tracking_uri: mlflow 3 exports the URI to the
    # environment, which would make every store look like a server's
    location = _artifact_location(experiment)
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # created concurrently by another step: fine
            if mlflow.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)
    return mlflow


def start_or_resume(folder: str, experiment: str, run_name: str, tags: dict[str, str] | None = None):
    """Start the run recorded in ``folder`` (resume) or a new one, recording its id there.

    Returns:
        ``(mlflow, active_run, resumed)``.
    """
    mlflow = setup(experiment)
    record = storage.join(folder, RUN_FILE)
    if storage.exists(record):
        run_id = storage.read_json(record)["run_id"]
        try:
            run = mlflow.start_run(run_id=run_id)
            log.info("resuming MLflow run %s", run_id)
            return mlflow, run, True
        except Exception as exc:  # the run was deleted: start afresh
            log.warning("cannot resume MLflow run %s (%s); starting a new one", run_id, exc)
    run = mlflow.start_run(run_name=run_name, tags=tags or {})
    storage.write_json(record, {"run_id": run.info.run_id, "experiment": experiment,
                                "tracking_uri": mlflow.get_tracking_uri()})
    return mlflow, run, False


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested config dicts into MLflow params (``a.b=value``), values as short strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def run_id_of(folder: str) -> str | None:
    """The MLflow run id recorded in a step folder, if any."""
    record = storage.join(folder, RUN_FILE)
    return storage.read_json(record)["run_id"] if storage.exists(record) else None
