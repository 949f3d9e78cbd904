"""Promotion that a person approves, rollback, and the audit log.

How a person approves (in the MLflow UI, on the model version page, "Tags"):

- ``approval`` = ``approved`` (to reject: ``rejected``).

With the MLflow server's fracture-ops app (:mod:`fracture_ops.registry.approval_app`) only users on
the server's approvers list can approve, and the server stamps their name into
``approval.verified_by``; with a local store (no server, no authentication) the typed
``approved_by`` tag names the approver. The promotion step then moves the ``champion`` alias to
the ``challenger`` version only when all of these hold: ``approval=approved``, the approver is on
the configured approvers list, ``gate=passed`` for the current champion, and the gate's evidence
confirms it (the tag alone is not trusted). Anything else is never promoted, whatever other tags say; a
refusal is written to the audit log once per version and reason. The previous champion is tagged
(``retired_at``, ``superseded_by``), the new one records ``promoted_from`` (for people to read),
and each promotion or rollback writes its own record to the append-only audit
(:mod:`fracture_ops.registry.audit`). Re-running changes nothing once the champion is in place
(idempotent).

Against people who hold EDIT on the model: the gate's evidence is read from the version's own
run and checked against the registry's state (never from a tag); the champion alias is compared
with the audit on every pass, and a hand-set champion is reverted (or, with
``on_champion_drift=freeze``, every promotion is refused until a person adopts or restores it),
either way audited; rollback targets and rolled-back state come from the audit, not from tags;
a registry that cannot be read fails the task instead of reading as "no champion".
"""

from __future__ import annotations

import argparse
import logging
import os
import urllib.parse
from datetime import datetime, UTC
from typing import ClassVar, Literal

from pydantic import Field

from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.errors import BadInputError
from fracture_ops.registry import audit as audit_store
from fracture_ops.registry.client import (
    CHALLENGER,
    CHAMPION,
    CLASSIFIER,
    TAG_APPROVAL,
    TAG_APPROVED_BY,
    TAG_AUDIT_HEAD,
    TAG_GATE,
    TAG_GATE_CHAMPION,
    TAG_ROLLED_BACK,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_FROM,
    TAG_RESTORED_AT,
    TAG_RETIRED_AT,
    TAG_SUPERSEDED_BY,
    TAG_VERIFIED_BY as STAMP,
    alias_version,
    gate_evidence_uri,
)
from fracture_ops import envvars

log = logging.getLogger(__name__)


class PromotionConfig(StepConfig):
    """Config of ``fracture-ops registry promote|rollback|status``."""

    section: ClassVar[str] = "promotion"
    model_name: str = CLASSIFIER
    approvers: list[str] = Field(default_factory=lambda: [
        a.strip() for a in os.environ.get(envvars.APPROVERS, "").split(",") if a.strip()])
    # deployment config, not a trigger param: $FRACTURE_OPS_AUDIT_URI (a folder or s3:// prefix
    # only the promoter writes); embedded default <artifact_root>/registry/audit
    audit_uri: str = Field(default_factory=lambda: os.environ.get(audit_store.AUDIT_ENV, ""))
    on_champion_drift: Literal["revert", "freeze"] = "revert"
    actor: str = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_USERNAME", "fracture-ops"))
    # the reference test set pinned for the model: evidence on another test set is refused
    reference_test_hash: str = Field(default_factory=lambda: os.environ.get(
        envvars.REFERENCE_TEST_HASH, ""))
    # None: required when the tracking server is remote (http/https), not for a local store
    require_server_stamp: bool | None = None
    # the gate identity (its server-recorded evidence digest is checked when the server stamps)
    gate_users: list[str] = Field(default_factory=lambda: [
        a.strip() for a in os.environ.get(envvars.GATE_USERS, "").split(",") if a.strip()])
    # the approval server's public key: approvals are verified against the model's bytes
    approval_pubkey: str = Field(default_factory=lambda: os.environ.get(
        envvars.APPROVAL_PUBKEY, ""))
    min_test_size: int = Field(default_factory=lambda: int(os.environ.get(
        envvars.MIN_TEST_SIZE, "10")), ge=1,
        description="fewest test images a gate may decide on (set it far higher for real use)")

    def stamp_required(self) -> bool:
        if self.require_server_stamp is not None:
            return self.require_server_stamp
        import mlflow

        return mlflow.get_tracking_uri().startswith(("http://", "https://"))

    def audit_path(self) -> str:
        return self.audit_uri or storage.join(self.artifact_root, "registry", "audit")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_audit(uri: str) -> list[dict]:
    """The audit chain's records in order (up to the first break, if any)."""
    return audit_store.read(uri).records


def _anchor(client, model: str) -> str | None:
    """The model's anchored audit head (the registered model's ``audit.head`` tag)."""
    try:
        return client.get_registered_model(model).tags.get(TAG_AUDIT_HEAD) or None
    except Exception as exc:  # noqa: BLE001 - no such model yet: nothing anchored
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or \
                "not found" in str(exc).lower():
            return None
        raise


def verified_audit(cfg: PromotionConfig, client) -> list[dict]:
    """The audit's records after checking the chain and this model's anchored head.

    Raises:
        AuditBroken: an edited, deleted, reordered, inserted or unanchored record: promotion
            and rollback are frozen until a person investigates (nothing is repaired here).
    """
    chain = audit_store.read(cfg.audit_path())
    problem = chain.problems[0] if chain.problems else audit_store.anchor_problem(
        chain, cfg.model_name, _anchor(client, cfg.model_name))
    if problem:
        raise audit_store.AuditBroken(
            f"promotion frozen: the audit at {cfg.audit_path()} does not verify: {problem}. "
            "Investigate with `fracture-ops registry verify-audit`; restore the store from its "
            "versioned history (nothing repairs it automatically)")
    return chain.records


def append_audit(uri: str, record: dict, client=None, model: str | None = None) -> dict:
    """Append one record to the chain; with a client, anchor it as the model's newest record."""
    rec = audit_store.append(uri, record)
    if client is not None and model:
        client.set_registered_model_tag(model, TAG_AUDIT_HEAD, audit_store.head_of(rec))
    return rec


def decide(version_tags: dict[str, str], approvers: list[str],
           champion_version: str | None = None, rolled_back: bool = False,
           require_stamp: bool = False) -> tuple[bool, str]:
    """Whether a challenger may be promoted, and why not (pure).

    The gate verdict must be about today's champion: a version gated against an earlier
    champion (since replaced or rolled back) has to be gated again.
    """
    approval = version_tags.get(TAG_APPROVAL, "pending")
    # a remote server running the fracture-ops app proves who approved (its stamp); a typed
    # approved_by is accepted only from a local store, where there is no authentication at all
    who = version_tags.get(STAMP, "") if require_stamp else version_tags.get(TAG_APPROVED_BY, "")
    if approval == "rejected":
        return False, "rejected by reviewer"
    if rolled_back or version_tags.get(TAG_ROLLED_BACK):
        return False, "rolled back; a new version must be approved"
    if approval != "approved":
        return False, "awaiting approval"
    if not who:
        return False, ("approval carries no server stamp (run the MLflow server with "
                       "--app-name fracture-ops)" if require_stamp else
                       "approval names no approver (approved_by tag missing)")
    if who not in approvers:
        return False, f"approver {who!r} is not on the approvers list"
    if version_tags.get(TAG_GATE) != "passed":
        return False, f"gate verdict is {version_tags.get('gate', 'missing')!r}, not 'passed'"
    gated_against = version_tags.get(TAG_GATE_CHAMPION, "")
    if gated_against != (champion_version or "none"):
        return False, (f"gate compared against champion {gated_against or '?'}, but the champion is "
                       f"{champion_version or 'none'}: run the gate again")
    return True, "approved and gate passed"


def evidence_uri(version) -> str:
    """Where the gate's evidence of a version lives: its own training run's artifacts (written
    by the pipeline identity), never a location a tag names."""
    return gate_evidence_uri(version.run_id)


def verify_gate_evidence(cfg: PromotionConfig, version, champion_version: str | None,
                         server_recorded: bool = False) -> str | None:
    """Re-read the gate's evidence from the version's run and check it against the registry.

    The evidence must show this model and version passing, gated against today's champion, on
    a test set of at least ``min_test_size`` images and, where one is pinned, on the reference
    test set. Tags (``gate``, ``gate.evidence``, ``gate.champion_version``) are not trusted.

    Returns:
        None when the evidence holds, else the reason.
    """
    import hashlib
    import json
    import tempfile

    import mlflow

    from fracture_ops.registry.client import TAG_EVIDENCE_BY, TAG_EVIDENCE_SHA

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=evidence_uri(version),
                                                       dst_path=tmp)
            with open(path, "rb") as fh:
                raw = fh.read()
        evidence = json.loads(raw)
        if not isinstance(evidence, dict):
            raise ValueError("not an object")
    except Exception as exc:  # missing artifact, unreadable store: refuse rather than promote
        return f"gate evidence unreadable ({type(exc).__name__})"
    if server_recorded:
        # the server recorded the digest and writer when the gate identity wrote the evidence:
        # a file written later, or by anyone else, is not evidence
        if version.tags.get(TAG_EVIDENCE_BY, "") not in cfg.gate_users:
            return (f"gate evidence was written by {version.tags.get(TAG_EVIDENCE_BY) or 'nobody the server recorded'}"
                    ", not by a gate identity")
        if hashlib.sha256(raw).hexdigest() != version.tags.get(TAG_EVIDENCE_SHA):
            return "gate evidence changed since the gate wrote it (digest differs from the server's record)"
    challenger = str(evidence.get("challenger_version",
                                  (evidence.get("challenger") or {}).get("version")))
    if evidence.get("passed") is not True or challenger != str(version.version):
        return "gate evidence does not show this version passing"
    if evidence.get("model") != cfg.model_name:
        return f"gate evidence is about model {evidence.get('model')!r}"
    gated_against = str(evidence.get("champion_version", "?"))
    if gated_against != (champion_version or "none"):
        return (f"gate evidence compared against champion {gated_against}, but the champion is "
                f"{champion_version or 'none'}: run the gate again")
    if int(evidence.get("n_test") or 0) < cfg.min_test_size:
        return f"gate evidence rests on {evidence.get('n_test')} test images (< {cfg.min_test_size})"
    if cfg.reference_test_hash and evidence.get("test_set_hash") != cfg.reference_test_hash:
        return "gate evidence is on another test set than the pinned reference"
    return None


def check_champion(cfg: PromotionConfig, client, champion, records: list[dict]) -> str | None:
    """Compare the ``champion`` alias with the audit; returns a refusal reason while frozen.

    - alias == audited champion: fine;
    - alias == a pending ``promoting`` intent: a promotion interrupted after the alias moved;
      its ``promoted`` record is written now;
    - anything else was set by hand: reverted to the audited champion (alias removed when the
      audit has none) and audited, or with ``on_champion_drift=freeze`` audited once and every
      promotion refused until a person restores the alias or adopts it (``registry adopt``).
    """
    audited, pending = audit_store.audited_champion(records, cfg.model_name)
    found = str(champion.version) if champion is not None else None
    if found == audited:
        return None
    if pending is not None and found == str(pending.get("version")):
        append_audit(cfg.audit_path(), {k: pending.get(k) for k in (
            "model", "version", "previous_version", "approved_by", "evidence")}
            | {"action": "promoted", "actor": cfg.actor, "repaired": True}, client, cfg.model_name)
        return None
    if cfg.on_champion_drift == "freeze":
        reason = (f"champion alias is v{found or 'none'} but the audit says v{audited or 'none'}: "
                  "promotions frozen until a person restores or adopts it")
        if not _already_recorded(records, found or "none", reason, "frozen"):
            append_audit(cfg.audit_path(), {"action": "frozen", "model": cfg.model_name,
                                            "version": found or "none", "reason": reason,
                                            "audited_champion": audited, "actor": cfg.actor},
                         client, cfg.model_name)
        return reason
    if audited is None:
        client.delete_registered_model_alias(cfg.model_name, CHAMPION)
    else:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, audited)
    append_audit(cfg.audit_path(), {"action": "champion_reverted", "model": cfg.model_name,
                                    "version": audited, "found_version": found,
                                    "actor": cfg.actor}, client, cfg.model_name)
    log.warning("champion alias was set by hand to v%s; reverted to the audited v%s", found, audited)
    return None


def _notify_waiting(cfg: PromotionConfig, audit: str, records: list[dict], challenger,
                    client=None) -> None:
    """Tell reviewers once per version that a challenger waits (audited as ``notified``); a
    failed notification is logged and retried on the next pass, never fatal."""
    import mlflow

    from fracture_ops.registry import notify

    url = notify.notify_url()
    version = str(challenger.version)
    if not url or any(r.get("action") == "notified" and r.get("model") == cfg.model_name
                      and str(r.get("version")) == version for r in records):
        return
    links = notify.ui_links(mlflow.get_tracking_uri(), cfg.model_name, version, challenger.run_id)
    message = notify.waiting_message(cfg.model_name, version, challenger.tags.get(TAG_GATE, "missing"),
                                     links)
    try:
        notify.send(url, message)
    except OSError as exc:
        log.warning("could not notify reviewers about v%s: %s", version, exc)
        return
    append_audit(audit, {"action": "notified", "model": cfg.model_name, "version": version,
                         "to": urllib.parse.urlsplit(url).hostname or "", "actor": cfg.actor},
                 client, cfg.model_name)


def promote_if_approved(cfg: PromotionConfig, client=None) -> dict:
    """One promotion pass: check the champion against the audit, then promote the approved,
    gate-passed challenger, or record why not."""
    import mlflow

    client = client or mlflow.MlflowClient()
    audit = cfg.audit_path()
    records = verified_audit(cfg, client)
    champion = alias_version(client, cfg.model_name, CHAMPION)
    frozen = check_champion(cfg, client, champion, records)
    if frozen:
        return {"action": "none", "reason": frozen}
    records = verified_audit(cfg, client)
    champion_version, _ = audit_store.audited_champion(records, cfg.model_name)
    if cfg.stamp_required():
        _verify_champion(cfg, client, champion_version, records, audit)
    challenger = alias_version(client, cfg.model_name, CHALLENGER)
    if challenger is None:
        return {"action": "none", "reason": "no challenger"}
    version = str(challenger.version)  # MLflow returns int or str depending on the store
    if champion_version == version:
        return {"action": "none", "reason": f"version {version} is already champion"}
    rolled_back = version in audit_store.rolled_back_versions(records, cfg.model_name)
    stamped = cfg.stamp_required()
    approver = challenger.tags.get(STAMP if stamped else TAG_APPROVED_BY, "")
    ok, reason = decide(challenger.tags, cfg.approvers, champion_version, rolled_back, stamped)
    if ok:
        reason = verify_gate_evidence(cfg, challenger, champion_version, stamped) or reason
        ok = reason == "approved and gate passed"
    if ok and stamped:
        from fracture_ops.registry.signing import SignatureInvalid, verify_registered

        try:
            verify_registered(cfg.model_name, version, challenger.tags, cfg.approval_pubkey or None)
        except SignatureInvalid as exc:
            reason = f"approved bytes changed or approval forged: {exc}"
            if not _already_recorded(records, version, reason):
                append_audit(audit, {"action": "refused", "model": cfg.model_name,
                                     "version": version, "reason": reason,
                                     "approved_by": approver, "actor": cfg.actor},
                             client, cfg.model_name)
            raise SignatureInvalid(f"{cfg.model_name} v{version} not promoted: {reason}") from None
    if not ok:
        if reason == "awaiting approval":
            _notify_waiting(cfg, audit, records, challenger, client)
        if reason != "awaiting approval" and not _already_recorded(records, version, reason):
            append_audit(audit, {"action": "refused", "model": cfg.model_name,
                                 "version": version, "reason": reason,
                                 "approved_by": approver, "actor": cfg.actor},
                         client, cfg.model_name)
        return {"action": "none", "version": version, "reason": reason}
    previous = champion_version
    intent = {"model": cfg.model_name, "version": version, "previous_version": previous,
              "approved_by": approver, "evidence": evidence_uri(challenger)}
    # intent first, alias next, record last: a failure after the alias moved is completed on the
    # next pass from the intent (never from tags)
    append_audit(audit, {"action": "promoting", "actor": cfg.actor, **intent}, client, cfg.model_name)
    ts = now()
    client.set_model_version_tag(cfg.model_name, version, TAG_PROMOTED_AT, ts)
    client.set_model_version_tag(cfg.model_name, version, TAG_PROMOTED_FROM, previous or "none")
    client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    if previous is not None:
        client.set_model_version_tag(cfg.model_name, previous, TAG_RETIRED_AT, ts)
        client.set_model_version_tag(cfg.model_name, previous, TAG_SUPERSEDED_BY, version)
    record = append_audit(audit, {"action": "promoted", "actor": cfg.actor, **intent}, client,
                          cfg.model_name)
    return {"action": "promoted", **{k: record[k] for k in ("version", "previous_version", "approved_by")}}


def _verify_champion(cfg: PromotionConfig, client, champion_version: str | None,
                     records: list[dict], audit: str) -> None:
    """Every pass re-checks the serving champion's files against its approval signature: bytes
    swapped after promotion freeze promotion (audited, exit 3). A champion a person adopted
    without the server's approval carries no signature and is not checked."""
    from fracture_ops.registry.signing import SignatureInvalid, verify_registered

    if champion_version is None:
        return
    tags = client.get_model_version(cfg.model_name, champion_version).tags
    if not tags.get(STAMP):
        return
    try:
        verify_registered(cfg.model_name, champion_version, tags, cfg.approval_pubkey or None)
    except SignatureInvalid as exc:
        reason = f"champion's files changed since approval: {exc}"
        if not _already_recorded(records, champion_version, reason, "frozen"):
            append_audit(audit, {"action": "frozen", "model": cfg.model_name,
                                 "version": champion_version, "reason": reason,
                                 "actor": cfg.actor}, client, cfg.model_name)
        raise SignatureInvalid(f"{cfg.model_name} champion v{champion_version}: {reason}") from None


def _already_recorded(records: list[dict], version: str, reason: str, action: str = "refused") -> bool:
    return any(r.get("action") == action and str(r.get("version")) == str(version)
               and r.get("reason") == reason for r in records)


def rollback(cfg: PromotionConfig, client=None) -> dict:
    """Restore the champion before the current one, as the audit records it (tags such as
    ``promoted_from`` are not read), with an audit record; the rolled-back version cannot be
    promoted again (a new version must be approved).

    Raises:
        BadInputError: no audited champion, or no previous champion to return to, or the
            alias disagrees with the audit (run ``registry promote`` first to resolve it).
    """
    import mlflow

    client = client or mlflow.MlflowClient()
    records = verified_audit(cfg, client)
    current, _ = audit_store.audited_champion(records, cfg.model_name)
    if current is None:
        raise BadInputError(f"rollback: the audit records no champion of {cfg.model_name}")
    alias = alias_version(client, cfg.model_name, CHAMPION)
    if alias is None or str(alias.version) != current:
        raise BadInputError(f"rollback: the champion alias (v{alias.version if alias else 'none'}) "
                            f"disagrees with the audit (v{current}); run `registry promote` first")
    previous = audit_store.previous_champion(records, cfg.model_name, current)
    if previous is None:
        raise BadInputError(f"rollback: champion v{current} has no previous champion in the audit")
    ts = now()
    client.set_registered_model_alias(cfg.model_name, CHAMPION, previous)
    client.set_model_version_tag(cfg.model_name, current, TAG_ROLLED_BACK, ts)
    client.set_model_version_tag(cfg.model_name, previous, TAG_RESTORED_AT, ts)
    client.delete_model_version_tag(cfg.model_name, previous, TAG_SUPERSEDED_BY)
    record = append_audit(cfg.audit_path(), {"action": "rolled_back", "model": cfg.model_name,
                                             "version": previous, "previous_version": current,
                                             "actor": cfg.actor}, client, cfg.model_name)
    return {"action": "rolled_back", "version": previous, "previous_version": record["previous_version"]}


def adopt(cfg: PromotionConfig, client=None) -> dict:
    """A person accepts the champion alias as it stands (e.g. one set before this tool, or a
    frozen registry after review): the audit records it and the person who ran it."""
    import mlflow

    client = client or mlflow.MlflowClient()
    champion = alias_version(client, cfg.model_name, CHAMPION)
    version = str(champion.version) if champion is not None else None
    # a person's act may re-anchor the head (after investigating an anchor that lags, e.g. a
    # crash between a record and its anchor), but never extends a chain whose links are broken
    chain = audit_store.read(cfg.audit_path())
    unanchored = None if chain.problems else audit_store.anchor_problem(
        chain, cfg.model_name, _anchor(client, cfg.model_name))
    append_audit(cfg.audit_path(), {"action": "adopted", "model": cfg.model_name,
                                    "version": version, "actor": cfg.actor,
                                    **({"reanchored": unanchored} if unanchored else {})},
                 client, cfg.model_name)
    return {"action": "adopted", "version": version}


def status(cfg: PromotionConfig, client=None) -> dict:
    """Who is champion and challenger, and the challenger's approval state."""
    import mlflow

    client = client or mlflow.MlflowClient()
    out = {"audit": verify_audit(cfg, client, raise_on_problem=False)}
    for alias in (CHAMPION, CHALLENGER):
        v = alias_version(client, cfg.model_name, alias)
        out[alias] = None if v is None else {"version": v.version, "approval": v.tags.get(TAG_APPROVAL),
                                             "approved_by": v.tags.get(TAG_APPROVED_BY), "gate": v.tags.get(TAG_GATE)}
    return out


def verify_audit(cfg: PromotionConfig, client=None, raise_on_problem: bool = True) -> dict:
    """``registry verify-audit``: check the chain end to end and this model's anchored head.

    Raises:
        AuditBroken: (with ``raise_on_problem``) any problem, each listed in the message.
    """
    import mlflow

    client = client or mlflow.MlflowClient()
    chain = audit_store.read(cfg.audit_path())
    problems = list(chain.problems)
    if not problems:
        anchored = audit_store.anchor_problem(chain, cfg.model_name, _anchor(client, cfg.model_name))
        problems += [anchored] if anchored else []
    result = {"audit_uri": cfg.audit_path(), "records": len(chain.records), "head": chain.head,
              "ok": not problems, "problems": problems,
              "state": "verified" if not problems else "broken: promotion frozen"}
    if problems and raise_on_problem:
        raise audit_store.AuditBroken(f"the audit at {cfg.audit_path()} does not verify: "
                                      + "; ".join(problems))
    return result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops registry {promote,rollback,status,adopt}`` and
    ``fracture-ops registry webhooks {install,serve}``."""
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("action", choices=["promote", "rollback", "status", "adopt", "webhooks",
                                           "verify-audit", "guard-rules"],
                        help="adopt: a person accepts the current champion alias (audited); "
                        "verify-audit: check the audit's hash chain and anchored head end to end "
                        "(exit 3 when broken); guard-rules: print the MLflow server guard's table "
                        "of write endpoints and who may call them; "
                        "webhooks install|serve: register MLflow's registry webhook, or run the "
                        "receiver that turns its deliveries into Airflow asset events")
    parser.add_argument("webhooks_action", nargs="?", choices=["install", "serve"],
                        help="with 'webhooks': install (idempotent; secret from "
                        "$FRACTURE_OPS_WEBHOOK_SECRET) or serve (the receiver; Airflow API from "
                        "$AIRFLOW_API_URL and $AIRFLOW_API_TOKEN or _USERNAME/_PASSWORD)")
    parser.add_argument("--url", help="webhooks install: the receiver's URL MLflow posts to")
    parser.add_argument("--host", default="127.0.0.1", help="webhooks serve: bind address")
    parser.add_argument("--port", type=int, default=8090, help="webhooks serve: port (default 8090)")
    parser.add_argument("--model-name", help=f"registered model (default {CLASSIFIER})")
    parser.add_argument("--approvers", help="comma-separated user names allowed to approve "
                        "(default $FRACTURE_OPS_APPROVERS)")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run a registry action from parsed CLI arguments."""
    from fracture_ops import tracking
    from fracture_ops.cli_common import config_from_args
    from fracture_ops.errors import ConfigError

    approvers = [a.strip() for a in args.approvers.split(",")] if args.approvers else None
    cfg = config_from_args(PromotionConfig, args, model_name=args.model_name, approvers=approvers)
    if args.action == "webhooks":
        from fracture_ops.registry import webhooks

        if args.webhooks_action == "serve":
            webhooks.serve(args.host, args.port, {cfg.model_name})
            return {"action": "served"}
        if args.webhooks_action != "install" or not args.url:
            raise ConfigError("registry webhooks: use 'install --url URL' or 'serve'")
        tracking.setup(CLASSIFIER)
        return webhooks.install(args.url, os.environ.get(webhooks.SECRET_ENV, ""))
    if args.webhooks_action:
        raise ConfigError(f"registry {args.action} takes no {args.webhooks_action!r}")
    if args.action == "guard-rules":
        from fracture_ops.registry import guard

        print(guard.rules_table())
        return {"action": "guard-rules", "rules": len(guard.RULES)}
    tracking.setup(CLASSIFIER)
    return {"promote": promote_if_approved, "rollback": rollback, "status": status,
            "adopt": adopt, "verify-audit": verify_audit}[args.action](cfg)
