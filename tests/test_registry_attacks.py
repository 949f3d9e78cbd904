"""Attacks on the approval, each driven as the security review drove it, against a live
``mlflow server --app-name fracture-ops`` (PostgreSQL backend store, S3 artifacts) with separate
approver, pipeline, gate, promoter and administrator accounts.

Every attack is refused or detected, the champion does not move, and each test also walks the
honest path once to show it still works. The guard's table is checked against MLflow's own route
list, so an endpoint a new MLflow adds fails here until it is classified."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from fracture_ops.registry.client import TAG_VERIFIED_BY as STAMP
from tests.services import (
    MlflowServer,
    S3Server,
    auth_env,
    create_database,
    drop_database,
    log_model_folder,
    signing_keys,
)

pytestmark = [pytest.mark.integration]
MODEL = "fracture-classifier"
USERS = ("alice", "pipeline", "gate", "promoter", "mallory")


def _pw(user: str) -> str:
    return f"{user}-pw-4242"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    import mlflow
    from mlflow.server import get_app_client

    work = tmp_path_factory.mktemp("attacks")
    admin_pw = secrets.token_urlsafe(16)
    priv, pub = signing_keys(work)
    s3, db = S3Server(), create_database("fo_attacks")
    server = MlflowServer(db, s3, work, app_name="fracture-ops", extra_env={
        **auth_env(work, admin_pw), "FRACTURE_OPS_APPROVERS": "alice",
        "FRACTURE_OPS_PIPELINE_USERS": "pipeline", "FRACTURE_OPS_GATE_USERS": "gate",
        "FRACTURE_OPS_PROMOTERS": "promoter", "FRACTURE_OPS_APPROVAL_KEY": priv})
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                            "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME="admin",
                      MLFLOW_TRACKING_PASSWORD=admin_pw)
    mlflow.set_tracking_uri(server.url)
    try:
        auth = get_app_client("fracture-ops", tracking_uri=server.url)
        for user in USERS:
            auth.create_user(user, _pw(user))
        with as_user("pipeline"):
            client = mlflow.MlflowClient(server.url)
            exp = client.create_experiment("attacks")
            client.create_registered_model(MODEL)
        for user in ("gate", "mallory"):
            auth.grant_user_permission(user, "experiment", exp, "EDIT")
        for user in ("alice", "gate", "promoter", "mallory"):
            auth.grant_user_permission(user, "registered_model", MODEL, "MANAGE")
        yield {"url": server.url, "exp": exp, "pub": pub, "s3": s3, "work": work,
               "admin_pw": admin_pw}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        mlflow.set_tracking_uri(None)
        server.stop()
        s3.stop()
        drop_database(db)


@contextmanager
def as_user(user: str, password: str | None = None):
    """MLflow's client reads basic-auth credentials from the environment."""
    saved = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password or _pw(user)
    try:
        yield
    finally:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = saved


def _client(srv):
    import mlflow

    return mlflow.MlflowClient(srv["url"])


def _api(srv, user: str, method: str, path: str, *, body=None, data=None, params=None,
         password: str | None = None) -> requests.Response:
    """A raw HTTP request as ``user`` (the attacks that a client library would not send)."""
    return requests.request(method, f"{srv['url']}/api/2.0/mlflow/{path}", params=params,
                            auth=(user, password or _pw(user)), timeout=60,
                            data=data if data is not None else
                            (json.dumps(body) if body is not None else None),
                            headers={"Content-Type": "application/json"})


def _new_version(srv, weights: bytes = b"weights-v1", champion: str = "none",
                 gate_passed: bool = True) -> tuple[str, str]:
    """The pipeline trains and registers; the gate identity writes the evidence. Returns
    (version, run id)."""
    client = _client(srv)
    with as_user("pipeline"):
        run = client.create_run(srv["exp"]).info.run_id
        source = log_model_folder(client, run, srv["work"], weights)
        v = str(client.create_model_version(MODEL, source, run_id=run,
                                            tags={"approval": "pending"}).version)
    with as_user("gate"):
        client.log_dict(run, {"passed": gate_passed, "reasons": [], "model": MODEL,
                              "challenger_version": v, "champion_version": champion,
                              "n_test": 50, "test_set_hash": "h1"}, "gate/gate.json")
        for key, value in {"gate": "passed" if gate_passed else "failed",
                           "gate.champion_version": champion}.items():
            client.set_model_version_tag(MODEL, v, key, value)
    with as_user("pipeline"):
        client.set_registered_model_alias(MODEL, "challenger", v)
    return v, run


def _cfg(srv):
    from fracture_ops.registry.promotion import PromotionConfig

    return PromotionConfig(artifact_root=str(srv["work"] / "art"), approvers=["alice"],
                           gate_users=["gate"], approval_pubkey=srv["pub"], actor="promoter",
                           require_server_stamp=True)


def _promote(srv):
    from fracture_ops.registry.promotion import promote_if_approved

    with as_user("promoter"):
        return promote_if_approved(_cfg(srv), _client(srv))


def _champion(srv) -> str | None:
    from fracture_ops.registry.client import alias_version

    v = alias_version(_client(srv), MODEL, "champion")
    return None if v is None else str(v.version)


def _approve(srv, v: str) -> None:
    with as_user("alice"):
        _client(srv).set_model_version_tag(MODEL, v, "approval", "approved")


def _honest_promotion(srv) -> str:
    """The honest path: register, gate, approve, promote."""
    v, _ = _new_version(srv, weights=secrets.token_bytes(64), champion=_champion(srv) or "none")
    _approve(srv, v)
    assert _promote(srv)["action"] == "promoted", _promote(srv)
    assert _champion(srv) == v
    return v


def _s3_key(srv, run: str, rel: str) -> tuple[str, str]:
    """Where the proxy stored a run artifact (the bucket the S3 key holder can write)."""
    s3 = srv["s3"]
    keys = [k for k in s3.keys("fracture-ops-mlflow") if f"/{run}/artifacts/{rel}" in k]
    assert len(keys) == 1, keys
    return "fracture-ops-mlflow", keys[0]


# ------------------------------------------------------------------------------------ attacks

def test_pipeline_cannot_create_a_version_that_carries_an_approval(srv):
    """Attack 1: create_model_version(..., tags={approval: approved, approval.verified_by: alice})."""
    import mlflow

    client = _client(srv)
    champion = _honest_promotion(srv)
    with as_user("pipeline"):
        run = client.create_run(srv["exp"]).info.run_id
        source = log_model_folder(client, run, srv["work"])
        for tags in ({"approval": "approved", STAMP: "alice"}, {"approval": "approved"},
                     {STAMP: "alice"}, {"approval.signature": "x"}, {"gate.evidence.by": "gate"}):
            with pytest.raises(mlflow.exceptions.MlflowException, match="(?i)server only|pending"):
                client.create_model_version(MODEL, source, run_id=run, tags=tags)
        assert not client.search_model_versions(f"run_id = '{run}'")
    assert _champion(srv) == champion


def test_artifacts_overwritten_after_approval_are_refused_or_detected(srv):
    """Attack 1b: overwrite the approved version's weights, through the proxy (refused) and
    straight in the bucket with the S3 key (the signature no longer verifies: not promoted,
    audited, exit 3)."""
    from fracture_ops.errors import EXIT_BAD_INPUT
    from fracture_ops.registry.promotion import read_audit
    from fracture_ops.registry.signing import SignatureInvalid

    client = _client(srv)
    champion = _champion(srv) or _honest_promotion(srv)
    v, run = _new_version(srv, champion=champion)
    _approve(srv, v)
    tags = client.get_model_version(MODEL, v).tags
    assert tags[STAMP] == "alice" and tags["approval.signature"] and tags["approval.at"]
    for user in ("pipeline", "mallory"):  # through the artifact proxy: 403
        with as_user(user), pytest.raises(requests.HTTPError, match="403.*frozen"):
            client.log_text(run, "evil weights", "model/model.pt")
    bucket, key = _s3_key(srv, run, "model/model.pt")
    good = srv["s3"].client.get_object(Bucket=bucket, Key=key)["Body"].read()
    srv["s3"].client.put_object(Bucket=bucket, Key=key, Body=b"evil weights")
    with pytest.raises(SignatureInvalid) as exc:
        _promote(srv)
    assert exc.value.exit_code == EXIT_BAD_INPUT and _champion(srv) == champion
    refused = [r for r in read_audit(_cfg(srv).audit_path()) if r["action"] == "refused"]
    assert refused and "bytes changed" in refused[-1]["reason"] and refused[-1]["version"] == v
    srv["s3"].client.put_object(Bucket=bucket, Key=key, Body=good)
    assert _promote(srv)["action"] == "promoted" and _champion(srv) == v  # honest path


def test_gate_evidence_written_by_another_identity_or_later_is_not_evidence(srv):
    """Attack 1c: the pipeline writes its own gate/gate.json (refused); the evidence is replaced
    in the bucket after the gate wrote it (digest differs: refused)."""
    import mlflow

    client = _client(srv)
    champion = _champion(srv) or _honest_promotion(srv)
    v, run = _new_version(srv, champion=champion)
    forged = {"passed": True, "reasons": [], "model": MODEL, "challenger_version": v,
              "champion_version": champion, "n_test": 5000, "test_set_hash": "h1"}
    for user in ("pipeline", "mallory", "alice"):
        with as_user(user), pytest.raises(requests.HTTPError, match="403.*gate identity"):
            client.log_dict(run, forged, "gate/gate.json")
        for key, value in (("gate", "failed"), ("gate.champion_version", "999"), ("gate", "passed")):
            with as_user(user), pytest.raises(mlflow.exceptions.MlflowException, match="gate identity"):
                client.set_model_version_tag(MODEL, v, key, value)
        with as_user(user), pytest.raises(mlflow.exceptions.MlflowException, match="promoter identity"):
            client.set_model_version_tag(MODEL, v, "rolled_back_at", "now")
    bucket, key = _s3_key(srv, run, "gate/gate.json")
    srv["s3"].client.put_object(Bucket=bucket, Key=key, Body=json.dumps(forged).encode())
    _approve(srv, v)
    out = _promote(srv)
    assert out["action"] == "none" and "digest differs" in out["reason"]
    assert _champion(srv) == champion
    _honest_promotion(srv)


def test_a_forged_future_audit_record_freezes_instead_of_driving_the_champion(srv):
    """Attack 2: one record {action: adopted, version: <unapproved>, ts: 9999-12-31} written
    into the audit store; then the same record linked properly into the chain."""
    from fracture_ops.registry import audit

    champion = _champion(srv) or _honest_promotion(srv)
    v, _ = _new_version(srv, champion=champion, gate_passed=False)  # unapproved, gate failed
    folder = _cfg(srv).audit_path()
    forged = {"action": "adopted", "model": MODEL, "version": v, "ts": "9999-12-31T00:00:00+00:00"}
    junk = os.path.join(folder, "99991231T000000000000Z-adopted-forged.json")
    Path(junk).write_text(json.dumps(forged))
    with pytest.raises(audit.AuditBroken, match="not a record of the chain"):
        _promote(srv)
    assert _champion(srv) == champion
    os.unlink(junk)
    linked = audit.append(folder, forged)
    with pytest.raises(audit.AuditBroken, match="follows its anchored head"):
        _promote(srv)
    assert _champion(srv) == champion
    os.unlink(os.path.join(folder, audit.record_name(linked["seq"])))
    assert _promote(srv)["action"] == "none"  # the honest store works again


def test_a_deleted_audit_record_freezes_promotion(srv):
    from fracture_ops.registry import audit

    champion = _champion(srv) or _honest_promotion(srv)
    folder = _cfg(srv).audit_path()
    victim = os.path.join(folder, audit.record_name(0))
    data = Path(victim).read_bytes()
    os.unlink(victim)
    with pytest.raises(audit.AuditBroken, match="record 0 is missing"):
        _promote(srv)
    assert _champion(srv) == champion
    Path(victim).write_bytes(data)
    _honest_promotion(srv)


def test_query_versus_body_confusion_is_refused(srv):
    """Attack 3: DELETE .../alias?alias=innocent with body {alias: champion}; the same trick on
    the server-only stamp."""
    champion = _champion(srv) or _honest_promotion(srv)
    body = {"name": MODEL, "alias": "champion"}
    r = _api(srv, "pipeline", "DELETE", "registered-models/alias", params={"alias": "innocent"},
             body=body)
    assert r.status_code == 403 and "query parameters" in r.text
    r = _api(srv, "mallory", "DELETE", "model-versions/delete-tag",
             params={"key": "approval"}, body={"name": MODEL, "version": champion, "key": STAMP})
    assert r.status_code == 403
    assert _champion(srv) == champion
    assert _client(srv).get_model_version(MODEL, champion).tags[STAMP] == "alice"
    # honest: another alias, body only
    with as_user("pipeline"):
        _client(srv).set_registered_model_alias(MODEL, "innocent", champion)
    r = _api(srv, "pipeline", "DELETE", "registered-models/alias",
             body={"name": MODEL, "alias": "innocent"})
    assert r.status_code == 200, r.text


def test_a_double_encoded_body_is_refused_even_for_an_admin(srv):
    """Attack 3b: a JSON string holding JSON (MLflow decodes it twice) as the administrator."""
    champion = _champion(srv) or _honest_promotion(srv)
    v, _ = _new_version(srv, champion=champion, gate_passed=False)
    admin = ("admin", srv["admin_pw"])
    inner = json.dumps({"name": MODEL, "alias": "champion", "version": v})
    r = _api(srv, admin[0], "POST", "registered-models/alias", data=json.dumps(inner),
             password=admin[1])
    assert r.status_code == 403 and "JSON object" in r.text
    inner = json.dumps({"name": MODEL, "version": v, "key": STAMP, "value": "alice"})
    r = _api(srv, admin[0], "POST", "model-versions/set-tag", data=json.dumps(inner),
             password=admin[1])
    assert r.status_code == 403
    assert _champion(srv) == champion and STAMP not in _client(srv).get_model_version(MODEL, v).tags
    # the admin is no promoter: the plain request is refused too, the promoter's is not
    r = _api(srv, admin[0], "POST", "registered-models/alias",
             body={"name": MODEL, "alias": "champion", "version": v}, password=admin[1])
    assert r.status_code == 403
    r = _api(srv, "promoter", "POST", "registered-models/alias",
             body={"name": MODEL, "alias": "champion", "version": champion})
    assert r.status_code == 200, r.text


def test_duplicate_keys_and_unknown_fields_are_refused(srv):
    champion = _champion(srv) or _honest_promotion(srv)
    v, _ = _new_version(srv, champion=champion, gate_passed=False)
    dup = f'{{"name": "{MODEL}", "version": "{v}", "alias": "innocent", "alias": "champion"}}'
    r = _api(srv, "pipeline", "POST", "registered-models/alias", data=dup)
    assert r.status_code == 403 and "duplicate field" in r.text
    for extra in ({"Alias": "champion"}, {"aliasName": "champion"}, {"runId": "x"}):
        r = _api(srv, "pipeline", "POST", "registered-models/alias",
                 body={"name": MODEL, "version": v, "alias": "innocent", **extra})
        assert r.status_code == 403 and "unknown field" in r.text
    r = _api(srv, "mallory", "POST", "model-versions/set-tag",
             body={"name": MODEL, "version": v, "key": "approval", "value": "approved",
                   "approval": "approved"})
    assert r.status_code == 403
    assert _champion(srv) == champion
    r = _api(srv, "pipeline", "POST", "registered-models/alias",
             body={"name": MODEL, "version": v, "alias": "innocent"})
    assert r.status_code == 200, r.text


def test_endpoints_outside_the_table_and_refused_ones_answer_403(srv):
    champion = _champion(srv) or _honest_promotion(srv)
    r = _api(srv, "promoter", "POST", "model-versions/transition-stage",
             body={"name": MODEL, "version": champion, "stage": "Production",
                   "archive_existing_versions": False})
    assert r.status_code == 403 and "deprecated" in r.text
    run = _client(srv).get_model_version(MODEL, champion).run_id
    r = _api(srv, "pipeline", "POST", "artifacts/presigned-upload-url",
             body={"run_id": run, "path": "model/model.pt"})
    assert r.status_code == 403
    r = _api(srv, "mallory", "POST", "webhooks", body={"name": "x", "url": "http://127.0.0.1:1/",
                                                       "events": []})
    assert r.status_code == 403
    # MLflow's FastAPI-native routes are guarded by the same table (they bypass Flask's hooks)
    r = requests.post(f"{srv['url']}/v1/traces", data=b"\x00", auth=("pipeline", _pw("pipeline")),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=60)
    assert r.status_code == 403 and "OpenTelemetry" in r.text
    r = requests.put(f"{srv['url']}/api/2.0/mlflow-artifacts/artifacts/1/x/../../escape",
                     data=b"x", auth=("pipeline", _pw("pipeline")), timeout=60)
    assert r.status_code in (403, 404)
    assert _api(srv, "mallory", "GET", "registered-models/get", params={"name": MODEL}).ok


def test_every_mutating_mlflow_endpoint_is_in_the_guard_table(tmp_path):
    """Read MLflow's own route list (with basic-auth's routes) in a fresh process: every write
    endpoint must be classified, and every entry must name an endpoint that exists."""
    ini = tmp_path / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/a.db\n"
                   f"admin_username = admin\nadmin_password = {secrets.token_urlsafe(12)}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    # as `mlflow server` runs it (uvicorn): Flask's routes and FastAPI's native ones
    code = ("import json\nfrom mlflow.server import app\n"
            "from fracture_ops.registry.approval_app import create_app\n"
            "from fracture_ops.registry.guard import flask_syntax\nserved = create_app(app)\n"
            "routes = [[r.rule, sorted(r.methods)] for r in app.url_map.iter_rules()]\n"
            "routes += [[flask_syntax(r.path), sorted(r.methods)] for r in served.routes\n"
            "           if getattr(r, 'methods', None)]\n"
            "print(json.dumps(routes))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                              "MLFLOW_FLASK_SERVER_SECRET_KEY": "t", "_MLFLOW_SGI_NAME": "uvicorn"})
    assert out.returncode == 0, out.stderr[-2000:]
    from fracture_ops.registry import guard

    routes = json.loads(out.stdout.strip().splitlines()[-1])
    seen, missing = set(), []
    for rule, methods in routes:
        for method in set(methods) & set(guard.MUTATING):
            endpoint = guard.normalise(rule)
            seen.add(f"{method} {endpoint}")
            if not guard.classified(method, endpoint):
                missing.append(f"{method} {rule}")
    assert len(seen) > 100 and not missing, missing
    table = {f"{r.method} {r.endpoint}" for r in guard.RULES} | set(guard.REFUSED)
    assert not table - seen, sorted(table - seen)
    printed = subprocess.run([sys.executable, "-m", "fracture_ops.cli", "registry", "guard-rules"],
                             capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    lines = [line.split()[:2] for line in printed.stdout.splitlines()]
    for spec in seen:
        method, endpoint = spec.split(" ", 1)
        assert [method, endpoint] in lines or any(
            m == "*" and endpoint.startswith(e.rstrip("*")) for m, e in lines if m == "*"), spec


def test_overlapping_role_lists_stop_the_server(monkeypatch):
    from fracture_ops.registry import guard

    monkeypatch.setenv("FRACTURE_OPS_APPROVERS", "alice")
    monkeypatch.setenv("FRACTURE_OPS_PIPELINE_USERS", "pipeline,alice")
    with pytest.raises(ValueError, match="alice"):
        guard.roles()
    monkeypatch.setenv("FRACTURE_OPS_PIPELINE_USERS", "pipeline")
    monkeypatch.setenv("FRACTURE_OPS_GATE_USERS", "gate")
    monkeypatch.setenv("FRACTURE_OPS_PROMOTERS", "gate")
    with pytest.raises(ValueError, match="gate"):
        guard.roles()


# ---------------------------------------------------- found by an independent attack on round 1

def test_percent_encoded_paths_cannot_reach_gate_evidence_or_an_approved_folder(srv):
    """uvicorn decodes a path once, MLflow again: gate%252Fgate.json was judged as one file name
    and written as gate/gate.json; 1%252F<run>... smuggled a file into an approved folder."""
    champion = _champion(srv) or _honest_promotion(srv)
    v, run = _new_version(srv, champion=champion)
    forged = json.dumps({"passed": True}).encode()
    for api in ("api", "ajax-api"):
        for name in ("gate%252Fgate.json", "gate%25252Fgate.json", "gate%2Fgate.json"):
            r = requests.put(f"{srv['url']}/{api}/2.0/mlflow-artifacts/artifacts/1/{run}/artifacts/"
                             f"{name}", data=forged, auth=("mallory", _pw("mallory")), timeout=60)
            assert r.status_code in (403, 404), (api, name, r.status_code)
    r = requests.post(f"{srv['url']}/api/2.0/mlflow-artifacts/mpu/create/1/{run}/artifacts/"
                      "gate%252Fgate.json", json={"path": "gate.json", "num_parts": 1},
                      auth=("mallory", _pw("mallory")), timeout=60)
    assert r.status_code in (403, 404)
    champ_run = _client(srv).get_model_version(MODEL, champion).run_id
    r = requests.put(f"{srv['url']}/api/2.0/mlflow-artifacts/artifacts/1%252F{champ_run}%252F"
                     f"artifacts%252Fmodel%252F.git/{'a' * 32}/artifacts/x", data=b"x",
                     auth=("mallory", _pw("mallory")), timeout=60)
    assert r.status_code in (403, 404)
    # a .git file put straight into the approved folder in the bucket is caught by the signature
    bucket, key = _s3_key(srv, champ_run, "model/model.pt")
    srv["s3"].client.put_object(Bucket=bucket, Key=key.replace("model.pt", ".git/config"), Body=b"x")
    from fracture_ops.registry.signing import SignatureInvalid

    with pytest.raises(SignatureInvalid, match="champion"):
        _promote(srv)
    srv["s3"].client.delete_object(Bucket=bucket, Key=key.replace("model.pt", ".git/config"))
    assert _promote(srv)["action"] == "none" and _champion(srv) == champion


def test_a_non_approver_cannot_strip_an_approval_and_a_champion_stays_frozen(srv):
    import mlflow

    from fracture_ops.registry.signing import SignatureInvalid

    champion = _champion(srv) or _honest_promotion(srv)
    client = _client(srv)
    for value in ("rejected", "pending", "approved-by-alice"):
        with as_user("mallory"), pytest.raises(mlflow.exceptions.MlflowException,
                                               match="approver identity|approvers list"):
            client.set_model_version_tag(MODEL, champion, "approval", value)
    with as_user("mallory"), pytest.raises(mlflow.exceptions.MlflowException, match="approver"):
        client.delete_model_version_tag(MODEL, champion, "approval")
    assert client.get_model_version(MODEL, champion).tags[STAMP] == "alice"
    run = client.get_model_version(MODEL, champion).run_id
    with as_user("pipeline"), pytest.raises(requests.HTTPError, match="403.*frozen"):
        client.log_text(run, "EVIL WEIGHTS", "model/model.pt")
    # bytes swapped in the bucket after promotion: the next pass refuses to go on (audited)
    bucket, key = _s3_key(srv, run, "model/model.pt")
    good = srv["s3"].client.get_object(Bucket=bucket, Key=key)["Body"].read()
    srv["s3"].client.put_object(Bucket=bucket, Key=key, Body=b"EVIL WEIGHTS")
    with pytest.raises(SignatureInvalid, match="champion"):
        _promote(srv)
    srv["s3"].client.put_object(Bucket=bucket, Key=key, Body=good)
    assert _promote(srv)["action"] == "none"
    # an approver may still reject a version that is not champion
    v, _ = _new_version(srv, champion=champion)
    _approve(srv, v)
    with as_user("alice"):
        client.set_model_version_tag(MODEL, v, "approval", "rejected")
    assert STAMP not in client.get_model_version(MODEL, v).tags


def test_a_version_must_live_in_its_own_run(srv):
    """s3:// sources, another run's folder, and a logged model no run produced are refused at
    registration: the artifact freeze finds a version's files only under its run."""
    import mlflow

    client = _client(srv)
    with as_user("pipeline"):
        run = client.create_run(srv["exp"]).info.run_id
        other = client.create_run(srv["exp"]).info.run_id
        source = log_model_folder(client, run, srv["work"])
        for bad in (source.replace("mlflow-artifacts:", "s3://fracture-ops-mlflow"),
                    source.replace(run, other), source + "/%2e%2e", f"runs:/{other}/model",
                    "file:///etc"):
            with pytest.raises(mlflow.exceptions.MlflowException, match="(?i)source|run"):
                client.create_model_version(MODEL, bad, run_id=run)
        orphan = _api(srv, "pipeline", "POST", "logged-models",
                      body={"experiment_id": srv["exp"], "name": "orphan"}).json()
        model_id = orphan["model"]["info"]["model_id"]
        r = _api(srv, "pipeline", "POST", "model-versions/create",
                 body={"name": MODEL, "source": f"models:/{model_id}", "run_id": run,
                       "model_id": model_id})
        assert r.status_code == 403 and "not produced by" in r.text
        assert client.create_model_version(MODEL, source, run_id=run).version  # honest


def test_accounts_of_role_holders_cannot_be_taken_over_by_an_admin(srv):
    admin = ("admin", srv["admin_pw"])
    r = _api(srv, admin[0], "PATCH", "users/update-password",
             body={"username": "alice", "password": "admin-chosen-pw-1"}, password=admin[1])
    assert r.status_code == 403 and "role" in r.text
    r = _api(srv, admin[0], "DELETE", "users/delete", body={"username": "alice"}, password=admin[1])
    assert r.status_code == 403
    r = _api(srv, admin[0], "PATCH", "users/update-admin", body={"username": "pipeline",
                                                                  "is_admin": True}, password=admin[1])
    assert r.status_code == 403
    assert _api(srv, "alice", "GET", "registered-models/get", params={"name": MODEL}).ok
    # the owner changes her own password (and back)
    r = _api(srv, "alice", "PATCH", "users/update-password",
             body={"username": "alice", "password": "alice-new-pw-77",
                   "current_password": _pw("alice")})
    assert r.status_code == 200, r.text
    # the server remembers verified passwords for 30 s (mlflow/basic_auth.ini): a changed one
    # is forgotten at once, the old password no longer opens anything
    get = dict(params={"name": MODEL})
    assert _api(srv, "alice", "GET", "registered-models/get", **get).status_code == 401
    assert _api(srv, "alice", "GET", "registered-models/get", password="alice-new-pw-77", **get).ok
    r = _api(srv, "alice", "PATCH", "users/update-password",
             body={"username": "alice", "password": _pw("alice"),
                   "current_password": "alice-new-pw-77"}, password="alice-new-pw-77")
    assert r.status_code == 200, r.text
    assert _api(srv, "alice", "GET", "registered-models/get", password="alice-new-pw-77",
                **get).status_code == 401
    assert _api(srv, "alice", "GET", "registered-models/get", **get).ok


def test_look_alike_and_mlflow_reserved_tag_keys_are_refused(srv):
    champion = _champion(srv) or _honest_promotion(srv)
    for key in ("Approval", "approval ", " approval.verified_by", "approval.Verified_By",
                "approval.signature ", "gate.evidence.sha256 ", "Gate"):
        r = _api(srv, "mallory", "POST", "model-versions/set-tag",
                 body={"name": MODEL, "version": champion, "key": key, "value": "alice"})
        assert r.status_code == 403, key
    for key in ("audit.head ", "Audit.head", "mlflow.prompt.is_prompt", "MLflow.prompt.is_prompt"):
        r = _api(srv, "mallory", "POST", "registered-models/set-tag",
                 body={"name": MODEL, "key": key, "value": "true"})
        assert r.status_code == 403, key
    r = _api(srv, "mallory", "POST", "registered-models/set-tag",
             body={"name": MODEL, "key": "team", "value": "radiology"})
    assert r.status_code == 200, r.text
    assert _champion(srv) == champion


# ---------------------------------------------------- found by an independent attack, round 2

def test_a_registered_versions_files_are_frozen_before_approval_too(srv):
    """Swapping the weights after the gate scored them and before the approver signs would get
    ungated bytes signed; a planted approval.json would block every approval."""
    champion = _champion(srv) or _honest_promotion(srv)
    v, run = _new_version(srv, champion=champion)
    client = _client(srv)
    for user, name in (("mallory", "model/model.pt"), ("pipeline", "model/model.pt"),
                       ("mallory", "model/approval.json"), ("gate", "model/extra.bin")):
        with as_user(user), pytest.raises(requests.HTTPError, match="403.*frozen|403.*gate"):
            client.log_text(run, "EVIL-UNGATED", name)
    _approve(srv, v)
    assert _promote(srv)["action"] == "promoted" and _champion(srv) == v  # the gated bytes


def test_artifact_paths_must_be_a_real_runs_root(srv):
    """An experiment whose artifact location names a made-up run id could alias the files of a
    logged model under it; custom locations are refused, and so are paths of runs that do not
    exist."""
    r = _api(srv, "mallory", "POST", "experiments/create",
             body={"name": "aliasing", "artifact_location": f"mlflow-artifacts:/1/{'9' * 32}/artifacts"})
    assert r.status_code == 403 and "artifact location" in r.text
    r = requests.put(f"{srv['url']}/api/2.0/mlflow-artifacts/artifacts/1/{'9' * 32}/artifacts/x",
                     data=b"x", auth=("mallory", _pw("mallory")), timeout=60)
    assert r.status_code == 403 and "artifact root" in r.text
    assert _api(srv, "mallory", "POST", "experiments/create", body={"name": "plain"}).ok


def test_runs_and_logged_models_behind_a_version_are_not_deleted(srv):
    champion = _champion(srv) or _honest_promotion(srv)
    run = _client(srv).get_model_version(MODEL, champion).run_id
    r = _api(srv, "pipeline", "POST", "runs/delete", body={"run_id": run})
    assert r.status_code == 403 and "registered version" in r.text
    with as_user("pipeline"):
        free = _client(srv).create_run(srv["exp"]).info.run_id
    assert _api(srv, "pipeline", "POST", "runs/delete", body={"run_id": free}).ok


def test_role_accounts_permissions_and_reviewer_decisions_are_not_for_others(srv):
    import mlflow

    for who in ("alice", "promoter"):  # mallory holds MANAGE on the model: MLflow would let her
        r = requests.post(f"{srv['url']}/api/3.0/mlflow/users/permissions/revoke",
                          json={"username": who, "resource_type": "registered_model",
                                "resource_id": MODEL}, auth=("mallory", _pw("mallory")), timeout=60)
        assert r.status_code == 403 and "administrator" in r.text, r.text
    champion = _champion(srv) or _honest_promotion(srv)
    v, _ = _new_version(srv, champion=champion)
    with as_user("alice"):
        _client(srv).set_model_version_tag(MODEL, v, "approval", "rejected")
    with as_user("mallory"), pytest.raises(mlflow.exceptions.MlflowException, match="reviewer"):
        _client(srv).set_model_version_tag(MODEL, v, "approval", "pending")
    assert _client(srv).get_model_version(MODEL, v).tags["approval"] == "rejected"
