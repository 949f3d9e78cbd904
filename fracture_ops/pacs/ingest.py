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

from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.errors import ConfigError, ErrorBudgetExceeded
from fracture_ops.pacs.dicomweb import (
    PacsAuthError,
    PacsConnection,
    PacsUnavailable,
    tag_value,
)

log = logging.getLogger(__name__)
STEP = "pacs_ingest"
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
STUDY_DATE, MODALITY, BODY_PART = "00080020", "00080060", "00180015"
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
    if mark:
        start = datetime.strptime(mark, "%Y%m%d").date() - timedelta(days=cfg.lookback_days)
        return start.strftime("%Y%m%d")
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

    def find_studies(self, start: str) -> dict[str, str]:
        """Study UID -> study date of every study with a wanted modality since ``start``."""
        found: dict[str, str] = {}
        for modality in self.cfg.modalities:
            filters = {"ModalitiesInStudy": modality}
            if start:
                filters["StudyDate"] = f"{start}-"
            offset = 0
            while True:  # page by page: a PACS may cap each answer (and some ignore offset)
                items = self.conn.call(f"QIDO-RS study search ({modality})", lambda f=filters, o=offset:
                                       self.client.search_for_studies(search_filters=f, fields=["StudyDate"],
                                                                      limit=QIDO_PAGE, offset=o))
                before = len(found)
                for item in items:
                    uid = tag_value(item, STUDY_UID)
                    if uid:
                        found[uid] = tag_value(item, STUDY_DATE)
                if len(items) < QIDO_PAGE or len(found) == before:
                    break
                offset += len(items)
        return found

    def wanted_series(self, study: str) -> list[str]:
        items = self.conn.call("QIDO-RS series search", lambda: self.client.search_for_series(
            study_instance_uid=study, fields=["Modality", "BodyPartExamined"]))
        keep = []
        for item in items:
            if tag_value(item, MODALITY).upper() not in self.cfg.modalities:
                continue
            if self.cfg.body_parts and tag_value(item, BODY_PART).upper() not in self.cfg.body_parts:
                continue
            keep.append(tag_value(item, SERIES_UID))
        return [s for s in keep if s]

    def study(self, study: str) -> tuple[list[dict], list[dict], list[dict]]:
        """Fetch, de-identify and write one study's wanted instances: ``(rows, quarantined,
        links)``; a link ties an image id to the original study, series and SOP instance UIDs
        (identifying: the raw zone's, for sending results back to the PACS).

        Raises:
            PacsAuthError, PacsUnavailable: the PACS itself failed (the run stops; nothing of
                this study is recorded, so the next run fetches it again).
        """
        from fracture_ops.data.manifest import LATERALITIES, VIEWS
        from fracture_ops.deid.folder import process_bytes

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
                    from fracture_ops.errors import FileRejected

                    reason = str(exc) if isinstance(exc, FileRejected) else f"unreadable: {type(exc).__name__}"
                    bad.append({"study_id": self.keys.uid(study), "image_id": image_id, "reason": reason})
                    log.warning("pacs-ingest: instance %s of study %s quarantined: %s", image_id,
                                self.keys.uid(study), reason)
                    continue
                uri = storage.write_bytes(storage.join(self.root, "images", f"{image_id}.dcm"), done.data)
                view = _code(ds, "ViewPosition", VIEWS, "UNKNOWN")
                side = _code(ds, "ImageLaterality", LATERALITIES, "") or _code(ds, "Laterality", LATERALITIES, "U")
                links.append({"image_id": image_id, "study_uid": study, "series_uid": series, "sop_uid": sop})
                rows.append({"image_id": image_id, "image_uri": uri, "patient_id": done.result.patient,
                             "study_id": done.result.study_uid, "label": None, "view": view,
                             "laterality": side,
                             "body_region": str(ds.get("BodyPartExamined", "") or "unknown").strip().lower(),
                             "source": "pacs", "modality": str(ds.get("Modality", "")),
                             "text_regions_blanked": int((done.pixels or {}).get("regions", 0))})
        return rows, bad, links


def _parts(root: str) -> dict[str, str]:
    """Pseudonymous study UID -> part file, for the studies already ingested."""
    folder = storage.join(root, "parts")
    return {uri.rsplit("/", 1)[-1][:-len(".parquet")]: uri
            for uri in (storage.list_files(folder, (".parquet",)) if storage.exists(folder) else [])}


def rebuild_manifest(root: str):
    """The dataset manifest: every part's rows, canonical columns, sorted by image id."""
    import pandas as pd

    from fracture_ops.data.manifest import normalize_manifest

    frames = [storage.read_parquet(uri) for uri in sorted(_parts(root).values())]
    frames = [f for f in frames if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["image_id", "image_uri", "patient_id", "study_id", "label"])
    return normalize_manifest(table)


def pacs_ingest_step(cfg: PacsIngestConfig, deid_cfg=None, conn: PacsConnection | None = None) -> dict:
    """Pull the new studies (see the module docstring) and return the run's summary.

    Raises:
        ConfigError: no PACS URL, or the PACS refused the account (401/403).
        PacsUnavailable: the PACS kept failing after the retries (exit 1: retried later).
        ErrorBudgetExceeded: more than ``max_bad_fraction`` of the instances were quarantined.
    """
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
    start = query_start(cfg, state)
    found = run.find_studies(start)
    done = _parts(run.root)
    new = sorted((d or "", uid) for uid, d in found.items() if run.keys.uid(uid) not in done)
    todo, left = new[:cfg.max_studies], new[cfg.max_studies:]
    log.info("pacs-ingest: %d studies %s, %d already ingested, %d to fetch now%s",
             len(found), "since the watermark" if state.get("watermark") else "found",
             len(found) - len(new), len(todo),
             f", {len(left)} left for the next run" if left else "")
    from fracture_ops.cli_common import progress

    written, quarantined = 0, []
    for _, study in progress(todo, "pacs-ingest studies"):
        rows, bad, links = run.study(study)
        key = run.keys.uid(study)
        storage.write_parquet(storage.join(raw_dir(cfg), "links", f"{key}.parquet"),
                              pd.DataFrame(links, columns=["image_id", "study_uid", "series_uid", "sop_uid"]))
        if bad:
            storage.write_json(storage.join(run.root, "quarantine", f"{key}.json"), bad)
        # the part last: its presence means every instance of the study is written or quarantined
        storage.write_parquet(storage.join(run.root, "parts", f"{key}.parquet"),
                              pd.DataFrame(rows, columns=list(rows[0]) if rows else ["image_id"]))
        written += len(rows)
        quarantined += bad
    manifest = rebuild_manifest(run.root)
    manifest_uri = storage.write_parquet(storage.join(run.root, "manifest.parquet"), manifest)
    # studies are fetched in date order, so the studies left by the cap are never older than
    # the watermark: the next run's query (watermark - lookback) still finds them
    dates = [d for d, _ in todo if d] + ([state["watermark"]] if state.get("watermark") else [])
    watermark = max(dates) if dates else None
    moved = bool(watermark) and watermark != state.get("watermark")
    if moved:
        storage.write_json(state_at, {"watermark": watermark, "updated": date.today().isoformat()})
    attempted = written + len(quarantined)
    summary = {"dataset_uri": run.root, "manifest_uri": manifest_uri, "studies_found": len(found),
               "studies_ingested": len(todo), "studies_already_ingested": len(found) - len(new),
               "studies_left": len(left), "instances_written": written,
               "instances_quarantined": len(quarantined), "manifest_rows": len(manifest),
               "watermark_moved": moved}
    out_dir = cfg.output_dir(STEP)
    storage.write_json(storage.join(out_dir, "report.json"), {**summary, "quarantined": quarantined})
    if attempted and len(quarantined) / attempted > cfg.max_bad_fraction:
        raise ErrorBudgetExceeded(f"pacs-ingest: {len(quarantined)} of {attempted} instances "
                                  f"quarantined (> {cfg.max_bad_fraction}); see {out_dir}/report.json")
    storage.mark_success(out_dir, summary)
    log.info("pacs-ingest: %d instances of %d studies written, %d quarantined; manifest %d rows",
             written, len(todo), len(quarantined), len(manifest))
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops pacs-ingest``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    add_field_flags(parser, PacsIngestConfig, "dataset", "since", "lookback_days", "max_studies",
                    "retries", "backoff_s", "timeout_s", "allow_dev_secret", "max_bad_fraction")
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

    cfg = config_from_args(PacsIngestConfig, args, modalities=args.modalities, body_parts=args.body_parts)
    deid_cfg = load_config(DeidConfig, getattr(args, "config", None),
                           {"artifact_root": cfg.artifact_root, "raw_root": cfg.raw_root,
                            "run_id": cfg.run_id, "allow_dev_secret": cfg.allow_dev_secret, "workers": 1})
    return pacs_ingest_step(cfg, deid_cfg)
