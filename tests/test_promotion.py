"""Promotion a person approves, against a real MLflow server running the fracture-ops app (basic
auth plus the server-side approval stamp; PostgreSQL backend, S3 artifacts): gate, approval
tags, approvers list, stamp, audit log, rollback, idempotence."""

from __future__ import annotations

import os
import secrets

import pytest

from fracture_ops import storage
from tests.services import (
    MlflowServer,
    S3Server,
    auth_env,
    create_database,
    drop_database,
    signing_keys,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "fracture-classifier"
APPROVERS = ["alice"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth")
    admin_pw = secrets.token_urlsafe(16)
    priv, pub = signing_keys(work)
    s3, db = S3Server(), create_database("fo_promo")
    srv = MlflowServer(db, s3, work, app_name="fracture-ops",
                       extra_env={**auth_env(work, admin_pw),
                                  "FRACTURE_OPS_APPROVERS": ",".join(APPROVERS),
                                  # the admin plays the promoter in the story test below
                                  "FRACTURE_OPS_PROMOTERS": "admin,promoter",
                                  "FRACTURE_OPS_PIPELINE_USERS": "pipeline",
                                  "FRACTURE_OPS_GATE_USERS": "gate",
                                  "FRACTURE_OPS_APPROVAL_KEY": priv})
    env = {"MLFLOW_TRACKING_URI": srv.url, "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": admin_pw, "FRACTURE_OPS_GATE_USERS": "gate",
           "FRACTURE_OPS_APPROVAL_PUBKEY": pub}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"url": srv.url, "admin_pw": admin_pw, "work": work}
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    srv.stop()
    s3.stop()
    drop_database(db)


@pytest.fixture(scope="module")
def versions(server, tmp_path_factory):
    """Three registered versions from three training runs on the same fixed test split."""

    from mlflow.server import get_app_client

    # the pipeline identity trains and registers (it writes the model card into the run after
    # registering, which only the pipeline may)
    get_app_client("fracture-ops", tracking_uri=server["url"]).create_user("pipeline", "pipeline-pw-1234")
    return _as("pipeline", "pipeline-pw-1234", server["url"]).call(_train_three, tmp_path_factory)


def _train_three(tmp_path_factory):
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.synthetic import SynthConfig, synth_step
    from fracture_ops.evaluation.calibration import CalibrateConfig, calibrate_step
    from fracture_ops.evaluation.evaluate import EvaluateConfig, evaluate_step
    from fracture_ops.evaluation.thresholds import TuneThresholdsConfig, tune_thresholds_step
    from fracture_ops.registry.register import RegisterConfig, register_step
    from fracture_ops.training.package import PackageConfig, package_step
    from fracture_ops.training.train import TrainConfig, train_step

    tmp = tmp_path_factory.mktemp("runs")
    synth_step(SynthConfig(out_dir=str(tmp / "syn"), n_patients=40, image_size=64, seed=4))
    art = str(tmp / "art")
    split = split_step(SplitConfig(manifest_uri=str(tmp / "syn" / "manifest.parquet"), artifact_root=art,
                                   run_id="data"))
    out = []
    for i, run in enumerate(("a", "b", "c")):
        root = dict(artifact_root=art, run_id=run)
        # the test split is shared (copied into each run folder), as a fixed test set would be
        split_dir = storage.join(art, "runs", run, "split")
        for name in ("split.parquet", "report.json"):
            storage.write_bytes(storage.join(split_dir, name),
                                storage.read_bytes(storage.join(art, "runs", "data", "split", name)))
        train_step(TrainConfig(split_uri=split["split_uri"], backbone="test_resnet", image_size=64,
                               epochs=2, batch_size=16, seed=i, **root))
        calibrate_step(CalibrateConfig(**root))
        tune_thresholds_step(TuneThresholdsConfig(calibration_uri=storage.join(art, "runs", run, "calibrate"),
                                                  **root))
        evaluate_step(EvaluateConfig(n_bootstrap=50, **root))
        package_step(PackageConfig(**root))
        out.append(register_step(RegisterConfig(**root))["version"])
    return {"versions": out, "art": art}


def _gate(run: str, art: str, **rules):
    """The gate step, run as the gate identity (the only writer of gate evidence)."""
    import mlflow
    from mlflow.server import get_app_client

    from fracture_ops.registry.gate import GateConfig, gate_step

    auth = get_app_client("fracture-ops", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    try:
        auth.create_user("gate", "gate-pw-12345")
    except mlflow.exceptions.MlflowException:
        pass  # created by an earlier call
    for exp in mlflow.MlflowClient().search_experiments():
        try:
            auth.grant_user_permission("gate", "experiment", exp.experiment_id, "EDIT")
        except mlflow.exceptions.MlflowException:
            pass
    try:
        auth.grant_user_permission("gate", "registered_model", MODEL, "MANAGE")
    except mlflow.exceptions.MlflowException:
        pass
    loose = dict(min_auroc=0.0, min_sensitivity=0.0, auroc_margin=1.0, sensitivity_tolerance=1.0,
                 ece_tolerance=1.0)
    return _as("gate", "gate-pw-12345", os.environ["MLFLOW_TRACKING_URI"]).call(
        gate_step, GateConfig(artifact_root=art, run_id=run, **{**loose, **rules}))


def _promote(art: str):
    from fracture_ops.registry.promotion import PromotionConfig, promote_if_approved

    return promote_if_approved(PromotionConfig(artifact_root=art, approvers=APPROVERS))


def _audit(art: str) -> list[dict]:
    from fracture_ops.registry.promotion import read_audit

    return read_audit(storage.join(art, "registry", "audit"))


def test_approval_gate_promotion_rollback_and_auth(server, versions):
    import mlflow
    from mlflow.server import get_app_client

    v1, v2, v3 = versions["versions"]
    art = versions["art"]
    client = mlflow.MlflowClient()
    assert [v1, v2, v3] == ["1", "2", "3"]
    # v1 is today's champion (set up by an administrator before this story starts, who adopts
    # it into the audit: a champion the audit does not know would be reverted)
    from fracture_ops.registry.promotion import PromotionConfig, adopt

    client.set_registered_model_alias(MODEL, "champion", v1)
    assert adopt(PromotionConfig(artifact_root=art))["version"] == v1
    # the training run of v2: registered as challenger, gated against the champion on one test set
    client.set_registered_model_alias(MODEL, "challenger", v2)
    gate = _gate("b", art)
    assert gate["gate"] == "passed" and gate["champion_version"] == v1
    evidence = storage.read_json(gate["evidence_uri"])
    assert evidence["champion"]["version"] == v1 and evidence["n_test"] > 0
    # no approval yet: several promotion passes change nothing
    for _ in range(3):
        assert _promote(art)["action"] == "none"
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1
    assert [r["action"] for r in _audit(art)] == ["adopted"]
    # basic auth: a READ-only user cannot set the approval tag; alice (MANAGE) can
    auth = get_app_client("fracture-ops", tracking_uri=server["url"])
    auth.create_user("reader", "reader-pw-123")
    auth.create_user("alice", "alice-pw-123")
    auth.create_user("mallory", "mallory-pw-12")
    auth.grant_user_permission("alice", "registered_model", MODEL, "MANAGE")
    auth.grant_user_permission("mallory", "registered_model", MODEL, "MANAGE")
    reader = _as("reader", "reader-pw-123", server["url"])
    with pytest.raises(mlflow.exceptions.MlflowException, match="(?i)permission"):
        reader.set_model_version_tag(MODEL, v2, "approval", "approved")
    assert client.get_model_version(MODEL, v2).tags.get("approval") == "pending"
    # a user off the approvers list cannot approve at all: the server refuses the tag
    mallory = _as("mallory", "mallory-pw-12", server["url"])
    with pytest.raises(mlflow.exceptions.MlflowException, match="approvers list"):
        mallory.set_model_version_tag(MODEL, v2, "approval", "approved")
    # typing someone else's name proves nothing; nobody can write the server's stamp
    mallory.set_model_version_tag(MODEL, v2, "approved_by", "alice")
    from fracture_ops.registry.approval_app import STAMP

    alice = _as("alice", "alice-pw-123", server["url"])
    for who in (mallory, alice, client):  # admin included
        with pytest.raises(mlflow.exceptions.MlflowException, match="server only"):
            who.set_model_version_tag(MODEL, v2, STAMP, "alice")
        with pytest.raises(mlflow.exceptions.MlflowException, match="server only"):
            who.delete_model_version_tag(MODEL, v2, STAMP)
    assert _promote(art)["reason"] == "awaiting approval"
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1
    # alice approves: the server stamps her name; v2 becomes champion, v1 is tagged
    alice.set_model_version_tag(MODEL, v2, "approval", "approved")
    assert client.get_model_version(MODEL, v2).tags[STAMP] == "alice"
    result = _promote(art)
    assert result == {"action": "promoted", "version": v2, "previous_version": v1, "approved_by": "alice"}
    assert client.get_model_version_by_alias(MODEL, "champion").version == v2
    old = client.get_model_version(MODEL, v1).tags
    assert old["superseded_by"] == v2 and "retired_at" in old
    promoted = [r for r in _audit(art) if r["action"] == "promoted"]
    assert len(promoted) == 1 and promoted[0]["version"] == v2 and promoted[0]["previous_version"] == v1
    # idempotent: running again changes nothing
    before = (_audit(art), client.get_model_version(MODEL, v2).tags)
    assert _promote(art)["action"] == "none"
    assert (_audit(art), client.get_model_version(MODEL, v2).tags) == before
    # a gate-failed version with an approval tag is refused
    client.set_registered_model_alias(MODEL, "challenger", v3)
    # in the cluster a gate without a pinned reference test set passes nothing, however good
    strict = _gate("c", art, require_reference_test=True)
    assert strict["gate"] == "failed" and any("no pinned reference" in r for r in strict["reasons"])
    assert _gate("c", art, min_auroc=1.01)["gate"] == "failed"
    alice.set_model_version_tag(MODEL, v3, "approval", "approved")
    assert "gate verdict" in _promote(art)["reason"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == v2
    # typing gate=passed by hand is refused (the gate's tags are the gate identity's), and the
    # evidence artifact is re-read anyway
    with pytest.raises(mlflow.exceptions.MlflowException, match="gate identity"):
        alice.set_model_version_tag(MODEL, v3, "gate", "passed")
    assert "gate verdict" in _promote(art)["reason"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == v2
    # rollback restores the previous champion, with an audit record
    from fracture_ops.registry.promotion import rollback

    assert rollback(PromotionConfig(artifact_root=art))["version"] == v1
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1
    assert _audit(art)[-1]["action"] == "rolled_back"


def test_model_card_attached_to_version(server, versions):
    import mlflow

    client = mlflow.MlflowClient()
    v = client.get_model_version(MODEL, versions["versions"][0])
    assert "Research and education only" in v.description and "Patient-wise split" in v.description
    html = client.download_artifacts(v.run_id, "model_card/model_card.html", str(versions["art"]))
    text = open(html).read()
    for heading in ("Intended use", "Data sources and licences", "Test metrics", "Thresholds",
                    "Calibration", "Known limitations"):
        assert heading in text


def test_only_the_promoter_moves_the_champion(server, versions):
    """Separate identities: reviewers approve, the pipeline proposes (challenger), only the
    promoter moves the champion or removes versions, whatever MLflow permission the others hold."""
    import mlflow
    from mlflow.server import get_app_client

    v1, _, v3 = versions["versions"]
    client = mlflow.MlflowClient()
    auth = get_app_client("fracture-ops", tracking_uri=server["url"])
    auth.create_user("promoter", "promoter-pw-1234")
    # MANAGE, as the account that created the model holds it (the pipeline created it)
    auth.grant_user_permission("promoter", "registered_model", MODEL, "MANAGE")
    pipeline = _as("pipeline", "pipeline-pw-1234", server["url"])
    promoter = _as("promoter", "promoter-pw-1234", server["url"])
    alice = _as("alice", "alice-pw-123", server["url"])  # reviewer with MANAGE
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    pipeline.set_registered_model_alias(MODEL, "challenger", v3)  # the pipeline proposes
    assert client.get_model_version_by_alias(MODEL, "challenger").version == v3
    for who in (pipeline, alice):
        for alias in ("champion", "Champion", "CHAMPION"):
            with pytest.raises(mlflow.exceptions.MlflowException, match="promoter identity"):
                who.set_registered_model_alias(MODEL, alias, v3)
        with pytest.raises(mlflow.exceptions.MlflowException, match="promoter identity"):
            who.delete_registered_model_alias(MODEL, "champion")
        with pytest.raises(mlflow.exceptions.MlflowException, match="promoter identity"):
            who.delete_model_version(MODEL, champion)
        with pytest.raises(mlflow.exceptions.MlflowException, match="promoter identity"):
            who.rename_registered_model(MODEL, "elsewhere")
        with pytest.raises(mlflow.exceptions.MlflowException, match="promoter identity"):
            who.delete_registered_model(MODEL)
    with pytest.raises(mlflow.exceptions.MlflowException, match="promoter identity"):
        alice.set_registered_model_alias(MODEL, "challenger", v1)  # reviewers do not propose
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    assert client.get_model_version_by_alias(MODEL, "challenger").version == v3
    assert client.get_registered_model(MODEL).name == MODEL
    # other aliases stay ordinary EDIT work
    pipeline.set_registered_model_alias(MODEL, "candidate", v3)
    pipeline.delete_registered_model_alias(MODEL, "candidate")
    # the promoter may
    promoter.set_registered_model_alias(MODEL, "champion", v3)
    assert client.get_model_version_by_alias(MODEL, "champion").version == v3
    promoter.set_registered_model_alias(MODEL, "champion", champion)


def _as(user: str, password: str, url: str):
    """An MlflowClient that authenticates as ``user`` (basic auth reads these from the env)."""
    import mlflow

    return _EnvClient(mlflow.MlflowClient(tracking_uri=url), user, password)


class _EnvClient:
    """Runs each call with this user's credentials, then restores the admin's."""

    def __init__(self, client, user, password):
        self.client, self.user, self.password = client, user, password

    def call(self, fn, *a, **k):
        saved = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = self.user, self.password
        try:
            return fn(*a, **k)
        finally:
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = saved

    def __getattr__(self, name):
        fn = getattr(self.client, name)
        return lambda *a, **k: self.call(fn, *a, **k)


def test_decide_rules_are_pure_and_strict():
    from fracture_ops.registry.promotion import decide

    ok = {"approval": "approved", "approved_by": "alice", "gate": "passed", "gate.champion_version": "1"}
    assert decide(ok, ["alice"], "1") == (True, "approved and gate passed")
    assert not decide(ok, ["alice"], "2")[0]  # gated against a champion that is gone
    assert not decide({**ok, "gate.champion_version": "none"}, ["alice"], "1")[0]
    assert not decide(ok, ["bob"], "1")[0]
    assert not decide({**ok, "approval": "rejected"}, ["alice"], "1")[0]
    assert not decide({**ok, "rolled_back_at": "t"}, ["alice"], "1")[0]
    assert not decide({**ok, "approved_by": ""}, ["alice"], "1")[0]
    # against a remote server only the server's stamp counts, not a typed name
    from fracture_ops.registry.approval_app import STAMP

    assert "no server stamp" in decide(ok, ["alice"], "1", require_stamp=True)[1]
    assert decide({**ok, "approved_by": "", STAMP: "alice"}, ["alice"], "1",
                  require_stamp=True)[0]
    assert not decide({**ok, STAMP: "mallory"}, ["alice"], "1", require_stamp=True)[0]
