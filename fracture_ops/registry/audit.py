"""The registry's audit: a hash chain of records, each its own object, written once.

Record ``n`` is the object ``<n, 12 digits>.json`` under the audit location. It holds ``seq`` (=
``n``) and ``prev``, the SHA-256 of record ``n-1``'s exact bytes (64 zeros for the first), beside
its fields and a ``ts`` for people to read. Order is the chain's, never a timestamp inside a
record. A record is written with an exclusive create (a hard link locally, ``If-None-Match: *``
on S3), so concurrent writers never overwrite each other: the one that loses the race re-reads
the chain and appends after the winner.

What the chain shows: an edited record breaks the link from the record after it; a deleted one
leaves a gap; a renamed or reordered one names another sequence number than its place; an
inserted object is not a record of the chain. The tip is anchored outside the audit store (the
promoter writes ``seq:digest`` of the newest record as the registered model's ``audit.head``
tag, which only the promoter may set), so a truncated tail or a record appended by someone else
shows too. A broken chain freezes promotion (:class:`AuditBroken`, exit 3); nothing repairs it
automatically: a person investigates (``fracture-ops registry verify-audit``).

The location comes from deployment configuration (``$FRACTURE_OPS_AUDIT_URI``; embedded default
``<artifact_root>/registry/audit``), never from a trigger parameter; in a cluster only the
promoter's credentials may write it (see ``infra/``).

The audit is the registry's source of truth for who is champion (:func:`audited_champion`) and
what was rolled back; tags on model versions are for people to read, not for decisions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fracture_ops import storage
from fracture_ops.errors import BadInputError
from fracture_ops import envvars

log = logging.getLogger(__name__)
AUDIT_ENV = envvars.AUDIT_URI
GENESIS = "0" * 64
_NAME = re.compile(r"^(\d{12})\.json$")


class AuditBroken(BadInputError):
    """The audit chain does not verify: promotion is frozen until a person investigates."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def record_name(seq: int) -> str:
    return f"{seq:012d}.json"


def encode(record: dict) -> bytes:
    """The exact bytes a record is stored (and hashed) as."""
    return (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class AuditLog:
    """The chain's records in order, the problems found, and the tip (``seq:digest``)."""

    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    head: str | None = None
    digests: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _basename(uri: str) -> str:
    return uri.replace("\\", "/").rsplit("/", 1)[-1]


def read(folder: str) -> AuditLog:
    """Read and verify the chain under ``folder``.

    Records are returned up to the first problem; every problem found is listed.
    """
    out = AuditLog()
    objects: dict[int, str] = {}
    for uri in storage.list_files(folder):
        name = _basename(uri)
        if name.startswith(".") and name.endswith(".tmp"):
            continue  # a writer's temporary file, not yet (or never) a record
        m = _NAME.match(name)
        if not m:
            out.problems.append(f"{name}: not a record of the chain (inserted or foreign object)")
            continue
        objects[int(m.group(1))] = uri
    prev, broken = GENESIS, False
    for seq in range(max(objects, default=-1) + 1):
        uri = objects.get(seq)
        if uri is None:
            out.problems.append(f"record {seq} is missing (deleted)")
            broken = True
            continue
        data = storage.read_bytes(uri)
        try:
            rec = json.loads(data)
            if not isinstance(rec, dict) or not isinstance(rec.get("action"), str):
                raise ValueError("not an audit record")
        except ValueError:
            out.problems.append(f"record {seq} cannot be read as an audit record")
            broken, prev = True, digest(data)
            continue
        if rec.get("seq") != seq:
            out.problems.append(f"record {seq} names itself {rec.get('seq')!r} (moved or reordered)")
            broken = True
        if rec.get("prev") != prev:
            out.problems.append(f"record {seq} does not follow record {seq - 1} "
                                "(that record, or this one, was edited, replaced or reordered)")
            broken = True
        prev = digest(data)
        if not broken:
            out.records.append(rec)
            out.digests.append(prev)
            out.head = f"{seq}:{prev}"
    for problem in out.problems:
        log.warning("audit %s: %s", folder, problem)
    return out


def _tip(folder: str) -> tuple[int, str]:
    """(next sequence number, digest of the newest record): one listing and one read."""
    seqs = [int(m.group(1)) for m in (_NAME.match(_basename(u)) for u in storage.list_files(folder))
            if m]
    if not seqs:
        return 0, GENESIS
    last = max(seqs)
    return last + 1, digest(storage.read_bytes(storage.join(folder, record_name(last))))


def append(folder: str, record: dict, attempts: int = 500) -> dict:
    """Append one record after the chain's tip (exclusive create; retried after a lost race).

    The whole chain is verified once; after a lost race only the new tip is read (the records
    other writers added meanwhile are verified by every later reader).

    Raises:
        AuditBroken: the chain does not verify (nothing is written on a broken chain).
    """
    chain = read(folder)
    if chain.problems:
        raise AuditBroken(f"audit {folder} is broken: {chain.problems[0]}")
    seq = len(chain.records)
    prev = chain.head.split(":", 1)[1] if chain.head else GENESIS
    for attempt in range(attempts):
        rec = {"ts": now(), **{k: v for k, v in record.items() if k not in ("seq", "prev")},
               "seq": seq, "prev": prev}
        if storage.create_bytes(storage.join(folder, record_name(seq)), encode(rec)):
            log.info("audit: %s", rec)
            return rec
        time.sleep(random.uniform(0, 0.005 * min(attempt + 1, 20)))  # spread the contenders
        seq, prev = _tip(folder)
    raise RuntimeError(f"audit {folder}: could not append after {attempts} attempts")


def head_of(record: dict) -> str:
    """The ``seq:digest`` anchor naming ``record`` as a model's newest record."""
    return f"{record['seq']}:{digest(encode(record))}"


def anchor_problem(chain: AuditLog, model: str, anchor: str | None) -> str | None:
    """Check ``model``'s records against its anchor (``seq:digest`` of its newest record, kept
    outside the audit store); None when they agree.

    The anchored record must be in the chain with that digest, and no record about ``model``
    may follow it: a truncated tail, or a record appended by someone other than the promoter
    (who alone sets the anchor), shows here even when the links are intact.
    """
    mine = [i for i, r in enumerate(chain.records) if r.get("model") == model]
    if not anchor:
        return (f"{len(mine)} audit records about {model} but no anchored head: records were "
                "added to the audit outside promotion" if mine else None)
    try:
        seq_text, want = anchor.split(":", 1)
        seq = int(seq_text)
    except ValueError:
        return f"the anchored head {anchor!r} of {model} is malformed"
    if seq >= len(chain.records) or chain.digests[seq] != want:
        return (f"the anchored head of {model} (record {seq}) is not in the chain as anchored: "
                "records were removed from its end or rewritten")
    later = [i for i in mine if i > seq]
    if later:
        return (f"record {later[0]} about {model} follows its anchored head (record {seq}): "
                "it was not written by the promotion step")
    return None


# actions that make a version champion, and the field naming it
_SETS_CHAMPION = {"promoted": "version", "rolled_back": "version", "champion_reverted": "version",
                  "adopted": "version"}


def audited_champion(records: list[dict], model: str) -> tuple[str | None, dict | None]:
    """(champion version the audit says, pending promotion intent or None).

    The champion is the version of the last record that made one (promoted, rolled back,
    reverted, adopted by a person); a ``promoting`` intent after it is a promotion that may have
    moved the alias before its ``promoted`` record was written.
    """
    champion, pending = None, None
    for rec in records:
        if rec.get("model") != model:
            continue
        action = rec.get("action")
        if action in _SETS_CHAMPION:
            champion = rec.get(_SETS_CHAMPION[action])
            champion = None if champion in (None, "none", "") else str(champion)
            pending = None
        elif action == "promoting":
            pending = rec
    return champion, pending


def rolled_back_versions(records: list[dict], model: str) -> set[str]:
    """Versions that were champion and were rolled back (they need a new version to return)."""
    return {str(r["previous_version"]) for r in records
            if r.get("model") == model and r.get("action") == "rolled_back"
            and r.get("previous_version")}


def previous_champion(records: list[dict], model: str, version: str) -> str | None:
    """The champion before ``version``'s last promotion, from the audit (never from tags)."""
    for rec in reversed(records):
        if rec.get("model") == model and rec.get("action") == "promoted" \
                and str(rec.get("version")) == str(version):
            prev = rec.get("previous_version")
            return None if prev in (None, "none", "") else str(prev)
    return None
