"""Registry attacks by people who hold EDIT on the model, each against MLflow's own registry (the
embedded SQLite store): a hand-set champion, forged gate evidence, another test set, registry
errors, edited rollback tags, a corrupt audit record, concurrent audit writers, a pickle-bomb
checkpoint. Each attack must fail and be audited where the issue asks for it."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from fracture_ops.errors import RegistryUnavailable, UnsafeModelFile

MODEL = "fracture-classifier"


@pytest.fixture
def reg(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("FRACTURE_OPS_AUDIT_URI", raising=False)
    monkeypatch.delenv("FRACTURE_OPS_REFERENCE_TEST_HASH", raising=False)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    client.create_registered_model(MODEL)
    exp = client.create_experiment("gates", artifact_location=(tmp_path / "mlartifacts").as_uri())
    yield SimpleNamespace(client=client, exp=exp, art=str(tmp_path / "art"), tmp=tmp_path)
    mlflow.set_tracking_uri(None)


def _version(reg, *, champion: str = "none", tags: dict | None = None, **evidence) -> str:
    """A registered version whose training run holds gate evidence (passed, against
    ``champion``, 50 test images of set "h1" unless overridden) and approval tags."""
    run = reg.client.create_run(reg.exp)
    mv = reg.client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id)
    doc = {"passed": True, "reasons": [], "model": MODEL, "challenger_version": str(mv.version),
           "champion_version": champion, "n_test": 50, "test_set_hash": "h1"} | evidence
    reg.client.log_dict(run.info.run_id, doc, "gate/gate.json")
    for k, v in ({"approval": "approved", "approved_by": "alice", "gate": "passed",
                  "gate.champion_version": champion} | (tags or {})).items():
        reg.client.set_model_version_tag(MODEL, mv.version, k, v)
    return str(mv.version)  # the SQLite store answers ints, the REST API strings


def _cfg(reg, **kw):
    from fracture_ops.registry.promotion import PromotionConfig

    return PromotionConfig(artifact_root=reg.art, approvers=["alice"], **kw)


def _promote(reg, client=None, **kw):
    from fracture_ops.registry.promotion import promote_if_approved

    return promote_if_approved(_cfg(reg, **kw), client or reg.client)


def _audit(reg) -> list[dict]:
    from fracture_ops.registry.promotion import read_audit

    return read_audit(_cfg(reg).audit_path())


def _champion(reg) -> str | None:
    from fracture_ops.registry.client import alias_version

    v = alias_version(reg.client, MODEL, "champion")
    return str(v.version) if v else None


def _challenge(reg, version: str) -> None:
    reg.client.set_registered_model_alias(MODEL, "challenger", version)


def test_an_approved_gated_challenger_is_promoted_with_intent_and_record(reg):
    v1 = _version(reg)
    _challenge(reg, v1)
    assert _promote(reg)["action"] == "promoted" and _champion(reg) == v1
    assert [r["action"] for r in _audit(reg)] == ["promoting", "promoted"]
    assert _promote(reg)["action"] == "none"  # idempotent
    assert len(_audit(reg)) == 2


def test_a_hand_set_champion_is_reverted_and_audited(reg):
    v1 = _version(reg)
    _challenge(reg, v1)
    _promote(reg)
    v2 = _version(reg, champion=v1, tags={"approval": "pending"})
    reg.client.set_registered_model_alias(MODEL, "champion", v2)  # a reviewer with EDIT
    _promote(reg)
    assert _champion(reg) == v1
    reverted = [r for r in _audit(reg) if r["action"] == "champion_reverted"]
    assert len(reverted) == 1 and reverted[0]["found_version"] == v2 and reverted[0]["version"] == v1


def test_a_hand_set_first_champion_is_removed(reg):
    v1 = _version(reg, tags={"approval": "pending"})
    reg.client.set_registered_model_alias(MODEL, "champion", v1)
    _challenge(reg, v1)
    _promote(reg)
    assert _champion(reg) is None
    assert [r["action"] for r in _audit(reg)] == ["champion_reverted"]


def test_freeze_mode_refuses_everything_until_a_person_restores_it(reg):
    v1 = _version(reg)
    _challenge(reg, v1)
    _promote(reg)
    v2 = _version(reg, champion=v1, tags={"approval": "pending"})
    reg.client.set_registered_model_alias(MODEL, "champion", v2)
    v3 = _version(reg, champion=v1)
    _challenge(reg, v3)
    for _ in range(2):
        out = _promote(reg, on_champion_drift="freeze")
        assert out["action"] == "none" and "frozen" in out["reason"]
    assert _champion(reg) == v2  # untouched while frozen, and v3 not promoted
    assert len([r for r in _audit(reg) if r["action"] == "frozen"]) == 1  # audited once
    reg.client.set_registered_model_alias(MODEL, "champion", v1)  # a person restores it
    assert _promote(reg, on_champion_drift="freeze")["action"] == "promoted"
    assert _champion(reg) == v3


def test_adopting_the_current_champion_is_a_persons_audited_act(reg):
    from fracture_ops.registry.promotion import adopt

    v1 = _version(reg, tags={"approval": "pending"})
    reg.client.set_registered_model_alias(MODEL, "champion", v1)
    assert adopt(_cfg(reg, actor="carol"), reg.client) == {"action": "adopted", "version": v1}
    _promote(reg)
    assert _champion(reg) == v1
    assert _audit(reg)[0]["actor"] == "carol"


def test_a_forged_evidence_tag_is_ignored(reg):
    v1 = _version(reg, passed=False)  # the gate failed it
    forged = reg.tmp / "forged.json"
    forged.write_text(json.dumps({"passed": True, "challenger_version": v1, "model": MODEL,
                                  "champion_version": "none", "n_test": 500,
                                  "test_set_hash": "h1"}))
    reg.client.set_model_version_tag(MODEL, v1, "gate.evidence", forged.as_uri())
    _challenge(reg, v1)
    out = _promote(reg)
    assert out["action"] == "none" and "does not show this version passing" in out["reason"]
    assert _champion(reg) is None


def test_evidence_against_another_champion_is_refused_whatever_the_tags_say(reg):
    v1 = _version(reg)
    _challenge(reg, v1)
    _promote(reg)
    # gated when there was no champion; the tag is edited to claim the gate saw v1
    v2 = _version(reg, champion="none", tags={"gate.champion_version": v1})
    _challenge(reg, v2)
    out = _promote(reg)
    assert "compared against champion none" in out["reason"] and _champion(reg) == v1
    assert any(r["action"] == "refused" and r["version"] == v2 for r in _audit(reg))


@pytest.mark.parametrize("evidence,cfg,reason", [
    ({"test_set_hash": "own"}, {"reference_test_hash": "pinned"}, "another test set"),
    ({"n_test": 3}, {}, "rests on 3 test images"),
    ({"model": "other-model"}, {}, "is about model"),
])
def test_evidence_on_the_wrong_test_set_or_model_is_refused(reg, evidence, cfg, reason):
    v1 = _version(reg, **evidence)
    _challenge(reg, v1)
    out = _promote(reg, **cfg)
    assert reason in out["reason"] and _champion(reg) is None


class _FailingClient:
    """The real client, except that alias lookups fail the way a 403 or a timeout does."""

    def __init__(self, client, exc):
        self.client, self.exc = client, exc

    def get_model_version_by_alias(self, name, alias):
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.mark.parametrize("make_exc", [
    lambda: __import__("mlflow").exceptions.MlflowException("denied", error_code="PERMISSION_DENIED"),
    lambda: __import__("mlflow").exceptions.MlflowException("boom", error_code="INTERNAL_ERROR"),
    lambda: ConnectionError("read timed out"),
], ids=["403", "500", "timeout"])
def test_a_registry_that_cannot_be_read_fails_the_task_and_promotes_nothing(reg, make_exc):
    from fracture_ops.registry.gate import GateConfig  # noqa: F401 - the gate shares the lookup
    from fracture_ops.registry.client import alias_version

    v1 = _version(reg)
    _challenge(reg, v1)
    with pytest.raises(RegistryUnavailable):
        _promote(reg, client=_FailingClient(reg.client, make_exc()))
    assert _champion(reg) is None and _audit(reg) == []
    # a missing alias, and only that, reads as "none"
    assert alias_version(reg.client, MODEL, "champion") is None
    assert alias_version(reg.client, "no-such-model", "champion") is None


def test_rollback_follows_the_audit_not_the_tags(reg):
    from fracture_ops.registry.promotion import rollback

    v1 = _version(reg)
    _challenge(reg, v1)
    _promote(reg)
    v2 = _version(reg, champion=v1)
    _challenge(reg, v2)
    _promote(reg)
    v3 = _version(reg, tags={"approval": "rejected"})
    reg.client.set_model_version_tag(MODEL, v2, "promoted_from", v3)  # edited to a rejected one
    assert rollback(_cfg(reg), reg.client)["version"] == v1
    assert _champion(reg) == v1
    # deleting rolled_back_at does not let the rolled-back version back in
    reg.client.delete_model_version_tag(MODEL, v2, "rolled_back_at")
    _challenge(reg, v2)
    out = _promote(reg)
    assert "rolled back" in out["reason"] and _champion(reg) == v1


def test_a_corrupt_or_inserted_audit_record_freezes_promotion(reg):
    """Deny by default: an audit that does not verify is never read around; promotion stops
    (exit 3), writes nothing, and the champion stays."""
    from fracture_ops.errors import EXIT_BAD_INPUT
    from fracture_ops.registry import audit

    v1 = _version(reg)
    _challenge(reg, v1)
    assert _promote(reg)["action"] == "promoted"
    v2 = _version(reg, champion=v1)
    _challenge(reg, v2)
    folder = Path(_cfg(reg).audit_path())
    before = sorted(p.name for p in folder.iterdir())
    for name, text in (("20260101T000000Z-promoted-broken.json", "{not json"),
                       (audit.record_name(2), '["a list"]')):
        (folder / name).write_text(text)
        with pytest.raises(audit.AuditBroken, match="does not verify") as exc:
            _promote(reg)
        assert exc.value.exit_code == EXIT_BAD_INPUT
        assert _champion(reg) == v1
        (folder / name).unlink()
        assert sorted(p.name for p in folder.iterdir()) == before
    assert _promote(reg)["action"] == "promoted" and _champion(reg) == v2


def _write_records(folder: str, who: str, n: int) -> None:
    from fracture_ops.registry import audit

    for i in range(n):
        audit.append(folder, {"action": "refused", "model": MODEL, "version": f"{who}-{i}"})


def test_fifty_concurrent_audit_writers_lose_no_record(tmp_path):
    """25 threads and 25 processes, one record each, at once: 50 records."""
    from fracture_ops.registry import audit

    folder = str(tmp_path / "audit")
    threads = [threading.Thread(target=_write_records, args=(folder, f"t{i}", 1)) for i in range(25)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_records, args=(folder, f"p{i}", 1)) for i in range(25)]
    for w in threads + procs:
        w.start()
    for w in threads + procs:
        w.join()
    records = audit.read(folder).records
    assert len(records) == 50
    assert {r["version"] for r in records} == {f"t{i}-0" for i in range(25)} | {f"p{i}-0" for i in range(25)}


def test_fifty_concurrent_audit_writers_on_s3_lose_no_record(s3):
    from fracture_ops.registry import audit

    folder = "s3://fo-test/registry/audit"
    threads = [threading.Thread(target=_write_records, args=(folder, f"t{i}", 1)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(audit.read(folder).records) == 50


def test_the_audit_location_is_deployment_config_not_a_trigger_param(monkeypatch, tmp_path):
    from fracture_ops.registry.promotion import PromotionConfig

    monkeypatch.setenv("FRACTURE_OPS_AUDIT_URI", str(tmp_path / "audit-store"))
    cfg = PromotionConfig(artifact_root=str(tmp_path / "anything-a-trigger-says"))
    assert cfg.audit_path() == str(tmp_path / "audit-store")
    from fracture_ops.orchestration.specs import PROMOTION_STEPS

    assert not [a for a in PROMOTION_STEPS["promote"].args if "audit" in a]


# ------------------------------------------------------------------ model files

class _Bomb:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_bomb_checkpoint_is_refused_at_every_load(tmp_path):
    import torch

    from fracture_ops.model.gradcam import load_classifier
    from fracture_ops.model.checkpoint import load_weights
    from fracture_ops.training.loop import Checkpointer

    marker = tmp_path / "pwned"
    bomb = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "info": _Bomb(str(marker)), "transform": {}}, bomb)
    with pytest.raises(UnsafeModelFile):
        load_weights(bomb)
    with pytest.raises(UnsafeModelFile):
        load_classifier(str(bomb))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": _Bomb(str(marker))}, ckpt / "last.pt")
    with pytest.raises(UnsafeModelFile):
        Checkpointer(ckpt).restore(torch.nn.Linear(1, 1), None, None, None)
    assert not marker.exists()
    # the control: plain torch.load would have run it
    torch.load(bomb, weights_only=False)
    assert marker.exists()


def test_checkpoints_this_package_writes_load_safely_and_restore_rng(tmp_path):
    import random

    import numpy as np
    import torch

    from fracture_ops.training.loop import Checkpointer, LoopState

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = LoopState()
    state.best_score = np.float64(0.7)  # numpy scalars are stored as plain numbers
    Checkpointer(tmp_path).save("last.pt", model, opt, sched, None, state)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restored = Checkpointer(tmp_path).restore(model, opt, sched, None)
    assert restored.best_score == pytest.approx(0.7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ------------------------------------------------------------------ the gate's test set

def test_the_test_set_hash_covers_the_images_not_only_ids_and_labels(tmp_path):
    import pandas as pd

    from fracture_ops.registry.gate import test_set_hash

    def table(folder, payloads):
        folder.mkdir()
        rows = []
        for i, data in enumerate(payloads):
            (folder / f"{i}.png").write_bytes(data)
            rows.append({"image_id": f"img{i}", "label": "fracture" if i % 2 else "normal",
                         "image_uri": str(folder / f"{i}.png")})
        return pd.DataFrame(rows)

    a = table(tmp_path / "a", [b"one", b"two", b"three"])
    same = table(tmp_path / "same", [b"one", b"two", b"three"])
    other = table(tmp_path / "other", [b"one", b"TWO", b"three"])
    assert test_set_hash(a) == test_set_hash(same)  # where the files lie does not matter
    assert test_set_hash(a) != test_set_hash(other)  # same ids and labels, another image
    relabelled = a.assign(label=["fracture", "fracture", "normal"])
    assert test_set_hash(a) != test_set_hash(relabelled)


@pytest.mark.parametrize("env, required", [({"FRACTURE_OPS_RUNNER": "kubernetes"}, True),
                                           ({}, False),
                                           ({"FRACTURE_OPS_RUNNER": "kubernetes",
                                             "FRACTURE_OPS_REQUIRE_REFERENCE_TEST": "false"}, False)])
def test_in_the_cluster_a_gate_without_a_pinned_reference_set_is_required(monkeypatch, env, required):
    """The gpu profile's home (pods) refuses to pass anything scored on the challenger's own
    split; the local demo opts out (its evidence says so)."""
    from fracture_ops.registry.gate import GateConfig

    for k in ("FRACTURE_OPS_RUNNER", "FRACTURE_OPS_REQUIRE_REFERENCE_TEST",
              "FRACTURE_OPS_REFERENCE_TEST_URI"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert GateConfig().require_reference_test is required


def test_every_step_pod_says_it_runs_in_the_cluster():
    from fracture_ops.orchestration.pods import PodSettings, step_environment

    env = {e.name: e.value for e in step_environment(PodSettings())}
    assert env["FRACTURE_OPS_RUNNER"] == "kubernetes"


def test_an_approval_signature_binds_files_and_statement_and_the_key_may_be_pem_text(tmp_path):
    """model-signing over the folder plus the approval statement: another byte, another file
    (.git ones included), another approver or version, or another key: no longer verifies."""
    from tests.services import signing_keys

    from fracture_ops.registry import signing

    priv, pub = signing_keys(tmp_path)
    stmt = signing.statement("m", "3", "alice", "2026-12-07T00:00:00+00:00")

    def folder(name, extra=None):
        d = tmp_path / name
        d.mkdir()
        (d / "model.pt").write_bytes(b"weights")
        (d / "MLmodel").write_text("flavors: {}\n")
        for rel, data in (extra or {}).items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        return d

    bundle = signing.sign_folder(folder("signed"), stmt, priv)
    pem_text = (tmp_path / "approval-pub.pem").read_text()
    signing.verify_folder(folder("same"), stmt, bundle, signing.public_key(pem_text))
    cases = {"byte": (folder("byte", {"model.pt": b"weightz"}), stmt),
             "git": (folder("git", {".git/config": b"x"}), stmt),
             "approver": (folder("approver"), signing.statement("m", "3", "mallory", "2026-12-07T00:00:00+00:00")),
             "version": (folder("version"), signing.statement("m", "4", "alice", "2026-12-07T00:00:00+00:00"))}
    for d, s in cases.values():
        with pytest.raises(signing.SignatureInvalid, match="does not verify"):
            signing.verify_folder(d, s, bundle, pub)
    (tmp_path / "other").mkdir()
    _, other_pub = signing_keys(tmp_path / "other")
    with pytest.raises(signing.SignatureInvalid):
        signing.verify_folder(folder("otherkey"), stmt, bundle, other_pub)
    with pytest.raises(signing.SignatureInvalid, match="no signature"):
        signing.verify_folder(folder("unsigned"), stmt, "", pub)
