"""An MLflow server app that proves who approved a model version, and what they approved.

MLflow records no author for a tag, so an ``approved_by`` tag is only what someone typed. This
app wraps MLflow's basic-auth app (``mlflow server --app-name fracture-ops``, entry point
``mlflow.app``) and decides every write request from the explicit table in
:mod:`fracture_ops.registry.guard` (deny by default; ambiguous requests refused):

- ``approval = approved`` is accepted only from a user on the approvers list; the server then
  signs the version's model artifacts plus an approval statement with its own key
  (:mod:`fracture_ops.registry.signing`) and writes the stamp itself: :data:`STAMP` (the user),
  ``approval.at`` and ``approval.signature``; setting ``approval`` to anything else removes them;
- nobody may write those server-only tags through the API (403), admins included, at creation
  (``model-versions/create`` with tags) or later;
- ``champion`` moves only for promoters, ``challenger`` for promoters or the pipeline; only
  promoters delete or rename models and versions or write the audit anchor;
- once a version is registered, its run's and model's artifacts are frozen (only its model
  card is written after it, by the pipeline); gate evidence (``gate/`` in the run) is written
  by the gate identity only, and the server records its SHA-256 and writer on the version
  (``gate.evidence.sha256``, ``gate.evidence.by``).

Role lists that overlap stop the server at start. Promotion trusts only the stamp, the
signature and the recorded evidence digest when the tracking server is remote. Research and
education only; not for clinical use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime

from fracture_ops.registry import guard
from fracture_ops.registry.client import (
    GATE_EVIDENCE,
    TAG_APPROVED_AT,
    TAG_EVIDENCE_BY,
    TAG_EVIDENCE_SHA,
    TAG_SIGNATURE,
)
from fracture_ops.registry.client import TAG_APPROVAL as APPROVAL
from fracture_ops.registry.client import TAG_VERIFIED_BY as STAMP

log = logging.getLogger(__name__)
_PROTO_FIELDS: dict[tuple[str, str], set[str]] | None = None


def proto_fields() -> dict[tuple[str, str], set[str]]:
    """(method, endpoint) -> the field names of MLflow's request message for it."""
    global _PROTO_FIELDS
    if _PROTO_FIELDS is None:
        from mlflow.server import handlers

        out = {}
        for path, cls, methods in handlers.get_endpoints(get_handler=lambda cls: cls):
            descriptor = getattr(cls, "DESCRIPTOR", None)
            endpoint = guard.normalise(path)
            if descriptor is None or endpoint is None:
                continue
            for method in methods:
                out[(method, endpoint)] = {f.name for f in descriptor.fields}
        _PROTO_FIELDS = out
    return _PROTO_FIELDS


def _refuse(message: str):
    from flask import Response

    return Response(json.dumps({"error_code": "PERMISSION_DENIED", "message": message}),
                    status=403, mimetype="application/json")


class _Registry:
    """The lookups the artifact rule needs, against the server's own stores."""

    def versions_of_run(self, run_id: str) -> list:
        from mlflow.server.handlers import _get_model_registry_store

        return list(_get_model_registry_store().search_model_versions(f"run_id = '{run_id}'"))

    def version(self, name: str, version: str):
        from mlflow.server.handlers import _get_model_registry_store

        try:
            return _get_model_registry_store().get_model_version(name, version)
        except Exception:  # noqa: BLE001 - no such version
            return None

    def model_run(self, model_id: str) -> str | None:
        model = self._logged_model(model_id)
        return None if model is None else model.source_run_id

    def _logged_model(self, model_id: str):
        from mlflow.server.handlers import _get_tracking_store

        try:  # deleted ones too: a deleted logged model's files still serve its versions
            return _get_tracking_store().get_logged_model(model_id, allow_deleted=True)
        except Exception:  # noqa: BLE001 - unknown model
            return None

    def model_root(self, model_id: str) -> str | None:
        model = self._logged_model(model_id)
        return None if model is None else _proxied_root(model.artifact_location)

    def run_root(self, run_id: str) -> str | None:
        from mlflow.server.handlers import _get_tracking_store

        try:
            return _proxied_root(_get_tracking_store().get_run(run_id).info.artifact_uri)
        except Exception:  # noqa: BLE001 - no such run
            return None

    def is_admin(self, user: str | None) -> bool:
        from mlflow.server.auth import store

        try:
            return bool(user) and bool(store.get_user(user).is_admin)
        except Exception:  # noqa: BLE001 - unknown user
            return False


def _proxied_root(location: str | None) -> str | None:
    """``mlflow-artifacts:/1/<run>/artifacts`` -> ``1/<run>/artifacts/`` (the proxy's path);
    None for a location the proxy does not serve."""
    if not location or not location.startswith("mlflow-artifacts:"):
        return None
    rel = location.split(":", 1)[1]
    if rel.startswith("//"):
        rel = rel[2:].split("/", 1)[1] if "/" in rel[2:] else ""
    return rel.strip("/") + "/"


def _guard():
    """Before the request (after basic-auth has authenticated it): the table decides."""
    from flask import g, request

    if request.method not in guard.MUTATING:
        return None
    if request.url_rule is None:
        return None  # no such route: Flask answers 404 or 405
    endpoint = guard.normalise(request.url_rule.rule)
    user = getattr(g, "mlflow_authenticated_user", None)
    try:
        rule = guard.rule_for(request.method, endpoint)
        if rule.kind == "artifacts" or endpoint == "mlflow/users/create-ui":
            # bodies are file bytes, or the sign-up page's form; the query must still be empty
            if request.args:
                raise guard.Refused(f"query parameters on a {request.method} request")
            fields = {}
        else:
            fields = guard.strict_fields(request.method, request.args.to_dict(),
                                         request.get_data(cache=True),
                                         proto_fields().get((request.method, endpoint)))
        ctx = guard.Ctx(request.method, endpoint, fields, user, guard.roles(check_overlap=False),
                        dict(request.view_args or {}), _Registry())
        rule.check(ctx)
        g.fracture_ops_ctx = ctx
        if endpoint == "mlflow/model-versions/set-tag" and fields.get("key") == APPROVAL \
                and fields.get("value") == "approved":
            g.fracture_ops_stamp = _sign_approval(str(fields.get("name", "")),
                                                  str(fields.get("version", "")), user)
    except guard.Refused as exc:
        log.warning("refused %s %s for %r: %s", request.method, endpoint, user, exc)
        return _refuse(str(exc))
    return None


def _download_version(name: str, version: str, dst: str) -> str:
    """The version's model artifacts, read from the server's own artifact store."""
    from mlflow.server.handlers import (
        _get_artifact_repo_mlflow_artifacts,
        _get_model_registry_store,
        _get_tracking_store,
    )
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mv = _get_model_registry_store().get_model_version(name, version)
    location = getattr(mv, "storage_location", None) or mv.source
    if location.startswith("models:/m-"):
        location = _get_tracking_store().get_logged_model(
            location.removeprefix("models:/")).artifact_location
    elif location.startswith("runs:/"):
        run_id, _, sub = location.removeprefix("runs:/").partition("/")
        location = _get_tracking_store().get_run(run_id).info.artifact_uri.rstrip("/") + "/" + sub
    if location.startswith("mlflow-artifacts:"):
        rel = location.split(":", 1)[1].lstrip("/")
        # mlflow-artifacts://host/path carries a host before the path
        if location.startswith("mlflow-artifacts://"):
            rel = rel.split("/", 1)[1] if "/" in rel else ""
        return _get_artifact_repo_mlflow_artifacts().download_artifacts(rel, dst)
    return get_artifact_repository(location).download_artifacts("", dst)


def _sign_approval(name: str, version: str, user: str | None) -> dict:
    """Sign what the approver approves, before the tag is written (no signature, no approval)."""
    from fracture_ops.registry import signing

    key = os.environ.get(signing.KEY_ENV)
    if not key or not os.path.exists(key):
        raise guard.Refused(f"the approval server has no signing key (${signing.KEY_ENV}): "
                            "approvals cannot be bound to the model's bytes")
    at = datetime.now(UTC).isoformat(timespec="seconds")
    tmp = tempfile.mkdtemp(prefix="fo-approve-")
    try:
        folder = _download_version(name, version, tmp)
        bundle = signing.sign_folder(folder, signing.statement(name, version, user or "", at), key)
    except guard.Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable artifacts: refuse the approval
        raise guard.Refused(f"cannot sign {name} v{version}'s artifacts: "
                            f"{type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {STAMP: user or "", TAG_APPROVED_AT: at, TAG_SIGNATURE: bundle}


def _after(response):
    """After a successful write: stamps the approval or removes it; records gate evidence."""
    from flask import g
    from mlflow.entities.model_registry import ModelVersionTag
    from mlflow.server.handlers import _get_model_registry_store

    ctx = getattr(g, "fracture_ops_ctx", None)
    if ctx is None or response.status_code != 200:
        return response
    store = _get_model_registry_store()
    if ctx.endpoint in ("mlflow/model-versions/set-tag", "mlflow/model-versions/delete-tag") \
            and ctx.fields.get("key") == APPROVAL:
        name, version = str(ctx.fields.get("name", "")), str(ctx.fields.get("version", ""))
        stamp = getattr(g, "fracture_ops_stamp", None)
        if stamp and ctx.endpoint.endswith("set-tag"):
            for key, value in stamp.items():
                store.set_model_version_tag(name, version, ModelVersionTag(key, value))
            log.info("approval of %s v%s stamped and signed for %s", name, version, ctx.user)
        else:
            for key in (STAMP, TAG_APPROVED_AT, TAG_SIGNATURE):
                try:
                    store.delete_model_version_tag(name, version, key)
                except Exception:  # noqa: BLE001 - no stamp to remove
                    pass
    elif ctx.endpoint == guard.ARTIFACT_PUT[1] and ctx.method == "PUT":
        _record_evidence(ctx)
    return response


def _record_evidence(ctx: guard.Ctx) -> None:
    """After the gate identity wrote ``gate/gate.json``: record its SHA-256 and writer on every
    version of the run (server-only tags). Unrecorded evidence is refused by ``promote``."""
    from mlflow.entities.model_registry import ModelVersionTag
    from mlflow.server.handlers import _get_artifact_repo_mlflow_artifacts, _get_model_registry_store

    path = str(ctx.path_args.get("artifact_path", ""))
    m = guard.RUN_ARTIFACT.match(path)
    if not m or m.group("rest") != GATE_EVIDENCE:
        return
    tmp = tempfile.mkdtemp(prefix="fo-evidence-")
    try:
        local = _get_artifact_repo_mlflow_artifacts().download_artifacts(path, tmp)
        with open(local, "rb") as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
        store = _get_model_registry_store()
        for v in ctx.registry.versions_of_run(m.group("run")):
            for key, value in ((TAG_EVIDENCE_SHA, sha), (TAG_EVIDENCE_BY, ctx.user or "")):
                store.set_model_version_tag(v.name, v.version, ModelVersionTag(key, value))
        log.warning("gate evidence of run %s recorded (sha256 %s, by %s)", m.group("run"), sha,
                    ctx.user)
    except Exception:  # noqa: BLE001 - unrecorded evidence is refused by promote
        log.exception("could not record the gate evidence of run %s", m.group("run"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _native_route(app, scope) -> tuple[str, dict] | None:
    """(rule path in Flask syntax, path parameters) of the FastAPI-native route a request hits;
    None when it falls through to the Flask app (whose hooks guard it)."""
    from starlette.routing import Match, Mount

    for route in app.routes:
        if isinstance(route, Mount):
            continue
        match, child = route.matches(scope)
        if match == Match.FULL:
            return guard.flask_syntax(route.path), dict(child.get("path_params", {}))
    return None


def _add_native_guard(app) -> None:
    """MLflow serves some routes natively in FastAPI (artifact upload and download, OTel traces,
    jobs, the AI gateway, the assistant, MCP servers): they bypass Flask's hooks, so the same
    table decides them here, at the ASGI layer, before MLflow's own permission middleware."""
    from starlette.concurrency import run_in_threadpool

    @app.middleware("http")
    async def fracture_ops_guard(request, call_next):
        if request.method not in guard.MUTATING:
            return await call_next(request)
        native = _native_route(app, request.scope)
        if native is None:
            return await call_next(request)
        rule_path, params = native
        endpoint = guard.normalise(rule_path)
        user = await run_in_threadpool(_fastapi_user, request)
        try:
            rule = guard.rule_for(request.method, endpoint)
            if rule.kind != "artifacts":
                raise guard.Refused(f"{request.method} {endpoint}: only artifact writes are "
                                    "admitted on MLflow's native routes")
            if request.query_params:
                raise guard.Refused("query parameters on an artifact write")
            ctx = guard.Ctx(request.method, endpoint, {}, user, guard.roles(check_overlap=False),
                            params, _Registry())
            await run_in_threadpool(rule.check, ctx)
        except guard.Refused as exc:
            log.warning("refused %s %s for %r: %s", request.method, endpoint, user, exc)
            from starlette.responses import JSONResponse

            return JSONResponse({"error_code": "PERMISSION_DENIED", "message": str(exc)},
                                status_code=403)
        response = await call_next(request)
        if response.status_code == 200 and (request.method, endpoint) == guard.ARTIFACT_PUT:
            await run_in_threadpool(_record_evidence, ctx)
        return response


def _fastapi_user(request) -> str | None:
    from mlflow.server.auth import _authenticate_fastapi_request

    try:
        user = _authenticate_fastapi_request(request)
    except Exception:  # noqa: BLE001 - unauthenticated: MLflow's middleware answers 401
        return None
    return getattr(user, "username", None)


def create_app(app=None):
    """``mlflow server --app-name fracture-ops``: basic-auth plus the guard and the stamp."""
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth

    guard.roles(check_overlap=True)  # overlapping role lists stop the server here
    flask_app = app or flask_app
    served = basic_auth(flask_app)  # registers authentication first: our guard runs after it
    flask_app.before_request(_guard)
    flask_app.after_request(_after)
    if served is not flask_app:  # uvicorn: a FastAPI app with native routes beside Flask's
        _add_native_guard(served)
    return served
