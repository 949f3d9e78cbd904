"""Registry events in seconds: MLflow webhooks -> a stateless receiver -> an Airflow asset event.

MLflow (open source, SQL backend) posts a signed JSON delivery to a webhook's URL when a model
version is created, tagged or aliased. :func:`make_app` is a small ASGI app that verifies the
delivery's ``X-MLflow-Signature`` (HMAC-SHA256 over ``<delivery id>.<timestamp>.<body>`` with the
webhook's secret, as MLflow's own ``mlflow.webhooks.delivery`` signs it), refuses stale
timestamps (replays outside :data:`MAX_AGE_S`) and repeated delivery ids it has seen, keeps only
events that can change a promotion (a new version, the ``approval`` or ``gate`` tag, an alias) of
the configured models, and then creates an event on the Airflow asset
:data:`REGISTRY_EVENTS_URI` through Airflow's REST API. The ``fracture_promotion`` DAG is
scheduled on that asset (a slow cron poll stays as a fallback), so an approval is acted on in
seconds. The receiver holds no registry credentials and decides nothing: promotion re-reads the
registry and the audit, so a forged, replayed or duplicated event can at most start an idempotent
promotion run.

``fracture-ops registry webhooks install --url URL`` registers (or updates) the webhook
idempotently; ``fracture-ops registry webhooks serve`` runs the receiver. Research and education
only; not for clinical use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from typing import Any
from collections.abc import Callable

from fracture_ops.registry.client import TAG_APPROVAL, TAG_GATE
from fracture_ops import envvars

log = logging.getLogger(__name__)

WEBHOOK_NAME = "fracture-ops-promotion"
REGISTRY_EVENTS_URI = "fracture-ops://registry/events"
REGISTRY_EVENTS_NAME = "fracture_ops_registry_events"
EVENTS = ("model_version.created", "model_version_tag.set", "model_version_alias.created")
RELEVANT_TAGS = (TAG_APPROVAL, TAG_GATE)
SIGNATURE_HEADER = "x-mlflow-signature"
DELIVERY_HEADER = "x-mlflow-delivery-id"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
MAX_AGE_S = 300
SECRET_ENV = envvars.WEBHOOK_SECRET
MAX_BODY = 1 << 20


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery (``v1,<base64>``)."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None,
           max_age_s: float = MAX_AGE_S) -> str | None:
    """Why a delivery is not authentic, or None when it is (``headers`` lower-cased)."""
    if not secret:
        return "no webhook secret configured"
    delivery, stamp, sig = (headers.get(h, "") for h in (DELIVERY_HEADER, TIMESTAMP_HEADER,
                                                          SIGNATURE_HEADER))
    if not delivery or not stamp or not sig:
        return "missing signature, delivery id or timestamp header"
    try:
        age = (time.time() if now is None else now) - int(stamp)
    except ValueError:
        return "timestamp is not an integer"
    if abs(age) > max_age_s:
        return f"timestamp {age:.0f} s off (more than {max_age_s:.0f} s): stale or replayed"
    if not hmac.compare_digest(signature(secret, delivery, stamp, body).encode(), sig.encode()):
        return "bad signature"
    return None


def relevant(event: dict, models: set[str]) -> bool:
    """Whether a verified delivery can change what promotion does."""
    kind = f"{event.get('entity')}.{event.get('action')}"
    data = event.get("data") or {}
    if kind not in EVENTS or (models and data.get("name") not in models):
        return False
    return kind != "model_version_tag.set" or data.get("key") in RELEVANT_TAGS


class AirflowAssetEvents:
    """Creates events on one Airflow asset through Airflow's REST API (``/api/v2``).

    Credentials: ``token`` (a JWT), or ``username``/``password`` exchanged at ``/auth/token``.
    """

    def __init__(self, base_url: str, uri: str = REGISTRY_EVENTS_URI, token: str | None = None,
                 username: str | None = None, password: str | None = None, timeout: float = 10):
        self.base_url, self.uri, self.timeout = base_url.rstrip("/"), uri, timeout
        self.token, self.username, self.password = token, username, password
        self._asset_id: int | None = None

    @classmethod
    def from_env(cls) -> AirflowAssetEvents:
        """``$AIRFLOW_API_URL`` plus ``$AIRFLOW_API_TOKEN`` or ``$AIRFLOW_API_USERNAME`` and
        ``$AIRFLOW_API_PASSWORD``."""
        from fracture_ops.errors import ConfigError

        url = os.environ.get("AIRFLOW_API_URL", "")
        if not url:
            raise ConfigError("webhook receiver: set AIRFLOW_API_URL (the Airflow API server)")
        return cls(url, token=os.environ.get("AIRFLOW_API_TOKEN"),
                   username=os.environ.get("AIRFLOW_API_USERNAME"),
                   password=os.environ.get("AIRFLOW_API_PASSWORD"))

    def _call(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> dict:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self._token()}"
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read() or b"{}")

    def _token(self) -> str:
        if not self.token:
            if not (self.username and self.password):
                from fracture_ops.errors import ConfigError

                raise ConfigError("webhook receiver: set AIRFLOW_API_TOKEN or AIRFLOW_API_USERNAME "
                                  "and AIRFLOW_API_PASSWORD")
            self.token = self._call("POST", "/auth/token", {"username": self.username,
                                                             "password": self.password},
                                    auth=False)["access_token"]
        return self.token

    def asset_id(self) -> int:
        if self._asset_id is None:
            query = urllib.parse.urlencode({"uri_pattern": self.uri, "limit": 100})
            found = [a for a in self._call("GET", f"/api/v2/assets?{query}")["assets"]
                     if a["uri"] == self.uri]
            if not found:
                raise LookupError(f"Airflow knows no asset {self.uri} (is the promotion DAG parsed?)")
            self._asset_id = int(found[0]["id"])
        return self._asset_id

    def emit(self, extra: dict) -> dict:
        """Create one asset event (retrying once with a fresh token after a 401)."""
        body = {"asset_id": self.asset_id(), "extra": extra}
        try:
            return self._call("POST", "/api/v2/assets/events", body)
        except urllib.error.HTTPError as exc:
            if exc.code != 401 or not self.username:
                raise
        self.token = None  # expired: exchange the password again
        return self._call("POST", "/api/v2/assets/events", body)


def make_app(secret: str, emit: Callable[[dict], Any], models: set[str] | None = None,
             max_age_s: float = MAX_AGE_S, remember: int = 10000):
    """The receiver as an ASGI app: ``POST /`` (or any path) takes deliveries, ``GET /health``.

    Answers 401 to an unsigned, badly signed or stale delivery, 200 ``ignored`` to events that
    cannot change a promotion and to delivery ids already seen (MLflow retries), 202 after the
    asset event was created, and 502 when Airflow could not be reached (MLflow retries then).
    """
    models = set(models or ())
    seen: OrderedDict[str, None] = OrderedDict()

    async def respond(send, status: int, body: dict) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"].rstrip("/") == "/health":
            return await respond(send, 200, {"status": "ok"})
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": "POST deliveries only"})
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await respond(send, 413, {"error": "delivery too large"})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = verify(secret, headers, body, max_age_s=max_age_s)
        if problem:
            log.warning("webhook delivery refused: %s", problem)
            return await respond(send, 401, {"error": problem})
        delivery = headers[DELIVERY_HEADER]
        if delivery in seen:
            return await respond(send, 200, {"status": "ignored", "reason": "delivery already seen"})
        try:
            event = json.loads(body)
        except ValueError:
            return await respond(send, 400, {"error": "body is not JSON"})
        if not isinstance(event, dict) or not relevant(event, models):
            return await respond(send, 200, {"status": "ignored", "reason": "not a promotion event"})
        data = event.get("data") or {}
        extra = {"event": f"{event.get('entity')}.{event.get('action')}", "delivery_id": delivery,
                 "model": str(data.get("name", "")), "version": str(data.get("version", ""))}
        try:
            emit(extra)
        except Exception as exc:  # noqa: BLE001 - Airflow unreachable: MLflow retries the delivery
            log.error("webhook delivery %s: asset event failed: %s", delivery, exc)
            return await respond(send, 502, {"error": "could not create the Airflow asset event"})
        seen[delivery] = None
        while len(seen) > remember:
            seen.popitem(last=False)
        log.info("webhook %s on %s v%s -> asset event", extra["event"], extra["model"], extra["version"])
        return await respond(send, 202, {"status": "accepted"})

    return app


def install(url: str, secret: str, client=None, name: str = WEBHOOK_NAME) -> dict:
    """Create or update the promotion webhook (found by name): idempotent."""
    import mlflow

    from fracture_ops.errors import ConfigError

    if not secret or len(secret.encode()) < 32:
        raise ConfigError(f"webhook secret must hold at least 32 bytes (set ${SECRET_ENV})")
    client = client or mlflow.MlflowClient()
    events = list(EVENTS)
    existing, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        existing += [w for w in page if w.name == name]
        token = page.token
        if not token:
            break
    if existing:
        hook = client.update_webhook(existing[0].webhook_id, url=url, events=events, secret=secret,
                                     status="ACTIVE")
        action = "updated"
    else:
        hook = client.create_webhook(name=name, url=url, events=events, secret=secret,
                                     description="fracture-ops: start promotion on registry events")
        action = "created"
    for extra in existing[1:]:  # one webhook per name
        client.delete_webhook(extra.webhook_id)
    return {"action": action, "webhook_id": hook.webhook_id, "url": url, "events": list(EVENTS)}


def serve(host: str, port: int, models: set[str]) -> None:
    """Run the receiver (uvicorn) with the secret and Airflow credentials from the environment."""
    import uvicorn

    from fracture_ops.errors import ConfigError

    secret = os.environ.get(SECRET_ENV, "")
    if len(secret.encode()) < 32:
        raise ConfigError(f"webhook receiver: ${SECRET_ENV} must hold at least 32 bytes")
    airflow = AirflowAssetEvents.from_env()
    uvicorn.run(make_app(secret, airflow.emit, models), host=host, port=port, log_level="warning")
