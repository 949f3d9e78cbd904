"""``fracture-ops deid review OUTPUT --approve ID ... | --reject ID ...``: a person's sign-off.

A de-identification run holds a file (``held/``, status ``held``) when its pixels have a
letter-like region inside the body that no engine read as text: blanking it might remove
anatomy, releasing it might release text. A reviewer looks at it in ``gallery.html`` (output
pixels only) and decides here. Each decision is appended to the sign-off file ``review.jsonl``
(reviewer, time, input id, decision, SHA-256 of the file decided on); an approval moves the file
from ``held/`` to where the run would have written it (and, in manifest mode, adds its row to
``manifest.deid.parquet``), a rejection deletes it (the input is then listed as quarantined).
``audit.jsonl``, ``report.json``, ``gallery.html`` and ``_SUCCESS`` are rewritten to match. A file
whose bytes changed since the run is refused: what was reviewed is what is released.

A PACS data set (``pacs-ingest``'s folder, ``OUTPUT`` = the data set's folder) keeps each held
instance under ``held/`` with a record of the manifest row it would have had; an approval moves
it to ``images/``, adds that row to its study's part and rebuilds ``manifest.parquet`` (the
study's link to the original UIDs is already in the raw zone, so results go back to the PACS as
for any other instance); a rejection deletes it and marks it rejected in the study's quarantine
list. Decisions go to the data set's ``review.jsonl``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import logging
import re
from collections import Counter

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.errors import BadInputError, ConfigError

log = logging.getLogger("fracture_ops.deid")


def configure_parser(parser) -> None:
    """Arguments of ``fracture-ops deid``."""
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    rev = sub.add_parser("review", help="release (--approve) or reject files held for review",
                         description=__doc__.split("\n\n")[1])
    rev.add_argument("output", metavar="OUTPUT",
                     help="a deidentify output folder (folder mode), step folder (manifest mode) "
                          "or PACS data set folder (pacs-ingest's, holding parts/ and held/)")
    rev.add_argument("--approve", nargs="+", default=[], metavar="ID",
                     help="input ids (the first 8+ characters shown in the gallery) to release")
    rev.add_argument("--reject", nargs="+", default=[], metavar="ID",
                     help="input ids whose held output is deleted (quarantined)")
    rev.add_argument("--reviewer", default=None,
                     help="who decides (default: the login name); recorded in review.jsonl")
    rev.add_argument("--list", action="store_true", help="list the held files and exit")


def _sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def _find(records: list[dict], ident: str) -> dict:
    if len(ident) < 8:
        raise ConfigError(f"deid review: id {ident!r} is too short (give 8 or more characters)")
    hits = [r for r in records if r["input"].startswith(ident)]
    if len(hits) != 1:
        raise BadInputError(f"deid review: id {ident!r} matches {len(hits)} inputs of this run")
    return hits[0]


def _release_row(out_dir: str, rec: dict) -> None:
    """Manifest mode: move the held row of ``rec`` into ``manifest.deid.parquet``."""
    import pandas as pd

    held_uri = storage.join(out_dir, "held", "manifest.held.parquet")
    if not storage.exists(held_uri):
        return
    held = storage.read_parquet(held_uri)
    row = held[held["image_id"] == rec.get("image_id")]
    if not len(row):
        return
    man_uri = storage.join(out_dir, catalog.DEID_MANIFEST.file)
    manifest = storage.read_parquet(man_uri)
    row = row.assign(image_uri=storage.join(out_dir, *rec["output"].split("/")))
    merged = pd.concat([manifest, row], ignore_index=True).sort_values("image_id", kind="stable")
    storage.write_parquet(man_uri, merged.reset_index(drop=True))
    storage.write_parquet(held_uri, held[held["image_id"] != rec.get("image_id")])


def _decide(out_dir: str, rec: dict, decision: str, reviewer: str, at: str) -> dict:
    """Apply one decision to a held record (in place); the sign-off line."""
    held_uri = storage.join(out_dir, *rec["output"].split("/"))
    digest = _sha256(held_uri)
    if rec.get("sha256") and digest != rec["sha256"]:
        raise BadInputError(f"deid review: the held output of {rec['input'][:16]} changed since "
                            "the run (its SHA-256 differs); refusing to release it")
    if decision == "approved":
        final = rec["output"].split("/", 1)[1]
        target = storage.join(out_dir, *final.split("/"))
        if storage.exists(target):
            raise BadInputError(f"deid review: {final} already exists; not overwritten")
        storage.write_bytes(target, storage.read_bytes(held_uri))
        storage.delete(held_uri)
        rec.update(status=rec.pop("released_status", "deidentified"), output=final)
        _release_row(out_dir, rec)
    else:
        storage.delete(held_uri)
        rec.update(status="quarantined", reason="rejected in review")
        rec.pop("output", None)
    rec["review"] = {"decision": decision, "reviewer": reviewer, "at": at}
    return {"input": rec["input"], "decision": decision, "reviewer": reviewer, "at": at,
            "sha256": digest}


def _refresh_report(report: dict, records: list[dict]) -> dict:
    """Counts and lists of ``report.json`` recomputed from the reviewed records."""
    status = Counter(r["status"] for r in records)
    for key in ("deidentified", "stripped", "held", "quarantined"):
        report["counts"][key] = status[key]
    report["quarantined"] = [{"input": r["input"], "reason": r["reason"]}
                             for r in records if r["status"] == "quarantined"]
    report["held"] = [{"input": r["input"], "output": r["output"], "reason": r["reason"]}
                      for r in records if r["status"] == "held"]
    report["reviewed"] = [{"input": r["input"], **r["review"]} for r in records if r.get("review")]
    return report


def review(out_dir: str, approve: list[str], reject: list[str], reviewer: str) -> dict:
    """Apply approvals and rejections to a de-identification output (see the module docstring).

    Returns:
        ``{"approved": n, "rejected": n, "held": n still held, "gallery": uri}``.

    Raises:
        ConfigError: no decision given, an id too short, or an id both approved and rejected.
        BadInputError: not a de-identification output, an unknown id, a held file that changed.
    """
    from fracture_ops.deid.gallery import SIGN_OFF, write_gallery

    if not approve and not reject:
        raise ConfigError("deid review: give --approve ID ... and/or --reject ID ...")
    audit_uri = storage.join(out_dir, "audit.jsonl")
    if not storage.exists(audit_uri):
        if _is_store(out_dir):
            return review_store(out_dir, approve, reject, reviewer)
        raise BadInputError("deid review: OUTPUT holds no audit.jsonl (not a deidentify output) "
                            "and no parts/ (not a PACS data set)")
    records = [json.loads(line) for line in storage.read_text(audit_uri).splitlines() if line]
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    wanted = [(_find(records, i), "approved") for i in approve] + \
        [(_find(records, i), "rejected") for i in reject]
    if len({id(r) for r, _ in wanted}) != len(wanted):
        raise ConfigError("deid review: an id is given twice (or both approved and rejected)")
    lines, done = [], Counter()
    for rec, decision in wanted:
        if rec["status"] != "held":
            log.info("deid review: %s is %s, not held: nothing to do", rec["input"][:16],
                     rec["status"])
            continue
        lines.append(_decide(out_dir, rec, decision, reviewer, at))
        done[decision] += 1
    sign_off = storage.join(out_dir, SIGN_OFF)
    before = storage.read_text(sign_off) if storage.exists(sign_off) else ""
    storage.write_text(sign_off, before + "".join(json.dumps(x, sort_keys=True) + "\n"
                                                  for x in lines))
    storage.write_text(audit_uri, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    report = _refresh_report(storage.read_json(storage.join(out_dir, "report.json")), records)
    storage.write_json(storage.join(out_dir, "report.json"), report)
    gallery = write_gallery(out_dir, report, records)
    held = sum(r["status"] == "held" for r in records)
    success = storage.join(out_dir, storage.SUCCESS_MARKER)
    if storage.exists(success):
        summary = storage.read_json(success)
        summary.update({k: report["counts"][k] for k in ("deidentified", "stripped", "held",
                                                         "quarantined")})
        storage.mark_success(out_dir, summary)
    log.info("deid review: %d approved, %d rejected by %s; %d still held; gallery %s",
             done["approved"], done["rejected"], reviewer, held, gallery)
    return {"approved": done["approved"], "rejected": done["rejected"], "held": held,
            "gallery": gallery}


def _is_store(root: str) -> bool:
    """A data set stored as parts (``pacs-ingest``'s), whose held instances wait in ``held/``."""
    return storage.exists(storage.join(root, "parts"))


_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _held_records(root: str) -> list[tuple[str, dict]]:
    """The held records of a PACS data set, each checked to name only its own files: a record
    edited to point elsewhere (another file, a path out of the folder) is refused, not obeyed."""
    folder = storage.join(root, "held")
    uris = storage.list_files(folder, (".json",)) if storage.exists(folder) else []
    out = []
    for uri in sorted(uris):
        try:
            rec = storage.read_json(uri)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not _well_formed(rec, uri.rsplit("/", 1)[-1][:-len(".json")]):
            raise BadInputError(f"deid review: held record {uri.rsplit('/', 1)[-1]} is not one "
                                "pacs-ingest wrote (its id, study, row or file differ); refusing "
                                "to act on this data set until it is restored or removed")
        out.append((uri, rec))
    return out


def _well_formed(rec: dict, stem: str) -> bool:
    """A held record names only its own files: its id is its file name, its study key a plain
    token, its row that image, and its output the one its status allows."""
    ident, part, status = rec.get("input"), rec.get("part"), rec.get("status")
    if not (isinstance(ident, str) and isinstance(part, str) and isinstance(rec.get("row"), dict)):
        return False
    row = rec["row"]
    output = {"held": f"held/{ident}.dcm", "deidentified": f"images/{ident}.dcm",
              "quarantined": None}
    return (bool(_TOKEN.fullmatch(ident)) and bool(_TOKEN.fullmatch(part))
            and ".." not in ident + part and stem == ident and status in output
            and rec.get("output") == output[status] and row.get("image_id") == ident
            and row.get("study_id") == part and isinstance(rec.get("sha256"), str)
            and isinstance(rec.get("reason", ""), str)
            and str(row.get("image_uri") or f"images/{ident}.dcm").endswith(f"images/{ident}.dcm"))


def _mark_quarantine(root: str, rec: dict, reason: str | None) -> None:
    """The study's quarantine list without this instance (``reason`` None), or with its new
    reason."""
    uri = storage.join(root, "quarantine", f"{rec['part']}.json")
    if not storage.exists(uri):
        return
    entries = storage.read_json(uri)
    if reason is None:
        entries = [x for x in entries if x.get("image_id") != rec["input"]]
    else:
        for x in entries:
            if x.get("image_id") == rec["input"]:
                x["reason"] = reason
    storage.write_json(uri, entries)


def _check_held(root: str, rec: dict, decision: str) -> str:
    """Refuse a decision that cannot be carried out whole (checked for every id before any is
    acted on); the SHA-256 of the held bytes."""
    held_uri = storage.join(root, *rec["output"].split("/"))
    if not storage.exists(held_uri):
        raise BadInputError(f"deid review: the held file of {rec['input'][:16]} is missing")
    digest = _sha256(held_uri)
    if digest != rec["sha256"]:
        raise BadInputError(f"deid review: the held instance {rec['input'][:16]} changed since "
                            "it was held (its SHA-256 differs); refusing to release it")
    if decision == "approved":
        if not storage.exists(storage.join(root, "parts", f"{rec['part']}.parquet")):
            raise BadInputError(f"deid review: the study of {rec['input'][:16]} is not recorded "
                                "yet (its run stopped over the error budget): run pacs-ingest "
                                "again, then review what it holds")
        target = storage.join(root, "images", f"{rec['input']}.dcm")
        if storage.exists(target) and _sha256(target) != digest:  # the same bytes: a resumed
            raise BadInputError(f"deid review: images/{rec['input']}.dcm already exists with "
                                "other bytes; not overwritten")
    return digest


def _decide_held(root: str, uri: str, rec: dict, decision: str, digest: str, line: dict) -> None:
    """Carry out one checked decision. The held file goes last, after the part, the quarantine
    list, the sign-off line and the record: a run cut short anywhere before is finished by the
    same command again (a repeated step writes what it wrote)."""
    from fracture_ops.data.parts import add_to_part
    from fracture_ops.deid.gallery import SIGN_OFF

    held_uri = storage.join(root, *rec["output"].split("/"))
    if decision == "approved":
        target = storage.join(root, "images", f"{rec['input']}.dcm")
        storage.write_bytes(target, storage.read_bytes(held_uri))
        # the manifest's form of the path: the one pacs-ingest gave its row (the same folder)
        add_to_part(root, rec["part"], {**rec["row"], "image_uri": rec["row"].get("image_uri")
                                        or target})
        _mark_quarantine(root, rec, None)
        rec.update(status="deidentified", output=f"images/{rec['input']}.dcm")
    else:
        _mark_quarantine(root, rec, "rejected in review")
        rec.update(status="quarantined", reason="rejected in review", output=None)
    rec["review"] = {k: line[k] for k in ("decision", "reviewer", "at")}
    sign_off = storage.join(root, SIGN_OFF)
    before = storage.read_text(sign_off) if storage.exists(sign_off) else ""
    storage.write_text(sign_off, before + json.dumps(line, sort_keys=True) + "\n")
    storage.write_json(uri, rec)
    storage.delete(held_uri)


def review_store(root: str, approve: list[str], reject: list[str], reviewer: str) -> dict:
    """:func:`review` for a PACS data set (see the module docstring). Every decision is checked
    before any is carried out; a decision already taken is repeated as a no-op, and the other
    one refused (a decision is final).

    Returns:
        ``{"approved": n, "rejected": n, "held": n still held, "manifest": uri}``.
    """
    from fracture_ops.data.parts import MANIFEST, rebuild_manifest

    held = _held_records(root)
    records = [rec for _, rec in held]
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    wanted = [(_find(records, i), "approved") for i in approve] + \
        [(_find(records, i), "rejected") for i in reject]
    if len({id(r) for r, _ in wanted}) != len(wanted):
        raise ConfigError("deid review: an id is given twice (or both approved and rejected)")
    uris = {id(rec): uri for uri, rec in held}
    plan = []
    for rec, decision in wanted:
        if rec["status"] != "held":
            before = (rec.get("review") or {}).get("decision")
            if before != decision:
                raise BadInputError(f"deid review: {rec['input'][:16]} was already "
                                    f"{before or rec['status']}; a decision is final")
            leftover = storage.join(root, "held", f"{rec['input']}.dcm")
            if storage.exists(leftover):  # a run cut short after the record: finish it
                storage.delete(leftover)
            log.info("deid review: %s was already %s: nothing to do", rec["input"][:16], before)
            continue
        plan.append((rec, decision, _check_held(root, rec, decision)))
    done = Counter()
    for rec, decision, digest in plan:
        line = {"input": rec["input"], "decision": decision, "reviewer": reviewer, "at": at,
                "sha256": digest}
        _decide_held(root, uris[id(rec)], rec, decision, digest, line)
        done[decision] += 1
    manifest = storage.write_parquet(storage.join(root, MANIFEST), rebuild_manifest(root))
    still = sum(r["status"] == "held" for r in records)
    log.info("deid review: %d approved, %d rejected by %s; %d still held; manifest %s",
             done["approved"], done["rejected"], reviewer, still, manifest)
    return {"approved": done["approved"], "rejected": done["rejected"], "held": still,
            "manifest": manifest}


def run_cli(args) -> dict:
    """``fracture-ops deid review``."""
    if args.list:
        audit = storage.join(args.output, "audit.jsonl")
        if storage.exists(audit):
            records = [json.loads(x) for x in storage.read_text(audit).splitlines() if x]
        elif _is_store(args.output):
            records = [rec for _, rec in _held_records(args.output)]
        else:
            raise BadInputError("deid review: OUTPUT holds no audit.jsonl (not a deidentify "
                                "output) and no parts/ (not a PACS data set)")
        held = [r for r in records if r["status"] == "held"]
        for r in held:
            print(f"{r['input'][:16]}  {r['output']}  {r.get('reason', '')}")
        return {"held": len(held)}
    reviewer = args.reviewer or getpass.getuser()
    return review(args.output, args.approve, args.reject, reviewer)
