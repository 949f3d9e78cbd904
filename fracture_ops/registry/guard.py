"""The MLflow server guard's rules: every write endpoint MLflow serves, who may call it, and how.

Deny by default. :data:`RULES` names every mutating endpoint (method x path, the ``/api`` and
``/ajax-api`` forms and API versions alike) that the fracture-ops app admits, and
:data:`REFUSED` every one it refuses outright; a write to any endpoint in neither table is
refused too, and ``tests/test_registry_attacks.py`` reads MLflow's own route list so that an
endpoint a new MLflow adds fails the suite until someone classifies it here.
``fracture-ops registry guard-rules`` prints the table.

Requests are read the one way MLflow's handler reads them, and ambiguity is refused before any
rule runs (:func:`strict_fields`): a non-GET request carries its parameters in a JSON object
body only (no query string, which MLflow ignores and an earlier guard read), the body must be a
JSON object (not a string holding JSON, which MLflow decodes a second time), with no duplicate
keys (the last would win in MLflow) and only the request message's own field names (no
camelCase aliases, no unknown fields).

Roles come from the server's environment, one comma-separated list each, and must not overlap
(:func:`roles`, checked when the app starts):

- ``FRACTURE_OPS_APPROVERS``: people who may set ``approval=approved``;
- ``FRACTURE_OPS_PIPELINE_USERS``: the pipeline (may also set ``challenger``);
- ``FRACTURE_OPS_GATE_USERS``: the gate step, the only writer of gate evidence (``gate/`` in a
  registered version's run); the server records the evidence's SHA-256 and writer;
- ``FRACTURE_OPS_PROMOTERS``: the promotion step, the only mover of ``champion`` and writer of
  the audit anchor.

Research and education only; not for clinical use.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from fracture_ops.registry.client import (
    CHALLENGER,
    CHAMPION,
    GATE_EVIDENCE,
    TAG_APPROVAL,
    TAG_APPROVED_AT,
    TAG_AUDIT_HEAD,
    TAG_EVIDENCE_BY,
    TAG_EVIDENCE_SHA,
    TAG_GATE,
    TAG_GATE_CHAMPION,
    TAG_GATE_EVIDENCE,
    TAG_GATE_REASONS,
    TAG_GATE_TEST_SET,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_FROM,
    TAG_RESTORED_AT,
    TAG_RETIRED_AT,
    TAG_ROLLED_BACK,
    TAG_SIGNATURE,
    TAG_SUPERSEDED_BY,
    TAG_VERIFIED_BY,
)
from fracture_ops import envvars

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
# version tags only the server writes (an approval's stamp and signature, gate evidence digest)
SERVER_ONLY_TAGS = (TAG_VERIFIED_BY, TAG_APPROVED_AT, TAG_SIGNATURE, TAG_EVIDENCE_SHA,
                    TAG_EVIDENCE_BY)
# version tags the gate writes, and those the promotion step writes
GATE_TAGS = (TAG_GATE, TAG_GATE_CHAMPION, TAG_GATE_REASONS, TAG_GATE_TEST_SET, TAG_GATE_EVIDENCE)
PROMOTER_TAGS = (TAG_ROLLED_BACK, TAG_PROMOTED_AT, TAG_PROMOTED_FROM, TAG_RETIRED_AT,
                 TAG_SUPERSEDED_BY, TAG_RESTORED_AT)
# keys whose look-alikes (case, surrounding blanks) are refused: in the UI they would pass for these
PROTECTED_KEYS = (TAG_APPROVAL, *SERVER_ONLY_TAGS, TAG_AUDIT_HEAD, TAG_GATE, TAG_GATE_CHAMPION)
_SOURCE_RUN = (re.compile(r"^runs:/(?P<run>[0-9a-f]{32})(?:/.*)?$"),
               re.compile(r"^mlflow-artifacts:(?://[^/]+)?/[^/]+/(?P<run>[0-9a-f]{32})/artifacts(?:/.*)?$"))
_SOURCE_MODEL = (re.compile(r"^models:/(?P<model>m-[0-9a-f]{32})/?$"),
                 re.compile(r"^mlflow-artifacts:(?://[^/]+)?/[^/]+/models/(?P<model>m-[0-9a-f]{32})"
                            r"/artifacts(?:/.*)?$"))
ROLE_ENV = {"approvers": envvars.APPROVERS, "pipeline": envvars.PIPELINE_USERS,
            "gate": envvars.GATE_USERS, "promoters": envvars.PROMOTERS}
_API = re.compile(r"/(?:ajax-)?api/\d+\.\d+/?(?P<rest>.*)$")
RUN_ARTIFACT = re.compile(r"^[^/]+/(?P<run>[0-9a-f]{32})/artifacts/(?P<rest>.+)$")
_MODEL_ARTIFACT = re.compile(r"^[^/]+/models/(?P<model>m-[0-9a-f]{32})/artifacts/(?P<rest>.+)$")


class Refused(Exception):
    """A request the guard refuses (403), with the reason the caller sees."""


def names(var: str) -> set[str]:
    return {a.strip() for a in os.environ.get(var, "").split(",") if a.strip()}


@dataclass(frozen=True)
class Roles:
    approvers: frozenset[str]
    pipeline: frozenset[str]
    gate: frozenset[str]
    promoters: frozenset[str]

    @property
    def holders(self) -> frozenset[str]:
        """Every account that holds one of the roles."""
        return self.approvers | self.pipeline | self.gate | self.promoters


def roles(check_overlap: bool = True) -> Roles:
    """The server's role lists; overlapping lists are a configuration error (one identity that
    both trains and approves, or gates and promotes, defeats the separation of duties)."""
    found = {role: frozenset(names(var)) for role, var in ROLE_ENV.items()}
    if check_overlap:
        items = list(found.items())
        for i, (a, users_a) in enumerate(items):
            for b, users_b in items[i + 1:]:
                if users_a & users_b:
                    raise ValueError(f"{ROLE_ENV[a]} and {ROLE_ENV[b]} share "
                                     f"{sorted(users_a & users_b)}: each identity holds one role")
    return Roles(**found)


@dataclass
class Ctx:
    """One request as the rules see it."""

    method: str
    endpoint: str                 # normalised: "mlflow/model-versions/set-tag"
    fields: dict                  # the body's fields (strictly parsed)
    user: str | None
    roles: Roles
    path_args: dict               # Flask view args (artifact_path, ...)
    registry: object = None       # lookups the artifact rule needs (see approval_app)


ARTIFACT_PUT = ("PUT", "mlflow-artifacts/artifacts/<path:artifact_path>")


def normalise(rule_path: str) -> str:
    """``/ajax-api/2.0/mlflow/x`` -> ``mlflow/x``; other routes lose their leading slash
    (``/graphql`` -> ``graphql``, ``/v1/traces`` -> ``v1/traces``)."""
    m = _API.search(rule_path)
    return m.group("rest") if m else rule_path.lstrip("/")


def flask_syntax(path: str) -> str:
    """FastAPI's ``{name:path}`` / ``{name}`` as Flask's ``<path:name>`` / ``<name>``."""
    path = re.sub(r"\{(\w+):path\}", r"<path:\1>", path)
    return re.sub(r"\{(\w+)\}", r"<\1>", path)


def _dup_free(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise Refused(f"duplicate field {key!r} in the request body")
        out[key] = value
    return out


def strict_fields(method: str, query: dict, body: bytes, allowed: set[str] | None) -> dict:
    """The request's fields, exactly as MLflow's handler will read them, or :class:`Refused`."""
    if method == "GET":
        return dict(query)
    if query:
        raise Refused(f"query parameters on a {method} request ({sorted(query)}): parameters "
                      "go in the JSON body only")
    if not body.strip():
        return {}
    try:
        data = json.loads(body, object_pairs_hook=_dup_free)
    except Refused:
        raise
    except ValueError as exc:
        raise Refused(f"the request body is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise Refused("the request body must be a JSON object (a string holding JSON, or any "
                      "other value, is refused)")
    if allowed is not None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise Refused(f"unknown field(s) {unknown}: only {sorted(allowed)}")
    return data


def _tag_pairs(fields: dict) -> list[tuple[str, str]]:
    tags = fields.get("tags") or []
    if not isinstance(tags, list):
        raise Refused("tags must be a list")
    return [(str((t or {}).get("key", "")), str((t or {}).get("value", ""))) for t in tags]


def _plain_key(key: str) -> None:
    """Refuse look-alikes of protected tag keys ("Approval", "approval.verified_by ")."""
    folded = key.strip().lower()
    for protected in PROTECTED_KEYS:
        if folded == protected and key != protected:
            raise Refused(f"tag key {key!r} imitates the protected key {protected!r}")


def _need(ctx: Ctx, role: str, what: str) -> None:
    allowed = getattr(ctx.roles, role)
    if not ctx.user or ctx.user not in allowed:
        label = {"promoters": "promoter", "approvers": "approver"}.get(role, role)
        raise Refused(f"user {ctx.user!r} may not {what} ({label} identity only)")


# ---- the rules -------------------------------------------------------------------------------

def _version_tag(ctx: Ctx) -> None:
    key, value = str(ctx.fields.get("key", "")), str(ctx.fields.get("value", ""))
    _plain_key(key)
    if key in SERVER_ONLY_TAGS:
        raise Refused(f"the tag {key} is written by the server only")
    version = None
    if key in GATE_TAGS or key in PROMOTER_TAGS or key == TAG_APPROVAL:
        version = ctx.registry.version(str(ctx.fields.get("name", "")),
                                       str(ctx.fields.get("version", "")))
    if key in GATE_TAGS:
        # the gate's verdict is the gate's; the pipeline only marks a new version "pending"
        if ctx.user and ctx.user in ctx.roles.gate:
            return
        if (key == TAG_GATE and value == "pending" and ctx.endpoint.endswith("set-tag")
                and (version is None or not version.tags.get(TAG_EVIDENCE_SHA))):
            return  # registration marks a new version "pending" (blocks nothing it should not)
        raise Refused(f"user {ctx.user!r} may not write {key} (gate identity only)")
    if key in PROMOTER_TAGS:
        _need(ctx, "promoters", f"write {key}")
        return
    if key != TAG_APPROVAL or (ctx.user and ctx.user in ctx.roles.approvers):
        return
    # not an approver: only the registration's "pending", on a version with no decision yet
    if ctx.endpoint.endswith("set-tag") and value == "pending":
        if version is None or (not version.tags.get(TAG_VERIFIED_BY)
                               and version.tags.get(TAG_APPROVAL, "pending") == "pending"):
            return
        raise Refused(f"user {ctx.user!r} may not withdraw or undo a reviewer's decision "
                      "(approver identity only)")
    if value == "approved" and ctx.endpoint.endswith("set-tag"):
        raise Refused(f"user {ctx.user!r} is not on the approvers list")
    raise Refused(f"user {ctx.user!r} may not set or remove approval (approver identity only)")


def _version_create(ctx: Ctx) -> None:
    _source_is_the_run(ctx)
    for key, value in _tag_pairs(ctx.fields):
        _plain_key(key)
        if key in SERVER_ONLY_TAGS:
            raise Refused(f"the tag {key} is written by the server only")
        if key == TAG_APPROVAL and value != "pending":
            raise Refused("a new version starts with approval=pending: an approver approves it "
                          "afterwards (set-tag)")


def _source_is_the_run(ctx: Ctx) -> None:
    """A version's files must lie in its own run's artifacts, or in a logged model that run
    produced: the artifact freeze finds them there (an s3:// or foreign source it would not)."""
    source, run_id = str(ctx.fields.get("source", "")), str(ctx.fields.get("run_id", ""))
    if "%" in source or "/../" in source or source.endswith("/.."):
        raise Refused(f"model source {source!r} is not a plain URI")
    for pattern in _SOURCE_RUN:
        m = pattern.match(source)
        if m:
            if m.group("run") != run_id:
                raise Refused(f"model source {source!r} lies in another run than run_id {run_id!r}")
            return
    for pattern in _SOURCE_MODEL:
        m = pattern.match(source)
        if m:
            model_id = m.group("model")
            if ctx.fields.get("model_id") not in (None, "", model_id):
                raise Refused("model_id and source name different logged models")
            produced_by = ctx.registry.model_run(model_id)
            if not produced_by or run_id not in ("", produced_by):
                raise Refused(f"logged model {model_id} was not produced by "
                              f"{'run_id ' + repr(run_id) if run_id else 'any run'}")
            return
    raise Refused(f"model source {source!r}: only the version's own run (runs:/, "
                  "mlflow-artifacts:/<experiment>/<run>/artifacts/...) or a logged model of it")


def _alias(ctx: Ctx) -> None:
    # compared case-insensitively: some SQL collations (MySQL) match "Champion" to "champion"
    alias = str(ctx.fields.get("alias") or "").strip().lower()
    if alias == CHAMPION:
        _need(ctx, "promoters", "move the 'champion' alias")
    elif alias == CHALLENGER:
        if not ctx.user or ctx.user not in (ctx.roles.promoters | ctx.roles.pipeline):
            raise Refused(f"user {ctx.user!r} may not move the 'challenger' alias (promoter "
                          "identity only, or the pipeline)")


def _promoter_only(what: str) -> Callable[[Ctx], None]:
    def rule(ctx: Ctx) -> None:
        _need(ctx, "promoters", what)
    return rule


def _model_tag(ctx: Ctx) -> None:
    keys = [str(ctx.fields.get("key", ""))] + [k for k, _ in _tag_pairs(ctx.fields)]
    for key in keys:
        _plain_key(key)
        if key.strip().lower().startswith("mlflow."):
            # e.g. mlflow.prompt.is_prompt turns a registered model into a prompt (locks it)
            raise Refused(f"tag key {key!r}: keys under mlflow. are MLflow's own")
    if TAG_AUDIT_HEAD in keys:
        _need(ctx, "promoters", f"write the {TAG_AUDIT_HEAD} anchor")


def _artifact(ctx: Ctx) -> None:
    """Artifact writes through the proxy: only run and logged-model layouts; nothing under a
    registered version's run or model once it is approved; gate evidence by the gate only."""
    path = str(ctx.path_args.get("artifact_path", ""))
    parts = path.split("/")
    if "%" in path or "\\" in path or any(p in ("", ".", "..") for p in parts):
        # MLflow decodes artifact paths again after the server did: "gate%2Fgate.json" would
        # be judged as one name here and written as gate/gate.json there
        raise Refused(f"artifact path {path!r} is not a plain relative path")
    m_run, m_model = RUN_ARTIFACT.match(path), _MODEL_ARTIFACT.match(path)
    if not (m_run or m_model):
        raise Refused(f"artifact path {path!r} is neither a run's nor a logged model's artifacts")
    registry = ctx.registry
    # the path must be the artifact root of a run or logged model that exists (an experiment
    # with a made-up artifact location could otherwise name a run that is not there)
    if m_model and registry.model_root(m_model.group("model")) == path[:m_model.start("rest")]:
        run_id, rest, where = registry.model_run(m_model.group("model")), m_model.group("rest"), "model"
    elif m_run and registry.run_root(m_run.group("run")) == path[:m_run.start("rest")]:
        run_id, rest, where = m_run.group("run"), m_run.group("rest"), "run"
    else:
        raise Refused(f"artifact path {path!r} is not under the artifact root of an existing run "
                      "or logged model")
    versions = registry.versions_of_run(run_id) if run_id else []
    gate_dir = GATE_EVIDENCE.rsplit("/", 1)[0]  # the gate step's folder of the run's artifacts
    if where == "run" and (rest == gate_dir or rest.startswith(gate_dir + "/")):
        _need(ctx, "gate", "write gate evidence")
        if ctx.endpoint != "mlflow-artifacts/artifacts/<path:artifact_path>" or ctx.method != "PUT":
            raise Refused("gate evidence is written with one PUT (no multipart, no delete)")
        return
    if not versions:
        return
    # a registered version's files are what the gate scores and the approver signs: frozen from
    # registration on; only its model card is written after it (the register step)
    if where == "run" and rest.startswith("model_card/") and ctx.user in ctx.roles.pipeline \
            and ctx.method == "PUT":
        return
    v = versions[0]
    raise Refused(f"{v.name} v{v.version} is registered from this {where}: its artifacts are "
                  "frozen (register a new version instead)")


def _no_custom_location(ctx: Ctx) -> None:
    if ctx.fields.get("artifact_location"):
        raise Refused("experiments take the server's artifact location (a custom one could "
                      "alias another run's files)")


def _not_backing_a_version(ctx: Ctx) -> None:
    """A run or logged model a registered version was built from is not deleted through the
    API (its files are what the version serves; a deleted logged model hid them from checks)."""
    run_id = str(ctx.fields.get("run_id") or ctx.fields.get("run_uuid") or "")
    model_id = str(ctx.path_args.get("model_id", ""))
    if model_id:
        run_id = ctx.registry.model_run(model_id) or ""
    if run_id and ctx.registry.versions_of_run(run_id):
        raise Refused("a registered version was built from this run or model: it is not deleted")


def _role_account(ctx: Ctx) -> None:
    target = str(ctx.fields.get("username", ""))
    if target in ctx.roles.holders and not (ctx.endpoint.endswith("update-password") and target == ctx.user):
        raise Refused(f"account {target!r} holds a fracture-ops role: only its owner changes its "
                      "password, and nobody deletes it or changes its admin flag through the API")


def _grant(ctx: Ctx) -> None:
    target = str(ctx.fields.get("username", ""))
    if target in ctx.roles.holders and not ctx.registry.is_admin(ctx.user):
        raise Refused(f"account {target!r} holds a fracture-ops role: only an administrator "
                      "changes its permissions")


def _graphql(ctx: Ctx) -> None:
    query = str(ctx.fields.get("query", ""))
    if re.search(r"\bmutation\b", query):
        raise Refused("GraphQL mutations are refused (the API is read-only here)")


def _anyone(ctx: Ctx) -> None:
    return None


@dataclass(frozen=True)
class Rule:
    method: str
    endpoint: str
    kind: str            # registry | artifacts | tracking | read | accounts
    who: str             # who may call it, in words
    check: Callable[[Ctx], None]


def _r(kind: str, who: str, check: Callable[[Ctx], None], *specs: str) -> list[Rule]:
    out = []
    for spec in specs:
        method, endpoint = spec.split(" ", 1)
        out.append(Rule(method, endpoint, kind, who, check))
    return out


_EDIT = "anyone MLflow's permissions allow (EDIT)"
RULES: tuple[Rule, ...] = tuple(
    _r("registry", "EDIT; server-only tags refused; approval=approved by approvers only",
       _version_tag, "POST mlflow/model-versions/set-tag", "DELETE mlflow/model-versions/delete-tag")
    + _r("registry", "EDIT; tags may not carry approval or server-only tags", _version_create,
         "POST mlflow/model-versions/create")
    + _r("registry", _EDIT + " (description)", _anyone, "PATCH mlflow/model-versions/update",
         "PATCH mlflow/registered-models/update")
    + _r("registry", "champion: promoters; challenger: promoters or pipeline; others EDIT",
         _alias, "POST mlflow/registered-models/alias", "DELETE mlflow/registered-models/alias")
    + _r("registry", "promoters only", _promoter_only("delete a model version"),
         "DELETE mlflow/model-versions/delete")
    + _r("registry", "promoters only", _promoter_only("delete or rename a registered model"),
         "DELETE mlflow/registered-models/delete", "POST mlflow/registered-models/rename")
    + _r("registry", f"EDIT; {TAG_AUDIT_HEAD} by promoters only", _model_tag,
         "POST mlflow/registered-models/create", "POST mlflow/registered-models/set-tag",
         "DELETE mlflow/registered-models/delete-tag")
    + _r("artifacts", "EDIT; a registered version's run and logged model frozen (model_card/ by the "
         "pipeline, gate/ by the gate only)",
         _artifact, "PUT mlflow-artifacts/artifacts/<path:artifact_path>",
         "DELETE mlflow-artifacts/artifacts/<path:artifact_path>",
         "POST mlflow-artifacts/mpu/create/<path:artifact_path>",
         "POST mlflow-artifacts/mpu/complete/<path:artifact_path>",
         "POST mlflow-artifacts/mpu/abort/<path:artifact_path>")
    + _r("tracking", _EDIT + "; no custom artifact location", _no_custom_location,
         "POST mlflow/experiments/create")
    + _r("tracking", _EDIT + "; not a run or logged model a registered version was built from",
         _not_backing_a_version, "POST mlflow/runs/delete", "DELETE mlflow/logged-models/<model_id>")
    + _r("tracking", _EDIT, _anyone, *(f"POST mlflow/{p}" for p in (
        "experiments/delete", "experiments/restore", "experiments/update",
        "experiments/set-experiment-tag", "experiments/delete-experiment-tag",
        "runs/create", "runs/update", "runs/restore", "runs/log-batch",
        "runs/log-inputs", "runs/log-metric", "runs/log-model", "runs/log-parameter",
        "runs/outputs", "runs/set-tag", "runs/delete-tag", "logged-models",
        "logged-models/<model_id>/params")),
        "PATCH mlflow/logged-models/<model_id>",
        "PATCH mlflow/logged-models/<model_id>/tags",
        "DELETE mlflow/logged-models/<model_id>/tags/<tag_key>")
    + _r("read", "anyone MLflow's permissions allow (READ); a search sent as POST", _anyone,
         *(f"POST mlflow/{p}" for p in (
             "experiments/search", "runs/search", "logged-models/search",
             "registered-models/get-latest-versions", "experiments/search-datasets",
             "datasets/search", "traces/search", "traces/batchGetInfos", "traces/metrics",
             "traces/calculate-filter-correlation", "artifacts/presigned-download-url")))
    + _r("read", "read-only GraphQL (mutations refused)", _graphql, "POST graphql")
    + _r("accounts", "administrators (MLflow's basic-auth checks)", _anyone,
         "POST mlflow/users/create", "POST mlflow/users/create-ui")
    + _r("accounts", "MANAGE holders (MLflow's check); on a role account administrators only",
         _grant, "POST mlflow/users/permissions/grant", "POST mlflow/users/permissions/revoke")
    + _r("accounts", "administrators, never on a role account (an admin who could reset or "
         "recreate an approver's account could approve as them); a password by its owner",
         _role_account, "DELETE mlflow/users/delete", "PATCH mlflow/users/update-admin",
         "PATCH mlflow/users/update-password")
    + _r("accounts", "administrators (MLflow's basic-auth admits admins only): the receiver's "
         "registration; a webhook only triggers a promotion pass, it decides nothing",
         _anyone, "POST mlflow/webhooks",
         "PATCH mlflow/webhooks/<webhook_id>", "DELETE mlflow/webhooks/<webhook_id>",
         "POST mlflow/webhooks/<webhook_id>/test")
)

# refused outright: features this platform does not use, and ways around the proxy or the stamp
REFUSED: dict[str, str] = {spec: why for why, specs in {
    "stages are deprecated; a stage could name a 'Production' model outside the champion alias":
        ("POST mlflow/model-versions/transition-stage",),
    "presigned or direct uploads bypass the artifact guard":
        ("POST mlflow/artifacts/presigned-upload-url", "POST mlflow/upload-artifact"),
    "not used by this platform (GenAI tracing, datasets, scorers, reviews, issues, jobs)": tuple(
        f"{m} mlflow/{p}" for m, p in (
            ("POST", "traces"), ("PATCH", "traces/<request_id>"),
            ("DELETE", "traces/<request_id>/tags"), ("PATCH", "traces/<request_id>/tags"),
            ("POST", "traces/delete-traces"), ("POST", "traces/link-prompts"),
            ("POST", "traces/link-to-run"), ("POST", "traces/<trace_id>/assessments"),
            ("DELETE", "traces/<trace_id>/assessments/<assessment_id>"),
            ("PATCH", "traces/<trace_id>/assessments/<assessment_id>"),
            ("DELETE", "traces/<trace_id>/tags"), ("PATCH", "traces/<trace_id>/tags"),
            ("POST", "datasets/create"), ("DELETE", "datasets/<dataset_id>"),
            ("POST", "datasets/<dataset_id>/add-experiments"),
            ("POST", "datasets/<dataset_id>/remove-experiments"),
            ("POST", "datasets/<dataset_id>/records"), ("DELETE", "datasets/<dataset_id>/records"),
            ("PATCH", "datasets/<dataset_id>/tags"), ("DELETE", "datasets/<dataset_id>/tags/<key>"),
            ("POST", "scorers/register"), ("DELETE", "scorers/delete"),
            ("PUT", "scorers/online-config"), ("POST", "scorer/invoke"),
            ("POST", "genai/evaluate/invoke"), ("POST", "issues"), ("PATCH", "issues/<issue_id>"),
            ("POST", "issues/invoke"), ("POST", "issues/search"),
            ("POST", "label-schemas/create"), ("DELETE", "label-schemas/delete"),
            ("PATCH", "label-schemas/update"), ("POST", "review-queues/create"),
            ("POST", "review-queues/delete"), ("POST", "review-queues/get-or-create-user"),
            ("POST", "review-queues/items/add"), ("POST", "review-queues/items/remove"),
            ("POST", "review-queues/items/set-status"), ("POST", "review-queues/update"),
            ("POST", "prompt-optimization/jobs"), ("DELETE", "prompt-optimization/jobs/<job_id>"),
            ("POST", "prompt-optimization/jobs/<job_id>/cancel"),
            ("POST", "prompt-optimization/jobs/search"), ("PATCH", "jobs/cancel/<job_id>"),
            ("POST", "runs/create-promptlab-run"), ("POST", "demo/generate"),
            ("POST", "demo/delete"), ("POST", "ui-telemetry"))),
    "the AI gateway is not part of this platform": tuple(
        f"{m} mlflow/gateway/{p}" for m, p in (
            ("POST", "budgets/create"), ("DELETE", "budgets/delete"), ("POST", "budgets/update"),
            ("POST", "endpoints/bindings/create"), ("DELETE", "endpoints/bindings/delete"),
            ("POST", "endpoints/create"), ("DELETE", "endpoints/delete"),
            ("DELETE", "endpoints/delete-tag"), ("POST", "endpoints/models/attach"),
            ("POST", "endpoints/models/detach"), ("POST", "endpoints/set-tag"),
            ("POST", "endpoints/update"), ("POST", "guardrails/add-to-endpoint"),
            ("POST", "guardrails/create"), ("DELETE", "guardrails/delete"),
            ("DELETE", "guardrails/remove-from-endpoint"), ("PATCH", "guardrails/update-config"),
            ("POST", "model-definitions/create"), ("DELETE", "model-definitions/delete"),
            ("POST", "model-definitions/update"), ("POST", "secrets/create"),
            ("DELETE", "secrets/delete"), ("POST", "secrets/update"))) + (
        "POST mlflow/gateway-proxy",),
    "roles and workspaces are managed by deployment configuration, not through the API": tuple(
        f"{m} mlflow/{p}" for m, p in (
            ("POST", "roles/assign"), ("POST", "roles/create"), ("DELETE", "roles/delete"),
            ("POST", "roles/permissions/add"), ("DELETE", "roles/permissions/remove"),
            ("PATCH", "roles/permissions/update"), ("DELETE", "roles/unassign"),
            ("PATCH", "roles/update"), ("POST", "workspaces"),
            ("DELETE", "workspaces/<workspace_name>"), ("PATCH", "workspaces/<workspace_name>"))),
}.items() for spec in specs}

# whole families MLflow serves that this platform does not use (mostly FastAPI-native routes):
# any write under them is refused
REFUSED_FAMILIES: dict[str, str] = {
    "gateway/": "the AI gateway is not part of this platform",
    "mlflow/gateway/": "the AI gateway is not part of this platform",
    "mlflow/assistant/": "the MLflow assistant is not part of this platform",
    "mlflow/mcp-servers": "MCP server registry is not part of this platform",
    "jobs/": "server-side jobs are disabled (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false)",
    "v1/traces": "OpenTelemetry trace ingestion is not used by this platform",
}

_BY_KEY = {(r.method, r.endpoint): r for r in RULES}


def _family(endpoint: str) -> str | None:
    return next((why for prefix, why in REFUSED_FAMILIES.items() if endpoint.startswith(prefix)),
                None)


def rule_for(method: str, endpoint: str) -> Rule:
    """The rule that admits a write, or :class:`Refused` (refused table, or unknown)."""
    rule = _BY_KEY.get((method, endpoint))
    if rule is not None:
        return rule
    why = REFUSED.get(f"{method} {endpoint}") or _family(endpoint)
    raise Refused(f"{method} {endpoint} is refused: {why}" if why else
                  f"{method} {endpoint} is not in the guard's table (deny by default)")


def classified(method: str, endpoint: str) -> bool:
    return ((method, endpoint) in _BY_KEY or f"{method} {endpoint}" in REFUSED
            or _family(endpoint) is not None)


def rules_table() -> str:
    """The table ``fracture-ops registry guard-rules`` prints."""
    rows = [("METHOD", "ENDPOINT", "KIND", "WHO MAY CALL IT")]
    rows += [(r.method, r.endpoint, r.kind, r.who) for r in RULES]
    rows += [(spec.split(" ", 1)[0], spec.split(" ", 1)[1], "refused", why)
             for spec, why in sorted(REFUSED.items(), key=lambda kv: kv[0].split(" ", 1)[::-1])]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3] for row in rows]
    lines += [f"{'*':<{widths[0]}}  {(prefix + '*'):<{widths[1]}}  {'refused':<{widths[2]}}  {why}"
              for prefix, why in REFUSED_FAMILIES.items()]
    lines.append("any other write: refused (deny by default); /api/ and /ajax-api/ forms and API "
                 "versions alike; GET requests are reads (MLflow's permissions apply)")
    return "\n".join(lines)
