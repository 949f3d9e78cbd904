"""Tell reviewers when a challenger waits for their approval: one JSON POST to an incoming-webhook
URL (Slack and Microsoft Teams incoming webhooks both take ``{"text": ...}``; any HTTP endpoint
that accepts JSON works).

The URL comes from the Airflow connection ``fracture_ops_notify`` defined the way Airflow reads
connections from the environment of its workers (``$AIRFLOW_CONN_FRACTURE_OPS_NOTIFY``, e.g. from
a Secret; the local runner's steps inherit it): a URI such as ``https://hooks.slack.com/services/...``,
or Airflow's JSON form with ``host``/``schema``/``port`` and the path in ``extra.endpoint``, or
from ``$FRACTURE_OPS_NOTIFY_URL``.
No URL: nothing is sent. The message holds the model name, the version and links, never images
or patient data. Research and education only; not for clinical use.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
import urllib.request

from fracture_ops import envvars

log = logging.getLogger(__name__)
CONN_ENV = "AIRFLOW_CONN_FRACTURE_OPS_NOTIFY"
URL_ENV = envvars.NOTIFY_URL


def notify_url() -> str:
    """The notification endpoint, or "" when none is configured."""
    conn = os.environ.get(CONN_ENV, "").strip()
    if conn.startswith("{"):
        data = json.loads(conn)
        scheme = data.get("schema") or "https"
        port = f":{data['port']}" if data.get("port") else ""
        host = str(data.get("host", ""))
        extra = data.get("extra") or {}
        extra = json.loads(extra) if isinstance(extra, str) else extra
        path = str(extra.get("endpoint", "")).lstrip("/")
        base = host if "://" in host else f"{scheme}://{host}{port}" if host else ""
        return f"{base.rstrip('/')}/{path}" if base and path else base
    if conn:
        # Airflow's URI form may carry its conn type as the scheme (http://, https://)
        return conn
    return os.environ.get(URL_ENV, "").strip()


def ui_links(tracking_uri: str, model: str, version: str, run_id: str | None) -> dict[str, str]:
    """Links to the version page and its model card on an MLflow server ({} for local stores)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return {}
    base = tracking_uri.rstrip("/")
    links = {"version": f"{base}/#/models/{urllib.parse.quote(model)}/versions/{version}"}
    if run_id:
        links["model_card"] = (f"{base}/get-artifact?" + urllib.parse.urlencode(
            {"path": "model_card/model_card.html", "run_uuid": run_id}))
    return links


def waiting_message(model: str, version: str, gate: str, links: dict[str, str]) -> dict:
    """Slack/Teams-compatible JSON for a challenger waiting for approval."""
    lines = [f"fracture-ops: {model} version {version} is waiting for approval (gate: {gate})."]
    lines += [f"{name.replace('_', ' ')}: {url}" for name, url in links.items()]
    lines.append("Approve by setting the tag approval=approved on the version (approvers only). "
                 "Research and education only; not for clinical use.")
    return {"text": "\n".join(lines), "model": model, "version": version, "gate": gate,
            "links": links}


def send(url: str, message: dict, timeout: float = 10) -> None:
    """POST ``message`` as JSON; raises on a non-2xx answer or a network error."""
    req = urllib.request.Request(url, data=json.dumps(message).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        if not 200 <= r.status < 300:
            raise OSError(f"notifier answered HTTP {r.status}")
