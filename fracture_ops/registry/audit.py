"""The registry's append-only audit: one object per record, never rewritten.

Each record is its own file (local folder) or S3 key under the audit location, named
``<UTC timestamp>-<action>-<random>.json``, and written once: no read-modify-write, so concurrent
writers never lose each other's records and nobody edits history by accident. The location
comes from deployment configuration (``$FRACTURE_OPS_AUDIT_URI``; embedded default
``<artifact_root>/registry/audit``), never from a trigger parameter. A record that cannot be parsed
is reported (logged, counted) and skipped: it never stops a refusal or a rollback.

The audit is the registry's source of truth for who is champion (:func:`audited_champion`) and
what was rolled back; tags on model versions are for people to read, not for decisions.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fracture_ops import storage

log = logging.getLogger(__name__)
AUDIT_ENV = "FRACTURE_OPS_AUDIT_URI"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def append(folder: str, record: dict) -> dict:
    """Write one record as its own object; never overwrites (a fresh random name each time)."""
    record = {"ts": now(), **record}
    stamp = record["ts"].replace(":", "").replace("-", "").replace("+0000", "Z")
    for _ in range(5):
        name = f"{stamp}-{record.get('action', 'record')}-{secrets.token_hex(6)}.json"
        uri = storage.join(folder, name)
        if not storage.exists(uri):
            break
    storage.write_text(uri, json.dumps(record, sort_keys=True) + "\n")
    log.info("audit: %s", record)
    return record


@dataclass
class AuditLog:
    """The records in order (timestamp, then name), and how many were skipped as malformed."""

    records: list[dict] = field(default_factory=list)
    skipped: int = 0


def read(folder: str) -> AuditLog:
    """Every record under ``folder`` in time order; malformed ones are logged and skipped.

    A legacy single ``.jsonl`` file is read line by line the same way.
    """
    out = AuditLog()
    if str(folder).endswith(".jsonl"):
        texts = storage.read_text(folder).splitlines() if storage.exists(folder) else []
        named = [(f"{i:09d}", t) for i, t in enumerate(texts) if t.strip()]
    else:
        named = []
        for uri in storage.list_files(folder, (".json",)):
            try:
                named.append((uri.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1],
                              storage.read_text(uri)))
            except (OSError, UnicodeDecodeError):
                named.append((uri, ""))
    parsed = []
    for name, text in named:
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict) or not isinstance(rec.get("action"), str):
                raise ValueError("not an audit record")
            parsed.append((str(rec.get("ts", "")), name, rec))
        except ValueError:
            out.skipped += 1
            log.warning("audit: skipped a malformed record (%s)", name)
    out.records = [rec for _, _, rec in sorted(parsed, key=lambda t: (t[0], t[1]))]
    return out


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
