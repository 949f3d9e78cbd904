"""Folder mode (``fracture-ops deidentify INPUT OUTPUT``) and the per-file work both modes share.

Every DICOM under INPUT is de-identified into ``OUTPUT/dicom/<patient pseudonym>/<new SOP
UID>.dcm``; PNG/JPEG files lose their metadata (and burned-in text) into ``OUTPUT/images/<path
hash>.<ext>``; ``report.json``, ``report.html`` and ``audit.jsonl`` go beside them. Files are
processed by a pool of worker processes (``workers``; OCR dominates the time). Files that cannot
be read, or whose burned-in text cannot be removed, are listed with a reason and never copied.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from fracture_ops import storage
from fracture_ops.data.images import lacks_preamble
from fracture_ops.deid.config import CANDIDATE_SUFFIXES, DICOM_SUFFIXES, DeidConfig, load_keys
from fracture_ops.deid.dicom import deidentify_dicom_bytes
from fracture_ops.deid.images import PNG_SIGNATURE, scrub_image_bytes, strip_image_metadata
from fracture_ops.deid.profile import DeidKeys, ProfileResult
from fracture_ops.deid.report import GALLERY_SIDE, THUMBNAILS
from fracture_ops.errors import BadInputError, FileRejected



class Processed(NamedTuple):
    kind: str
    data: bytes
    result: ProfileResult | None
    ext: str
    pixels: dict | None
    thumbnail: str | None = None  # base64 PNG of the output for report.html (pixel path only)
    staged: str | None = None  # where a worker wrote the output, relative to the output folder


def with_thumbnail(done: Processed) -> Processed:
    """Add the report thumbnail, drawn from the output bytes (never from the input)."""
    from fracture_ops.deid.report import thumbnail

    if done.pixels is None:
        return done
    return done._replace(thumbnail=thumbnail(done.data, done.pixels.get("boxes", []),
                                             done.pixels.get("held_boxes", []),
                                             side=GALLERY_SIDE))


def _kind(data: bytes, suffix: str) -> str | None:
    if data[128:132] == b"DICM" or suffix in DICOM_SUFFIXES or lacks_preamble(data):
        return "dicom"
    if data.startswith(PNG_SIGNATURE) or data[:2] == b"\xff\xd8":
        return "image"
    return None


def process_bytes(data: bytes, suffix: str, keys: DeidKeys, cfg: DeidConfig,
                  patient_key: str | None = None, study_key: str | None = None) -> Processed:
    """Classify and de-identify one file (header, pixels, metadata).

    Raises:
        FileRejected: not DICOM/PNG/JPEG, undecodable, or burned-in text that remains.
        Exception: pydicom's own errors for unreadable files (callers quarantine them).
    """
    kind = _kind(data, suffix)
    if kind == "dicom":
        out, result = deidentify_dicom_bytes(data, keys, cfg, patient_key, study_key)
        return Processed(kind, out, result, ".dcm", result.pixels)
    if kind == "image":
        if cfg.pixels.enabled:
            ids = [patient_key] if patient_key else []
            out, ext, pixels = scrub_image_bytes(data, cfg.pixels, {"ids": ids})
            return Processed(kind, out, None, ext, pixels)
        out, ext = strip_image_metadata(data)
        return Processed(kind, out, None, ext, None)
    raise FileRejected("not DICOM, PNG or JPEG")


HELD_DIR = "held"  # outputs waiting for a person's review; never part of the released tree


def is_held(done: Processed) -> bool:
    """The pixel scrub left letter-like regions no engine could read: a person decides."""
    return bool(done.pixels and done.pixels.get("held"))


def held_reason(pixels: dict) -> str:
    return (f"held for review: {pixels['held']} letter-like region(s) inside the body that no "
            "engine read as text (not blanked)")


def fill_record(rec: dict, done: Processed, output: str) -> None:
    """Complete an audit record (PHI-free) for a file that was written (or held)."""
    status = "deidentified" if done.kind == "dicom" else "stripped"
    if is_held(done):
        rec.update(released_status=status, reason=held_reason(done.pixels))
        status = "held"
    rec.update(status=status, kind=done.kind, output=output)
    if done.result is not None:
        rec.update(patient=done.result.patient, study=done.result.study_uid,
                   counts=dict(sorted(done.result.counts.items())), flags=done.result.flags)
    if done.pixels is not None:
        rec["pixels"] = done.pixels


def quarantine_reason(exc: Exception) -> str:
    """Why a file was quarantined, naming neither the file nor a header value: a rejection's
    own message, else the kind of error that made it unreadable."""
    return str(exc) if isinstance(exc, FileRejected) else f"unreadable: {type(exc).__name__}"


def quarantine(rec: dict, exc: Exception) -> None:
    """Mark a record quarantined with its :func:`quarantine_reason`."""
    rec.update(status="quarantined", reason=quarantine_reason(exc))
    scrub = getattr(exc, "result", None)
    if scrub is not None:
        rec["pixels"] = {"passed": False, "regions": scrub.regions,
                         "residual": [[list(b) for b in f.residual] for f in scrub.frames]}


# ---- a pool of worker processes ----

_WORKER: dict = {}


def _init_worker(keys: DeidKeys, cfg: DeidConfig) -> None:
    from fracture_ops.deid import scrub

    scrub._CACHE.clear()  # engines inherited from the parent hold ONNX thread pools: rebuild
    _WORKER.update(keys=keys, cfg=cfg)


MAX_AUTO_WORKERS = 8  # each worker holds its own OCR models (~200 MB): set workers to go higher


def worker_count(cfg: DeidConfig, n_items: int) -> int:
    """Processes to use: ``cfg.workers``, or the CPUs this process may run on (at most
    ``MAX_AUTO_WORKERS``); never more than the items."""
    want = cfg.workers or min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS)
    return max(1, min(want, n_items))


def parallel_map(fn, items: list, keys: DeidKeys, cfg: DeidConfig, desc: str):
    """Yield ``fn(item, keys, cfg)`` in order, from a process pool when it pays off."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from fracture_ops.cli_common import progress

    workers = worker_count(cfg, len(items))
    if workers == 1 or len(items) < 4:
        for item in progress(items, desc=desc, total=len(items)):
            yield fn(item, keys, cfg)
        return
    # fork: works from any caller (no importable __main__ needed); the initializer drops the
    # parent's OCR engines so each worker builds its own ONNX Runtime sessions
    # OCR files take a second each: one at a time keeps the workers evenly loaded; header-only
    # files take milliseconds, so they travel in chunks (fewer pipe round trips per file)
    chunk = 1 if cfg.pixels.enabled else max(1, min(32, len(items) // (workers * 4)))
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"),
                             initializer=_init_worker, initargs=(keys, cfg)) as pool:
        results = pool.map(_call, [(fn, item) for item in items], chunksize=chunk)
        yield from progress(results, desc=desc, total=len(items))


def _call(job):
    fn, item = job
    return fn(item, _WORKER["keys"], _WORKER["cfg"])


# ---- folder mode ----

# written first into a folder-mode output: only a folder holding it is ever emptied by a rerun
OUTPUT_MARKER = ".fracture-ops-deid-output"

def _check_folders(input_uri: str, output_uri: str) -> list[str]:
    if not storage.is_s3(input_uri) and not Path(input_uri).is_dir():
        raise BadInputError("deidentify: the INPUT folder does not exist")
    if not storage.is_s3(input_uri) and not storage.is_s3(output_uri):
        inp, out = Path(input_uri).resolve(), Path(output_uri).resolve()
        if inp == out or inp in out.parents or out in inp.parents:
            raise BadInputError("deidentify: OUTPUT must not be INPUT, inside it, or contain it")
    existing = storage.list_files(output_uri)
    if existing and not storage.exists(storage.join(output_uri, OUTPUT_MARKER)):
        raise BadInputError("deidentify: OUTPUT is not empty and was not created by folder-mode "
                            f"de-identification (no {OUTPUT_MARKER} in it); refusing to empty it")
    files = storage.list_files(input_uri)
    if not files:
        raise BadInputError("deidentify: the INPUT folder holds no files")
    return files


def _output_name(rec: dict, done: Processed) -> str:
    """Where an output goes; a held one under ``held/`` (released by ``deid review``)."""
    if done.result is not None:
        name = f"dicom/{done.result.patient}/{done.result.sop_uid}{done.ext}"
    else:
        name = f"images/{rec['input'][:16]}{done.ext}"
    return f"{HELD_DIR}/{name}" if is_held(done) else name


def _dedup_name(rec: dict, done: Processed, name: str) -> str:
    """The same SOP Instance twice: keep both, say so."""
    if done.result is not None:
        done.result.flags.append("duplicate_sop_instance")
    return name[:-len(done.ext)] + f"-{rec['input'][:8]}{done.ext}"


def _one_file(item: tuple[str, str, str], keys: DeidKeys,
              cfg: DeidConfig) -> tuple[dict, Processed | None]:
    """De-identify one input (in a worker): its audit record and, when it succeeded, the output.

    Local outputs are written here, in the worker, to a staging name beside their final place
    (the data then stays out of the pipe back); the parent, in input order, moves them to their
    final names, so duplicate names resolve the same way in every run. S3 outputs come back to
    the parent, which writes them.
    """
    uri, rel, out_dir = item
    rec = {"input": keys.path_hash(rel)}
    suffix = Path(rel).suffix.lower()
    try:
        done = with_thumbnail(process_bytes(storage.read_bytes(uri), suffix, keys, cfg))
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the run
        if suffix not in CANDIDATE_SUFFIXES and isinstance(exc, FileRejected):
            rec.update(status="skipped", reason=str(exc))
        else:
            quarantine(rec, exc)
        return rec, None
    if not storage.is_s3(out_dir):
        staged = f"{_output_name(rec, done)}.{rec['input'][:16]}.part"
        storage.write_bytes(storage.join(out_dir, *staged.split("/")), done.data)
        done = done._replace(data=b"", staged=staged)
    return rec, done


def _write(rec: dict, done: Processed, out_dir: str, used: set[str]) -> None:
    name = _output_name(rec, done)
    if name in used:
        name = _dedup_name(rec, done, name)
    used.add(name)
    target = storage.join(out_dir, *name.split("/"))
    if done.staged:  # written by the worker: move it into place
        os.replace(storage.join(out_dir, *done.staged.split("/")), target)
    else:
        storage.write_bytes(target, done.data)
    fill_record(rec, done, name)
    if is_held(done):  # what the reviewer sees is what `deid review --approve` releases
        rec["sha256"] = hashlib.sha256(storage.read_bytes(target)).hexdigest()


def deidentify_folder(input_uri: str, output_uri: str, cfg: DeidConfig) -> dict:
    """Folder mode: de-identify every file under ``input_uri`` into ``output_uri``.

    Args:
        input_uri: folder (or s3 prefix) walked recursively.
        output_uri: where de-identified files, ``report.json``, ``report.html``, ``audit.jsonl``
            and ``_SUCCESS`` go; it must be empty or an earlier output of this function (it is
            emptied first).
        cfg: the step config.

    Returns:
        The summary also stored in ``_SUCCESS``.

    Raises:
        BadInputError: missing/empty input, overlapping folders, or a foreign non-empty output.
        ConfigError: no secret (see :func:`load_keys`).
        ErrorBudgetExceeded: more than ``cfg.max_bad_fraction`` of candidate files failed.
    """
    from fracture_ops.deid.report import finish

    files = _check_folders(input_uri, output_uri)
    keys = load_keys(cfg)
    storage.reset_dir(output_uri)
    storage.write_text(storage.join(output_uri, OUTPUT_MARKER),
                       "written by fracture-ops deidentify (folder mode); a rerun may empty this "
                       "folder\n")
    items = [(uri, uri[len(input_uri.rstrip("/")):].lstrip("/") if storage.is_s3(input_uri)
              else os.path.relpath(uri, input_uri), output_uri) for uri in files]
    records: list[dict] = []
    thumbs: dict[str, str] = {}
    used: set[str] = set()
    for rec, done in parallel_map(_one_file, items, keys, cfg, "deidentify"):
        if done is not None:
            _write(rec, done, output_uri, used)
            if done.thumbnail and (len(thumbs) < THUMBNAILS or is_held(done)):
                thumbs[rec["output"]] = done.thumbnail
        records.append(rec)
    return finish(output_uri, records, cfg, keys, "folder", {"output_dir": output_uri}, thumbs)
