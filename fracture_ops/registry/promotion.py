"""Promotion that a person approves, rollback, and the audit log.

How a person approves (in the MLflow UI, on the model version page, "Tags"):

- ``approval`` = ``approved`` and ``approved_by`` = their user name (to reject: ``rejected``).

With the MLflow server's basic-auth app only users with EDIT or MANAGE permission on the registered
model can set these tags: give reviewers that permission and everyone else READ. The promotion step then moves the ``champion`` alias to the ``challenger``
version only when all of these hold: ``approval=approved``, ``approved_by`` is on the configured
approvers list, ``gate=passed`` for the current champion, and the gate's evidence artifact
confirms it (the tag alone is not trusted). Anything else is never promoted, whatever other tags say; a
refusal is written to the audit log once per version and reason. The previous champion is tagged
(``retired_at``, ``superseded_by``), the new one records ``promoted_from``, and each promotion or
rollback appends one JSON line to ``<artifact_root>/registry/audit.jsonl``. Re-running changes
nothing once the champion is in place (idempotent).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import datetime, UTC
from typing import ClassVar

from pydantic import Field

from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.errors import BadInputError
from fracture_ops.registry.register import alias_version

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"


class PromotionConfig(StepConfig):
    """Config of ``fracture-ops registry promote|rollback|status``."""

    section: ClassVar[str] = "promotion"
    model_name: str = "fracture-classifier"
    approvers: list[str] = Field(default_factory=lambda: [
        a.strip() for a in os.environ.get("FRACTURE_OPS_APPROVERS", "").split(",") if a.strip()])
    audit_uri: str = ""  # default <artifact_root>/registry/audit.jsonl
    actor: str = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_USERNAME", "fracture-ops"))

    def audit_path(self) -> str:
        return self.audit_uri or storage.join(self.artifact_root, "registry", "audit.jsonl")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_audit(uri: str) -> list[dict]:
    """All audit records (oldest first)."""
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def append_audit(uri: str, record: dict) -> dict:
    """Append one record (read-modify-write, so it also works on S3)."""
    lines = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text(uri, lines + json.dumps(record, sort_keys=True) + "\n")
    log.info("audit: %s", record)
    return record


def decide(version_tags: dict[str, str], approvers: list[str],
           champion_version: str | None = None) -> tuple[bool, str]:
    """Whether a challenger may be promoted, and why not (pure).

    The gate verdict must be about today's champion: a version gated against an earlier
    champion (since replaced or rolled back) has to be gated again.
    """
    approval = version_tags.get("approval", "pending")
    who = version_tags.get("approved_by", "")
    if approval == "rejected":
        return False, "rejected by reviewer"
    if version_tags.get("rolled_back_at"):
        return False, "rolled back; a new version must be approved"
    if approval != "approved":
        return False, "awaiting approval"
    if not who:
        return False, "approval names no approver (approved_by tag missing)"
    if who not in approvers:
        return False, f"approver {who!r} is not on the approvers list"
    if version_tags.get("gate") != "passed":
        return False, f"gate verdict is {version_tags.get('gate', 'missing')!r}, not 'passed'"
    gated_against = version_tags.get("gate.champion_version", "")
    if gated_against != (champion_version or "none"):
        return False, (f"gate compared against champion {gated_against or '?'}, but the champion is "
                       f"{champion_version or 'none'}: run the gate again")
    return True, "approved and gate passed"


def verify_gate_evidence(version: str, tags: dict[str, str]) -> str | None:
    """Re-read the gate's evidence artifact; a ``gate=passed`` tag alone is not trusted.

    Returns:
        None when the evidence says this version passed, else the reason.
    """
    import mlflow

    uri = tags.get("gate.evidence", "")
    if not uri:
        return "no gate evidence recorded"
    try:
        evidence = mlflow.artifacts.load_dict(uri)
    except Exception as exc:  # missing artifact, unreadable store: refuse rather than promote
        return f"gate evidence unreadable ({type(exc).__name__})"
    if evidence.get("passed") is not True or str(evidence.get("challenger", {}).get("version")) != version:
        return "gate evidence does not show this version passing"
    return None


def promote_if_approved(cfg: PromotionConfig, client=None) -> dict:
    """One promotion pass: promote the approved, gate-passed challenger, or record why not."""
    import mlflow

    client = client or mlflow.MlflowClient()
    challenger = alias_version(client, cfg.model_name, CHALLENGER)
    champion = alias_version(client, cfg.model_name, CHAMPION)
    if challenger is None:
        return {"action": "none", "reason": "no challenger"}
    audit = cfg.audit_path()
    if champion is not None and champion.version == challenger.version:
        _repair_promotion_record(cfg, audit, champion)
        return {"action": "none", "reason": f"version {challenger.version} is already champion"}
    ok, reason = decide(challenger.tags, cfg.approvers, champion.version if champion else None)
    if ok:
        reason = verify_gate_evidence(challenger.version, challenger.tags) or reason
        ok = reason == "approved and gate passed"
    if not ok:
        if reason != "awaiting approval" and not _already_recorded(audit, challenger.version, reason):
            append_audit(audit, {"ts": now(), "action": "refused", "model": cfg.model_name,
                                 "version": challenger.version, "reason": reason,
                                 "approved_by": challenger.tags.get("approved_by", ""), "actor": cfg.actor})
        return {"action": "none", "version": challenger.version, "reason": reason}
    previous = champion.version if champion is not None else None
    ts = now()
    # provenance first, alias last but one: a failure after the alias moved is repaired on retry
    client.set_model_version_tag(cfg.model_name, challenger.version, "promoted_at", ts)
    client.set_model_version_tag(cfg.model_name, challenger.version, "promoted_from", previous or "none")
    client.set_registered_model_alias(cfg.model_name, CHAMPION, challenger.version)
    if previous is not None:
        client.set_model_version_tag(cfg.model_name, previous, "retired_at", ts)
        client.set_model_version_tag(cfg.model_name, previous, "superseded_by", challenger.version)
    record = append_audit(audit, {
        "ts": ts, "action": "promoted", "model": cfg.model_name, "version": challenger.version,
        "previous_version": previous, "approved_by": challenger.tags.get("approved_by"),
        "actor": cfg.actor, "evidence": challenger.tags.get("gate.evidence", "")})
    return {"action": "promoted", **{k: record[k] for k in ("version", "previous_version", "approved_by")}}


def _repair_promotion_record(cfg: PromotionConfig, audit: str, champion) -> None:
    """A promotion interrupted after the alias moved: write its missing audit record once."""
    if "promoted_at" not in champion.tags:
        return  # made champion by hand (or before this tool): nothing of ours to repair
    if any(r.get("action") == "promoted" and r.get("version") == champion.version for r in read_audit(audit)):
        return
    previous = champion.tags.get("promoted_from", "none")
    append_audit(audit, {"ts": champion.tags["promoted_at"], "action": "promoted", "model": cfg.model_name,
                         "version": champion.version, "previous_version": None if previous == "none" else previous,
                         "approved_by": champion.tags.get("approved_by"), "actor": cfg.actor,
                         "evidence": champion.tags.get("gate.evidence", ""), "repaired": True})


def _already_recorded(audit_uri: str, version: str, reason: str) -> bool:
    return any(r.get("action") == "refused" and r.get("version") == version and r.get("reason") == reason
               for r in read_audit(audit_uri))


def rollback(cfg: PromotionConfig, client=None) -> dict:
    """Restore the previous champion (the current one's ``promoted_from``), with an audit record.

    Raises:
        BadInputError: no champion, or it has no previous champion to return to.
    """
    import mlflow

    client = client or mlflow.MlflowClient()
    champion = alias_version(client, cfg.model_name, CHAMPION)
    if champion is None:
        raise BadInputError(f"rollback: {cfg.model_name} has no champion")
    previous = champion.tags.get("promoted_from", "none")
    if previous in ("", "none"):
        raise BadInputError(f"rollback: champion v{champion.version} has no previous champion")
    ts = now()
    client.set_registered_model_alias(cfg.model_name, CHAMPION, previous)
    client.set_model_version_tag(cfg.model_name, champion.version, "rolled_back_at", ts)
    client.set_model_version_tag(cfg.model_name, previous, "restored_at", ts)
    client.delete_model_version_tag(cfg.model_name, previous, "superseded_by")
    record = append_audit(cfg.audit_path(), {"ts": ts, "action": "rolled_back", "model": cfg.model_name,
                                             "version": previous, "previous_version": champion.version,
                                             "actor": cfg.actor})
    return {"action": "rolled_back", "version": previous, "previous_version": record["previous_version"]}


def status(cfg: PromotionConfig, client=None) -> dict:
    """Who is champion and challenger, and the challenger's approval state."""
    import mlflow

    client = client or mlflow.MlflowClient()
    out = {}
    for alias in (CHAMPION, CHALLENGER):
        v = alias_version(client, cfg.model_name, alias)
        out[alias] = None if v is None else {"version": v.version, "approval": v.tags.get("approval"),
                                             "approved_by": v.tags.get("approved_by"), "gate": v.tags.get("gate")}
    return out


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops registry {promote,rollback,status}``."""
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("action", choices=["promote", "rollback", "status"])
    parser.add_argument("--model-name", help="registered model (default fracture-classifier)")
    parser.add_argument("--approvers", help="comma-separated user names allowed to approve "
                        "(default $FRACTURE_OPS_APPROVERS)")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run a registry action from parsed CLI arguments."""
    from fracture_ops import tracking
    from fracture_ops.cli_common import config_from_args

    approvers = [a.strip() for a in args.approvers.split(",")] if args.approvers else None
    cfg = config_from_args(PromotionConfig, args, model_name=args.model_name, approvers=approvers)
    tracking.setup("fracture-classifier")
    return {"promote": promote_if_approved, "rollback": rollback, "status": status}[args.action](cfg)
