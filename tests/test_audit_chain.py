"""The registry audit is a hash chain: an edited, deleted, reordered or inserted record is
detected on local and S3 stores, a truncated tail or a forged append shows against the anchored
head, and `fracture-ops registry verify-audit` exits 3 on each."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fracture_ops import storage
from fracture_ops.registry import audit

MODEL = "fracture-classifier"


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "audit")
    request.getfixturevalue("s3")
    return f"s3://fo-test/audit-{tmp_path.name}"


def _chain(folder: str, n: int = 5) -> list[dict]:
    return [audit.append(folder, {"action": "refused", "model": MODEL, "version": str(i)})
            for i in range(n)]


def _uri(folder: str, seq: int) -> str:
    return storage.join(folder, audit.record_name(seq))


def test_an_intact_chain_verifies_in_its_own_order(folder):
    records = _chain(folder)
    log = audit.read(folder)
    assert log.ok and [r["seq"] for r in log.records] == [0, 1, 2, 3, 4]
    assert log.head == audit.head_of(records[-1])
    assert audit.anchor_problem(log, MODEL, audit.head_of(records[-1])) is None


def test_an_edited_record_is_detected(folder):
    _chain(folder)
    rec = json.loads(storage.read_bytes(_uri(folder, 2)))
    rec["version"] = "99"  # e.g. a refusal rewritten as another version's
    storage.write_bytes(_uri(folder, 2), audit.encode(rec))
    log = audit.read(folder)
    assert not log.ok and "record 3 does not follow record 2" in log.problems[0]
    with pytest.raises(audit.AuditBroken):
        audit.append(folder, {"action": "refused", "model": MODEL})


def test_a_deleted_record_is_detected(folder):
    _chain(folder)
    storage.delete(_uri(folder, 1))
    log = audit.read(folder)
    assert "record 1 is missing" in log.problems[0]


def test_reordered_records_are_detected(folder):
    _chain(folder)
    a, b = storage.read_bytes(_uri(folder, 1)), storage.read_bytes(_uri(folder, 3))
    storage.write_bytes(_uri(folder, 1), b)
    storage.write_bytes(_uri(folder, 3), a)
    problems = audit.read(folder).problems
    assert any("record 1 names itself 3" in p for p in problems)
    assert any("does not follow" in p for p in problems)


def test_an_inserted_record_is_detected(folder):
    """Inserted with a future timestamp (the attack of the issue), under a free name, and
    in the chain's own naming with a well-formed link: each is found."""
    _chain(folder)
    forged = {"action": "adopted", "model": MODEL, "version": "2", "ts": "9999-12-31T00:00:00"}
    storage.write_bytes(storage.join(folder, "99991231T000000Z-adopted-0.json"), audit.encode(forged))
    assert "not a record of the chain" in audit.read(folder).problems[0]
    storage.delete(storage.join(folder, "99991231T000000Z-adopted-0.json"))
    # squeezed between records 2 and 3 under 3's name, everything after shifted by one
    tail = [storage.read_bytes(_uri(folder, s)) for s in (3, 4)]
    prev = audit.digest(storage.read_bytes(_uri(folder, 2)))
    storage.write_bytes(_uri(folder, 3), audit.encode({**forged, "seq": 3, "prev": prev}))
    for i, data in enumerate(tail):
        storage.write_bytes(_uri(folder, 4 + i), data)
    problems = audit.read(folder).problems
    assert any("record 4 names itself 3" in p or "record 4 does not follow" in p for p in problems)


def test_a_well_linked_forged_append_or_a_truncated_tail_shows_against_the_anchor(folder):
    records = _chain(folder, 3)
    anchor = audit.head_of(records[-1])
    # someone with write access to the store appends a perfectly linked record
    audit.append(folder, {"action": "adopted", "model": MODEL, "version": "2"})
    log = audit.read(folder)
    assert log.ok  # the links alone cannot tell
    assert "follows its anchored head" in audit.anchor_problem(log, MODEL, anchor)
    # a record about another model after the anchor is that model's business
    storage.delete(_uri(folder, 3))
    audit.append(folder, {"action": "refused", "model": "fracture-detector", "version": "1"})
    assert audit.anchor_problem(audit.read(folder), MODEL, anchor) is None
    # the newest record removed: the anchor names a record that is gone
    storage.delete(_uri(folder, 3))
    storage.delete(_uri(folder, 2))
    assert "not in the chain as anchored" in audit.anchor_problem(audit.read(folder), MODEL, anchor)
    # records about the model but no anchor at all
    assert "no anchored head" in audit.anchor_problem(audit.read(folder), MODEL, None)


def test_verify_audit_command_exits_3_on_a_broken_chain(tmp_path):
    art = tmp_path / "art"
    folder = storage.join(str(art), "registry", "audit")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": ""}
    cmd = [sys.executable, "-m", "fracture_ops.cli", "registry", "verify-audit",
           "--artifact-root", str(art)]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    _chain(folder, 2)
    storage.delete(_uri(folder, 0))
    broken = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert broken.returncode == 3
    assert "record 0 is missing" in broken.stderr + broken.stdout
