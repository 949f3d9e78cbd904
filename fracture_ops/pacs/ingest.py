"""``fracture-ops pacs-ingest``: new radiograph studies from a PACS, de-identified on arrival.

1. QIDO-RS: the studies with a wanted modality (``modalities``, default CR, DX, DR) whose study
   date is on or after the watermark less ``lookback_days`` (late arrivals), or ``since`` on the
   first run; only their series of a wanted modality (and body part, when ``body_parts`` is set).
2. WADO-RS, one instance at a time, into memory, and straight into the ``deidentify`` step's code
   and policy (the header profile, and the burned-in text scrub where it is enabled): only the
   de-identified file is written. Identified pixels and headers never reach the store.
3. Each study, once all its instances are written, gets one part file of the dataset manifest
   (``parts/<pseudonymous study UID>.parquet``, atomic). A study with a part is never fetched
   again; a run killed mid-study leaves no part, and the rerun fetches that study again and
   writes the same files under the same names (keyed pseudonyms), so nothing is duplicated or
   lost. ``manifest.parquet`` is then rebuilt from the parts, and the watermark moves last.
   The watermark is a real study date, so it is kept in the raw zone
   (``<raw_root>/pacs/<dataset>/state.json``), never in the dataset store; so are the links
   from each image id to its original study, series and SOP instance UIDs
   (``links/<study>.parquet``, written before the part), which ``pacs-report`` needs to send
   results back under the original study.

The dataset lives in ``<artifact_root>/pacs/<dataset>/`` (``images/``, ``parts/``,
``manifest.parquet``, ``state.json``); the run folder gets ``report.json`` and ``_SUCCESS``.
Rows carry pseudonymous patient, study and image ids and no label (a PACS holds no ground truth;
labels are joined later). An instance that cannot be retrieved, parsed or de-identified is
quarantined with its reason and the rest continues; the error budget (``max_bad_fraction``)
then applies to the run's instances. Nothing in the outputs or the log names an original UID.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
from datetime import date, datetime, timedelta
from typing import ClassVar

from pydantic import Field, field_validator

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.data.parts import MANIFEST, commit_part, part_files, rebuild_manifest
from fracture_ops.errors import ConfigError, ErrorBudgetExceeded
from fracture_ops.pacs.dicomweb import (
    PacsAuthError,
    PacsConnection,
    PacsRequestError,
    PacsUnavailable,
    tag_value,
)

log = logging.getLogger(__name__)
STEP = "pacs_ingest"
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
STUDY_DATE, MODALITY, BODY_PART = "00080020", "00080060", "00180015"
STUDY_INSTANCES = "00201208"  # Number of Study Related Instances
SERIES_DESCRIPTION = "0008103E"
# the platform's own results (pacs-report's SR and Grad-CAM series) describe themselves so
OWN_SERIES_PREFIX = "fracture-ops"
OWN_MODALITIES = ("SR", "OT")  # the SR and the Grad-CAM secondary capture
QIDO_PAGE = 200


class PacsIngestConfig(StepConfig):
    """Config of the ``pacs-ingest`` step (YAML section ``pacs_ingest``)."""

    section: ClassVar[str] = "pacs_ingest"

    dataset: str = Field("pacs", pattern=r"^[A-Za-z0-9_-]+$",
                         description="dataset folder under <artifact_root>/pacs/")
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX", "DR"],
                                  description="study modalities to pull (QIDO-RS ModalitiesInStudy)")
    body_parts: list[str] = Field(default_factory=list, description="series Body Part Examined to "
                                  "keep (e.g. WRIST, HAND); empty: any")
    since: str = Field("", description="first run: earliest study date, YYYYMMDD (empty: all)")
    lookback_days: int = Field(3, ge=0, le=365, description="re-scan this many days before the "
                               "watermark (studies that reach the PACS late)")
    max_studies: int = Field(500, ge=1, le=100000, description="studies fetched per run (the "
                             "rest wait for the next run; the watermark stops before them)")
    retries: int = Field(5, ge=0, le=20, description="retries of a failed PACS request (back-off "
                         "doubling from backoff_s)")
    backoff_s: float = Field(2.0, ge=0.0, le=600.0)
    timeout_s: float = Field(60.0, gt=0, le=3600, description="timeout of one PACS request")
    allow_dev_secret: bool = Field(False, description="demos/tests only: de-identify with the "
                                   "built-in key when $FRACTURE_OPS_DEID_SECRET is unset")
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0, description="quarantined share of the "
                                    "run's instances above which the step fails (exit 4)")
    backfill: list[str] = Field(default_factory=list, description="FROM TO (YYYYMMDD): fetch "
                                "every study dated in that range that the dataset lacks (or "
                                "that grew), whatever the watermark, which stays where it is")

    @field_validator("modalities", "body_parts")
    @classmethod
    def _codes(cls, values: list[str]) -> list[str]:
        out = [v.strip().upper() for v in values if v.strip()]
        for v in out:
            if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", v):
                raise ValueError(f"{v!r} is not a DICOM code string")
        return out

    @field_validator("since")
    @classmethod
    def _date(cls, value: str) -> str:
        if value:
            try:
                datetime.strptime(value, "%Y%m%d")
            except ValueError:
                raise ValueError(f"since={value!r} must be a date YYYYMMDD") from None
        return value

    @field_validator("backfill")
    @classmethod
    def _range(cls, value: list[str]) -> list[str]:
        if not value:
            return value
        if len(value) != 2:
            raise ValueError("backfill takes two dates, FROM TO (YYYYMMDD)")
        try:
            first, last = (datetime.strptime(v, "%Y%m%d") for v in value)
        except ValueError:
            raise ValueError(f"backfill {value} must be two dates YYYYMMDD") from None
        if first > last:
            raise ValueError(f"backfill FROM {value[0]} is after TO {value[1]}")
        return value


def dataset_dir(cfg: PacsIngestConfig) -> str:
    return storage.join(cfg.artifact_root, "pacs", cfg.dataset)


def raw_dir(cfg) -> str:
    """The dataset's raw-zone folder: the watermark and the links to the original UIDs."""
    return storage.join(cfg.raw_root, "pacs", cfg.dataset)


def state_uri(cfg: PacsIngestConfig) -> str:
    """The watermark (a real study date: identifying, so in the raw zone)."""
    return storage.join(raw_dir(cfg), "state.json")


def query_start(cfg: PacsIngestConfig, state: dict) -> str:
    """The earliest study date to ask for: watermark - lookback, else ``since``, else ''."""
    mark = state.get("watermark")
    if mark and _valid_date(mark):
        start = datetime.strptime(mark, "%Y%m%d").date() - timedelta(days=cfg.lookback_days)
        return start.strftime("%Y%m%d")
    if mark:
        log.warning("pacs-ingest: the stored watermark is not a valid date; querying from 'since'")
    return cfg.since


def _dataset_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _code(ds, keyword: str, allowed: tuple[str, ...], other: str) -> str:
    value = str(ds.get(keyword, "") or "").strip().upper()
    return value if value in allowed else other


class Ingest:
    """One run: the connection, the keys and the dataset folder."""

    def __init__(self, cfg: PacsIngestConfig, conn: PacsConnection, deid_cfg):
        from fracture_ops.deid.config import load_keys

        self.cfg, self.conn, self.deid_cfg = cfg, conn, deid_cfg
        self.keys = load_keys(deid_cfg)
        self.client = conn.client()
        self.root = dataset_dir(cfg)
        self.gallery: list[dict] = []  # PHI-free records of this run's instances, for the gallery
        self.thumbs: dict[str, str] = {}  # output-pixel thumbnails (gallery.html)

    def find_studies(self, start: str, end: str = "") -> tuple[dict[str, tuple[str, int]], bool]:
        """Study UID -> (study date, number of instances) of every study with a wanted modality
        since ``start``, and whether the listing is complete (False when a page came back full
        yet added nothing new: a PACS that ignores ``offset`` past its own cap)."""
        found: dict[str, tuple[str, int]] = {}
        complete = True
        first = True
        for modality in self.cfg.modalities:
            seen: set[str] = set()  # this modality's pages (a study may hold CR and DX series)
            filters = {"ModalitiesInStudy": modality}
            if start or end:
                filters["StudyDate"] = f"{start}-{end}"
            offset = 0
            while True:  # page by page until an empty page: a PACS may cap each answer
                what = f"QIDO-RS {'first ' if first else ''}study search ({modality})"
                first = False
                items = self.conn.call(what, lambda f=filters, o=offset:
                                       self.client.search_for_studies(
                                           search_filters=f, limit=QIDO_PAGE, offset=o,
                                           fields=["StudyDate", "NumberOfStudyRelatedInstances"]))
                before = len(seen)
                for item in items:
                    uid = tag_value(item, STUDY_UID)
                    if uid:
                        count = tag_value(item, STUDY_INSTANCES, "0")
                        found[uid] = (tag_value(item, STUDY_DATE), int(count) if count.isdigit() else 0)
                        seen.add(uid)
                if not items:
                    break
                if len(seen) == before:  # the same page again: offset is not supported
                    complete = False
                    log.warning("pacs-ingest: the PACS repeats its answer past %d studies (no "
                                "paging): the listing may be incomplete; the watermark stays", offset)
                    break
                offset += len(items)
        return found, complete

    def wanted_series(self, study: str) -> list[str]:
        """The study's series of a wanted modality (and body part); never the platform's own
        results sent back by ``pacs-report`` (SR and secondary capture, and recognised by their
        description as a second check)."""
        items = self.conn.call("QIDO-RS series search", lambda: self.client.search_for_series(
            study_instance_uid=study, fields=["Modality", "BodyPartExamined", "SeriesDescription"]))
        keep = []
        for item in items:
            if tag_value(item, MODALITY).upper() not in self.cfg.modalities:
                continue
            if (tag_value(item, MODALITY).upper() in OWN_MODALITIES
                    and tag_value(item, SERIES_DESCRIPTION).startswith(OWN_SERIES_PREFIX)):
                continue  # a site that pulls SR/OT: never the platform's own results
            if self.cfg.body_parts and tag_value(item, BODY_PART).upper() not in self.cfg.body_parts:
                continue
            keep.append(tag_value(item, SERIES_UID))
        return [s for s in keep if s]

    def grew(self, study: str, study_count: int, recorded: int, wanted_scheme: bool) -> bool:
        """Whether an ingested study must be fetched again. The study-level count is a cheap
        first look (it also counts other modalities and the results pacs-report sent back); a
        study past it is counted again over its wanted series. A record from before that rule
        holds a study-level count: past it, the study is fetched once more and recorded anew. A
        study whose series cannot be counted now is fetched again (its own errors are then that
        study's, not the run's)."""
        if study_count <= recorded:
            return False
        if not wanted_scheme:
            return True
        try:
            return self.wanted_instances(study) > recorded
        except (PacsAuthError, PacsUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - decided by fetching it
            log.warning("pacs-ingest: study %s could not be counted (%s): fetched again",
                        self.keys.uid(study), type(exc).__name__)
            return True

    def wanted_instances(self, study: str) -> int:
        """How many instances the study's wanted series hold now (what growth is measured on:
        instances of other modalities, and the results ``pacs-report`` sends back, never count)."""
        return sum(len(self.conn.call("QIDO-RS instance search", lambda s=series:
                                      self.client.search_for_instances(
                                          study_instance_uid=study, series_instance_uid=s,
                                          fields=["SOPInstanceUID"])))
                   for series in self.wanted_series(study))

    def _held_record(self, image_id: str) -> tuple[str, dict | None]:
        uri = storage.join(self.root, "held", f"{image_id}.json")
        return uri, (storage.read_json(uri) if storage.exists(uri) else None)

    def _decided(self, image_id: str, data: bytes) -> str | None:
        """A person's decision on exactly these bytes (``approved``, ``rejected``), from an
        earlier review of this instance; None when there is none (or the bytes differ: new
        bytes need a new look)."""
        import hashlib

        _, rec = self._held_record(image_id)
        if not isinstance(rec, dict) or rec.get("sha256") != hashlib.sha256(data).hexdigest():
            return None
        return (rec.get("review") or {}).get("decision") if rec.get("status") != "held" else None

    def _drop_stale_hold(self, image_id: str) -> None:
        """An instance released now that an earlier run held and nobody decided on: its held
        file and record go (a decided record stays: it is the sign-off's context)."""
        uri, rec = self._held_record(image_id)
        if isinstance(rec, dict) and rec.get("status") == "held":
            storage.delete(storage.join(self.root, "held", f"{image_id}.dcm"))
            storage.delete(uri)

    def _hold(self, image_id: str, done, reason: str, row: dict, part: str) -> None:
        """Keep a held instance out of the data set, under ``held/``: its de-identified bytes and
        the record ``deid review`` releases it by (the manifest row it would have had, the
        SHA-256 of the bytes a person reviews, its study's key)."""
        import hashlib

        name = f"held/{image_id}.dcm"
        storage.write_bytes(storage.join(self.root, *name.split("/")), done.data)
        # the row as released: its path in the form of this data set's other rows
        row = {**row, "image_uri": storage.join(self.root, "images", f"{image_id}.dcm")}
        record = {"input": image_id, "status": "held", "reason": reason, "output": name,
                  "sha256": hashlib.sha256(done.data).hexdigest(), "part": part,
                  "row": row, "pixels": done.pixels}
        storage.write_json(storage.join(self.root, "held", f"{image_id}.json"), record)
        self.gallery.append({k: v for k, v in record.items() if k not in ("row", "sha256")})
        self.thumbs[name] = done.thumbnail

    def study(self, study: str) -> tuple[list[dict], list[dict], list[dict]]:
        """Fetch, de-identify and write one study's wanted instances: ``(rows, quarantined,
        links)``; a link ties an image id to the original study, series and SOP instance UIDs
        (identifying: the raw zone's, for sending results back to the PACS).

        Raises:
            PacsAuthError, PacsUnavailable: the PACS itself failed (the run stops; nothing of
                this study is recorded, so the next run fetches it again).
        """
        from fracture_ops.data.manifest import LATERALITIES, VIEWS
        from fracture_ops.deid.folder import (
            held_reason,
            is_held,
            process_bytes,
            quarantine_reason,
            with_thumbnail,
        )

        rows, bad, links = [], [], []
        for series in self.wanted_series(study):
            instances = self.conn.call("QIDO-RS instance search", lambda s=series: self.client.search_for_instances(
                study_instance_uid=study, series_instance_uid=s, fields=["SOPInstanceUID"]))
            for item in instances:
                sop = tag_value(item, SOP_UID)
                image_id = self.keys.image_id(sop)
                try:
                    ds = self.conn.call("WADO-RS instance retrieve", lambda s=series, i=sop:
                                        self.client.retrieve_instance(study, s, i))
                    done = process_bytes(_dataset_bytes(ds), ".dcm", self.keys, self.deid_cfg,
                                         study_key=study)
                except (PacsAuthError, PacsUnavailable):
                    raise
                except Exception as exc:  # noqa: BLE001 - quarantined with its reason
                    reason = quarantine_reason(exc)
                    bad.append({"study_id": self.keys.uid(study), "image_id": image_id, "reason": reason})
                    self.gallery.append({"input": image_id, "status": "quarantined", "reason": reason})
                    log.warning("pacs-ingest: instance %s of study %s quarantined: %s", image_id,
                                self.keys.uid(study), reason)
                    continue
                done = with_thumbnail(done)
                view = _code(ds, "ViewPosition", VIEWS, "UNKNOWN")
                side = _code(ds, "ImageLaterality", LATERALITIES, "") or _code(ds, "Laterality", LATERALITIES, "U")
                row = {"image_id": image_id, "image_uri": None, "patient_id": done.result.patient,
                       "study_id": done.result.study_uid, "label": None, "view": view,
                       "laterality": side,
                       "body_region": str(ds.get("BodyPartExamined", "") or "unknown").strip().lower(),
                       "source": "pacs", "modality": str(ds.get("Modality", "")),
                       "text_regions_blanked": int((done.pixels or {}).get("regions", 0))}
                # the link in the raw zone for held instances too: one released later by
                # `deid review` can have its results sent back like any other
                links.append({"image_id": image_id, "study_uid": study, "series_uid": series, "sop_uid": sop})
                decided = self._decided(image_id, done.data)
                if decided == "rejected":  # a person rejected these very bytes before
                    reason = "rejected in review"
                    bad.append({"study_id": self.keys.uid(study), "image_id": image_id, "reason": reason})
                    self.gallery.append({"input": image_id, "status": "quarantined", "reason": reason})
                    continue
                if is_held(done) and decided != "approved":  # a person looks first
                    reason = held_reason(done.pixels)
                    self._hold(image_id, done, reason, row, self.keys.uid(study))
                    bad.append({"study_id": self.keys.uid(study), "image_id": image_id, "reason": reason})
                    log.warning("pacs-ingest: instance %s of study %s %s", image_id,
                                self.keys.uid(study), reason)
                    continue
                self._drop_stale_hold(image_id)
                name = f"images/{image_id}.dcm"
                self.gallery.append({"input": image_id, "status": "deidentified", "output": name,
                                     "pixels": done.pixels})
                if done.thumbnail:
                    self.thumbs[name] = done.thumbnail
                row["image_uri"] = storage.write_bytes(storage.join(self.root, *name.split("/")), done.data)
                rows.append(row)
        return rows, bad, links


def _write_gallery(out_dir: str, run: Ingest) -> str:
    """The run's review gallery (output pixels only; held and quarantined instances first)."""
    from collections import Counter

    from fracture_ops.deid.gallery import write_gallery

    counts = Counter(r["status"] for r in run.gallery)
    report = {"counts": {"instances": len(run.gallery), **{k: counts[k] for k in
                                                           ("deidentified", "held", "quarantined")}}}
    uri = write_gallery(out_dir, report, run.gallery, run.thumbs, target=run.root)
    log.info("pacs-ingest: review gallery %s: %d instance(s) held for review (under %s/held, "
             "not in the manifest until `fracture-ops deid review %s --approve ID`), %d "
             "quarantined", uri, counts["held"], run.root, run.root, counts["quarantined"])
    return uri


def pacs_ingest_step(cfg: PacsIngestConfig, deid_cfg=None, conn: PacsConnection | None = None) -> dict:
    """Pull the new studies (see the module docstring) and return the run's summary.

    Every run, failed ones too, leaves ``config.resolved.yaml`` and ``report.json`` in its step
    folder (a failed run's report says why: the error's kind and message, which name settings,
    never a DICOM value).

    Raises:
        ConfigError: no PACS URL, or the PACS refused the account (401/403).
        PacsUnavailable: the PACS kept failing after the retries (exit 1: retried later).
        ErrorBudgetExceeded: more than ``max_bad_fraction`` of the instances were quarantined.
    """
    import uuid

    from fracture_ops.config import write_resolved

    write_resolved(cfg, cfg.output_dir(STEP))
    attempt = uuid.uuid4().hex  # a retry of the same run id is another attempt
    try:
        return _ingest(cfg, deid_cfg, conn, attempt)
    except BaseException as exc:
        report_failure(cfg, exc, attempt)
        raise


def report_failure(cfg: PacsIngestConfig, exc: BaseException, attempt: str = "") -> None:
    """The step folder's ``report.json`` of a failed attempt: the error's kind and its message
    (our errors' messages name settings; any other error only its kind), merged into the
    attempt's own detailed report when it wrote one (an exceeded error budget)."""
    from fracture_ops.errors import FractureOpsError

    uri = storage.join(cfg.output_dir(STEP), catalog.PACS_INGEST_REPORT.file)
    kept = storage.read_json(uri) if attempt and storage.exists(uri) else {}
    base = kept if kept.get("attempt") == attempt else {}
    reason = str(exc) if isinstance(exc, FractureOpsError) else type(exc).__name__
    storage.write_json(uri, {**base, "run_id": cfg.run_id, "attempt": attempt, "run_failed": True,
                             "error": type(exc).__name__, "reason": reason})


def _ingest(cfg: PacsIngestConfig, deid_cfg, conn: PacsConnection | None, attempt: str) -> dict:
    """:func:`pacs_ingest_step`'s work."""
    import pandas as pd

    from fracture_ops.deid.config import DeidConfig

    conn = conn or PacsConnection.from_env(timeout_s=cfg.timeout_s, retries=cfg.retries,
                                           backoff_s=cfg.backoff_s)
    deid_cfg = deid_cfg or DeidConfig(artifact_root=cfg.artifact_root, run_id=cfg.run_id,
                                      allow_dev_secret=cfg.allow_dev_secret, workers=1)
    if not cfg.modalities:
        raise ConfigError("pacs-ingest: modalities is empty")
    run = Ingest(cfg, conn, deid_cfg)
    state_at = state_uri(cfg)
    state = storage.read_json(state_at) if storage.exists(state_at) else {}
    start, end = cfg.backfill or (query_start(cfg, state), "")
    if cfg.backfill:
        log.info("pacs-ingest: backfill of studies dated %s to %s (the watermark stays)", start, end)
    try:
        found, complete = run.find_studies(start, end)
    except (PacsAuthError, PacsUnavailable, PacsRequestError, ConfigError):  # URL, account
        raise
    except Exception as exc:  # an answer we cannot read; its text may quote identifiers
        raise PacsRequestError(f"pacs-ingest: the PACS's study search answer could not be read "
                               f"({type(exc).__name__})") from None
    done = part_files(run.root)
    # a study is fetched when it has no part yet, or when the PACS now holds more of its
    # instances than when it was fetched (instances still arriving from the modality)
    # the study-level count is a cheap first look (it also counts other modalities and the results
    # pacs-report sent back); a study past it is counted again over its wanted series only
    grown = {uid for uid, (_, n) in found.items() if run.keys.uid(uid) in done
             and run.grew(uid, n, *_recorded_instances(run.root, run.keys.uid(uid)))}
    new = sorted((d or "", uid) for uid, (d, _) in found.items()
                 if run.keys.uid(uid) not in done or uid in grown)
    todo, left = new[:cfg.max_studies], new[cfg.max_studies:]
    log.info("pacs-ingest: %d studies %s, %d already ingested (%d grew since), %d to fetch now%s",
             len(found), "since the watermark" if state.get("watermark") else "found",
             len(found) - len(new) + len(grown), len(grown), len(todo),
             f", {len(left)} left for the next run" if left else "")
    from fracture_ops.cli_common import progress

    written, quarantined, failed, held = 0, [], [], []
    for date_, study in progress(todo, "pacs-ingest studies"):
        key = run.keys.uid(study)
        try:
            rows, bad, links = run.study(study)
        except (PacsAuthError, PacsUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - this study only; retried next run
            failed.append({"study_id": key, "date": date_, "reason": type(exc).__name__})
            log.warning("pacs-ingest: study %s failed (%s); it is fetched again next run", key,
                        type(exc).__name__)
            continue
        storage.write_parquet(storage.join(raw_dir(cfg), "links", f"{key}.parquet"),
                              pd.DataFrame(links, columns=["image_id", "study_uid", "series_uid", "sop_uid"]))
        part = (key, rows, len(rows) + len(bad))  # the wanted series' instances, all handled
        written += len(rows)
        if bad:  # committed only once the run is within its error budget (below)
            quarantined += bad
            held.append((part, bad, date_))
        else:
            stale = storage.join(run.root, "quarantine", f"{key}.json")
            if storage.exists(stale):  # an earlier fetch of this study refused or held some
                storage.delete(stale)
            commit_part(run.root, *part)
    attempted = written + len(quarantined)
    over_budget = bool(attempted) and len(quarantined) / attempted > cfg.max_bad_fraction
    if not over_budget:  # a systemic fault (every instance refused) leaves these to a rerun
        for part, bad, _ in held:
            storage.write_json(storage.join(run.root, "quarantine", f"{part[0]}.json"), bad)
            commit_part(run.root, *part)
    manifest = rebuild_manifest(run.root)
    manifest_uri = storage.write_parquet(storage.join(run.root, MANIFEST), manifest)
    again = [f["date"] for f in failed] + ([d for _, _, d in held] if over_budget else [])
    watermark = next_watermark(state.get("watermark"), [d for d, _ in todo], again, complete)
    moved = bool(watermark) and watermark != state.get("watermark") and not cfg.backfill
    if moved:
        storage.write_json(state_at, {"watermark": watermark, "updated": date.today().isoformat()})
    summary = {"dataset_uri": run.root, "manifest_uri": manifest_uri, "studies_found": len(found),
               "studies_ingested": len(todo) - len(failed), "studies_failed": len(failed),
               "studies_already_ingested": len(found) - len(new), "studies_grown": len(grown),
               "studies_left": len(left), "instances_written": written,
               "instances_quarantined": len(quarantined), "manifest_rows": len(manifest),
               "listing_complete": complete, "watermark_moved": moved}
    out_dir = cfg.output_dir(STEP)
    storage.write_json(storage.join(out_dir, catalog.PACS_INGEST_REPORT.file),
                       {**summary, "run_id": cfg.run_id, "attempt": attempt,
                        "run_failed": over_budget,
                        "quarantined": quarantined,
                        "failed": [{k: v for k, v in f.items() if k != "date"} for f in failed]})
    summary["gallery_uri"] = _write_gallery(out_dir, run)
    if over_budget:
        raise ErrorBudgetExceeded(f"pacs-ingest: {len(quarantined)} of {attempted} instances "
                                  f"quarantined (> {cfg.max_bad_fraction}); their studies are not "
                                  f"recorded and are fetched again next run; see {out_dir}/report.json")
    storage.mark_success(out_dir, summary)
    log.info("pacs-ingest: %d instances of %d studies written, %d quarantined, %d studies failed; "
             "manifest %d rows", written, len(todo) - len(failed), len(quarantined), len(failed),
             len(manifest))
    return summary


def _recorded_instances(root: str, key: str) -> tuple[int, bool]:
    """A committed study's instance count and whether it counts its wanted series only (records
    written before that rule hold the study-level count)."""
    uri = storage.join(root, "parts", f"{key}.json")
    if not storage.exists(uri):
        return 0, True
    record = storage.read_json(uri)
    return int(record.get("instances", 0)), record.get("counted") == "wanted_series"


def _valid_date(value: str, today: date | None = None) -> bool:
    """A real calendar date YYYYMMDD, not after tomorrow (a study dated in the future, by
    mistake or by someone who can store studies, must not push the watermark past everything)."""
    try:
        day = datetime.strptime(value, "%Y%m%d").date()
    except (TypeError, ValueError):
        return False
    return day <= (today or date.today()) + timedelta(days=1)


def next_watermark(previous: str | None, fetched: list[str], held_back: list[str],
                   complete: bool = True, today: date | None = None) -> str | None:
    """The watermark after a run: the latest valid study date fetched, but never past a study
    that must be fetched again (failed, or over the error budget), never moved when the listing
    may be incomplete, and never backwards.

    Args:
        previous: the watermark before the run (None on the first run).
        fetched: study dates of the studies fetched this run.
        held_back: study dates of the studies to fetch again next run.
        complete: whether the study listing was complete.
    """
    if not complete:
        return previous
    dates = [d for d in fetched if _valid_date(d, today)]
    if previous:
        dates.append(previous)
    if not dates:
        return previous
    mark = max(dates)
    blocked = [d for d in held_back if _valid_date(d, today)]
    if blocked:  # the next query (watermark - lookback) must still find them
        mark = min(mark, min(blocked))
        mark = max(mark, previous) if previous else mark
    return mark


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops pacs-ingest``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    add_field_flags(parser, PacsIngestConfig, "dataset", "since", "lookback_days", "max_studies",
                    "retries", "backoff_s", "timeout_s", "allow_dev_secret", "max_bad_fraction")
    parser.add_argument("--backfill", nargs=2, metavar=("FROM", "TO"), default=None,
                        help="fetch every study dated FROM..TO (YYYYMMDD) that the dataset lacks, "
                        "whatever the watermark (which stays)")
    parser.add_argument("--modality", dest="modalities", action="append", metavar="CODE",
                        help="study modality to pull (repeatable; default CR, DX, DR)")
    parser.add_argument("--body-part", dest="body_parts", action="append", metavar="CODE",
                        help="series Body Part Examined to keep (repeatable; default any)")
    parser.epilog = ("The PACS: $FRACTURE_OPS_PACS_URL (DICOMweb root), $FRACTURE_OPS_PACS_USERNAME, "
                     "$FRACTURE_OPS_PACS_PASSWORD (from a Secret or the Airflow connection "
                     "fracture_ops_pacs). De-identification: the deidentify section of --config and "
                     "$FRACTURE_OPS_DEID_SECRET. " + (parser.epilog or ""))
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    from fracture_ops.cli_common import config_from_args
    from fracture_ops.config import load_config
    from fracture_ops.deid.config import DeidConfig

    cfg = config_from_args(PacsIngestConfig, args, modalities=args.modalities,
                           body_parts=args.body_parts, backfill=args.backfill)
    try:  # a bad deidentify section is this run's failure too: it leaves its report
        deid_cfg = load_config(DeidConfig, getattr(args, "config", None),
                               {"artifact_root": cfg.artifact_root, "raw_root": cfg.raw_root,
                                "run_id": cfg.run_id, "allow_dev_secret": cfg.allow_dev_secret,
                                "workers": 1})
    except Exception as exc:
        from fracture_ops.config import write_resolved

        write_resolved(cfg, cfg.output_dir(STEP))
        report_failure(cfg, exc)
        raise
    return pacs_ingest_step(cfg, deid_cfg)
