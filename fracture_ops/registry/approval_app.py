"""An MLflow server app that proves who approved a model version.

MLflow records no author for a tag, so an ``approved_by`` tag is only what someone typed. This
app wraps MLflow's basic-auth app (``mlflow server --app-name fracture-ops``, entry point
``mlflow.app``) and, on the server, for the registry's set-tag and delete-tag requests:

- ``approval = approved`` is accepted only from an authenticated user on the approvers list
  (``$FRACTURE_OPS_APPROVERS`` of the server); others get 403;
- when it is accepted, the server itself writes :data:`STAMP` = that user's name on the version;
  setting ``approval`` to anything else removes the stamp;
- nobody may set or delete :data:`STAMP` through the API (403), admins included;
- the ``champion`` alias is set or removed only by the promoter identity (users on
  ``$FRACTURE_OPS_PROMOTERS``), the ``challenger`` alias only by the promoter or the pipeline
  identity (``$FRACTURE_OPS_PIPELINE_USERS``), and only promoters may delete or rename a registered
  model or delete a model version: EDIT or MANAGE on the model (which reviewers and the pipeline
  need, and which the account that created the model holds) is not enough to move the champion.
  An empty list means nobody, admins included.

Promotion (:mod:`fracture_ops.registry.promotion`) trusts only the stamp when the tracking
server is remote. Research and education only; not for clinical use.
"""

from __future__ import annotations

import json
import logging
import os

from fracture_ops.registry.client import CHALLENGER, CHAMPION
from fracture_ops.registry.client import TAG_APPROVAL as APPROVAL
from fracture_ops.registry.client import TAG_VERIFIED_BY as STAMP

log = logging.getLogger(__name__)

_SET = ("/api/2.0/mlflow/model-versions/set-tag", "/ajax-api/2.0/mlflow/model-versions/set-tag")
_DELETE = ("/api/2.0/mlflow/model-versions/delete-tag",
           "/ajax-api/2.0/mlflow/model-versions/delete-tag")
_ALIAS = ("/api/2.0/mlflow/registered-models/alias", "/ajax-api/2.0/mlflow/registered-models/alias")
# requests that can remove or replace the champion without touching its alias
_PROMOTER_ONLY = tuple(f"/{api}/2.0/mlflow/{path}" for api in ("api", "ajax-api")
                       for path in ("registered-models/delete", "registered-models/rename",
                                    "model-versions/delete"))


def _names(var: str) -> set[str]:
    return {a.strip() for a in os.environ.get(var, "").split(",") if a.strip()}


def approvers() -> set[str]:
    """Reviewer identities: may approve (``$FRACTURE_OPS_APPROVERS``)."""
    return _names("FRACTURE_OPS_APPROVERS")


def promoters() -> set[str]:
    """Promoter identities: the only ones that may move ``champion`` (``$FRACTURE_OPS_PROMOTERS``)."""
    return _names("FRACTURE_OPS_PROMOTERS")


def pipeline_users() -> set[str]:
    """Pipeline identities: may also set ``challenger`` (``$FRACTURE_OPS_PIPELINE_USERS``)."""
    return _names("FRACTURE_OPS_PIPELINE_USERS")


def _body() -> dict:
    from flask import request

    if request.method == "DELETE":
        data = request.args.to_dict() or (request.get_json(silent=True) or {})
    else:
        data = request.get_json(silent=True) or {}
    return data if isinstance(data, dict) else {}


def _refuse(message: str):
    from flask import Response

    return Response(json.dumps({"error_code": "PERMISSION_DENIED", "message": message}),
                    status=403, mimetype="application/json")


def _guard():
    """Before the request (after basic-auth has authenticated it)."""
    from flask import g, request

    user = getattr(g, "mlflow_authenticated_user", None)
    if request.path in _ALIAS and request.method in ("POST", "DELETE"):
        # compared case-insensitively: some SQL collations (MySQL) match "Champion" to "champion"
        alias = str(_body().get("alias") or "").strip().lower()
        allowed = {CHAMPION: promoters(), CHALLENGER: promoters() | pipeline_users()}.get(alias)
        if allowed is not None and user not in allowed:
            return _refuse(f"user {user!r} may not move the {alias!r} alias (promoter identity "
                           f"only{', or the pipeline' if alias == CHALLENGER else ''})")
        return None
    if request.path in _PROMOTER_ONLY and user not in promoters():
        return _refuse(f"user {user!r} may not delete or rename registered models or versions "
                       "(promoter identity only)")
    if request.path not in _SET + _DELETE:
        return None
    body = _body()
    key = body.get("key")
    if key == STAMP:
        return _refuse(f"the tag {STAMP} is written by the server only")
    if request.path in _SET and key == APPROVAL and body.get("value") == "approved":
        if not user or user not in approvers():
            return _refuse(f"user {user!r} is not on the approvers list")
    return None


def _stamp(response):
    """After a successful approval change: write or remove the stamp as the server."""
    from flask import g, request
    from mlflow.entities.model_registry import ModelVersionTag
    from mlflow.server.handlers import _get_model_registry_store

    if request.path not in _SET + _DELETE or response.status_code != 200:
        return response
    body = _body()
    if body.get("key") != APPROVAL or not body.get("name") or not body.get("version"):
        return response
    store = _get_model_registry_store()
    name, version = body["name"], str(body["version"])
    user = getattr(g, "mlflow_authenticated_user", None)
    if request.path in _SET and body.get("value") == "approved" and user:
        store.set_model_version_tag(name, version, ModelVersionTag(STAMP, user))
        log.info("approval of %s v%s stamped for %s", name, version, user)
    else:
        try:
            store.delete_model_version_tag(name, version, STAMP)
        except Exception:  # noqa: BLE001 - no stamp to remove
            pass
    return response


def create_app(app=None):
    """``mlflow server --app-name fracture-ops``: basic-auth plus the approval stamp."""
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth

    flask_app = app or flask_app
    served = basic_auth(flask_app)  # registers authentication first: our guard runs after it
    flask_app.before_request(_guard)
    flask_app.after_request(_stamp)
    return served
