"""The model registry's names, defined once: registered models, aliases, tag keys, lookups.

Every stage that talks to the MLflow registry (register, gate, promotion, the approval app, the
webhooks, batch inference, the drift reference, detection) takes its names from here, so a model
or an alias is spelled in one place. This module sits below the stages (it imports no stage) and
imports MLflow only inside the functions that call it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from fracture_ops import catalog
from fracture_ops.errors import BadInputError, ConfigError, RegistryUnavailable

log = logging.getLogger(__name__)

# registered models
CLASSIFIER = "fracture-classifier"
DETECTOR = "fracture-detector"
# aliases: ``challenger`` is set by register (the pipeline identity); ``champion`` only by the
# promotion step (the promoter identity), after a person's approval and a passed gate
CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES = (CHAMPION, CHALLENGER)

# version tags
TAG_APPROVAL = "approval"                   # pending | approved | rejected (set by a reviewer)
TAG_APPROVED_BY = "approved_by"             # typed by the reviewer; trusted only in a local store
TAG_VERIFIED_BY = "approval.verified_by"    # stamped by the approval app from the login
TAG_GATE = "gate"                           # pending | passed | failed (set by the gate step)
TAG_GATE_CHAMPION = "gate.champion_version"  # the champion the gate compared against
TAG_GATE_REASONS = "gate.reasons"
TAG_GATE_TEST_SET = "gate.test_set_hash"    # the test set both models scored
TAG_GATE_EVIDENCE = "gate.evidence"
# the gate's evidence in the version's own training run: the run artifact at the gate step's path
GATE_EVIDENCE = catalog.GATE.path


def gate_evidence_uri(run_id: str) -> str:
    """``runs:/<run_id>/gate/gate.json``: where a version's gate evidence lives."""
    return f"runs:/{run_id}/{GATE_EVIDENCE}"
TAG_MODEL_CARD = "model_card"
TAG_RUN_FOLDER = "run_folder"               # the training run's folder (set at registration)
# set by the promotion step (the promoter identity)
TAG_ROLLED_BACK = "rolled_back_at"
TAG_PROMOTED_AT = "promoted_at"
TAG_PROMOTED_FROM = "promoted_from"
TAG_RETIRED_AT = "retired_at"
TAG_SUPERSEDED_BY = "superseded_by"
TAG_RESTORED_AT = "restored_at"
# written by the registry server only (an approval's stamp time and signature, the gate
# evidence's digest and writer)
TAG_APPROVED_AT = "approval.at"
TAG_SIGNATURE = "approval.signature"
TAG_EVIDENCE_SHA = "gate.evidence.sha256"
TAG_EVIDENCE_BY = "gate.evidence.by"
# registered-model tag: ``seq:sha256`` of the model's newest audit record (set by the promoter only)
TAG_AUDIT_HEAD = "audit.head"

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def model_uri(name: str = CLASSIFIER, *, alias: str | None = None, version: str | int | None = None) -> str:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (exactly one of the two)."""
    if (alias is None) == (version is None):
        raise ValueError("give exactly one of alias and version")
    return f"models:/{name}@{alias}" if alias is not None else f"models:/{name}/{version}"


CHAMPION_URI = model_uri(CLASSIFIER, alias=CHAMPION)


@dataclass(frozen=True)
class ModelRef:
    """A concrete registered model version (what every prediction row records)."""

    name: str
    version: str
    alias: str | None = None
    created_date: str = ""  # YYYY-MM-DD (UTC) the version was registered

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``: pinned, unlike an alias."""
        return model_uri(self.name, version=self.version)


def resolve_model(uri: str) -> ModelRef:
    """Resolve ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` to a concrete version.

    Raises:
        ConfigError: the URI is not a registry URI of one of those two forms.
        BadInputError: the registered model, version or alias does not exist.
    """
    match = _REGISTRY_URI.match(uri.strip())
    if not match:
        raise ConfigError(f"model_uri must be models:/<name>@<alias> or models:/<name>/<version> "
                          f"(the version is recorded with every prediction), got {uri!r}")
    import mlflow

    from fracture_ops import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    name, alias = match["name"], match["alias"]
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, match["version"]))
    except mlflow.exceptions.MlflowException as exc:
        # a missing model/alias is a state the user must fix (promote a model); server errors
        # (unavailable, internal) may heal on retry and propagate as internal errors
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise BadInputError(f"{uri}: {exc.message}") from exc
        raise
    log.info("using %s version %s%s", name, mv.version, f" (@{alias})" if alias else "")
    created = datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, UTC)
    return ModelRef(name=name, version=str(mv.version), alias=alias,
                    created_date=created.date().isoformat())


def ensure_registered_model(client, name: str, description: str, tags: dict[str, str] | None = None) -> None:
    """Create the registered model only when it does not exist yet (check before create)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description=description, tags=tags)


def alias_version(client, name: str, alias: str):
    """The version ``name@alias`` points at, or None when the alias (or model) does not exist.

    Only the registry's own "not found" answers mean "no alias"; any other failure (a 403, a
    timeout, a server error) raises :class:`RegistryUnavailable`, so that no promotion or gate
    ever acts on a registry it could not read.
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code == "RESOURCE_DOES_NOT_EXIST" or (
                code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in str(exc)):
            return None
        raise RegistryUnavailable(f"registry lookup of {name}@{alias} failed ({code}): "
                                  f"{exc.message if hasattr(exc, 'message') else exc}") from exc
    except (OSError, TimeoutError) as exc:  # connection errors below MLflow's retries
        raise RegistryUnavailable(f"registry lookup of {name}@{alias} failed: "
                                  f"{type(exc).__name__}") from exc


def find_version(client, name: str, run_id: str):
    """The existing version of ``name`` made from MLflow run ``run_id``, if any."""
    for v in client.search_model_versions(f"name = '{name}'"):
        if v.run_id == run_id:
            return v
    return None
