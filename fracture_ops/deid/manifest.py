"""De-identification in manifest mode: the pipeline's ``deidentify`` step.

Each DICOM row is de-identified into the step folder, PNG/JPEG rows lose their metadata, and the
manifest's ``patient_id``/``study_id``/``image_id`` are replaced by the same keyed pseudonyms the
DICOM headers get, so patient-wise splits still work after de-identification.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.deid.config import STEP, DeidConfig, load_keys
from fracture_ops.deid.folder import (
    HELD_DIR,
    Processed,
    is_held,
    fill_record,
    parallel_map,
    process_bytes,
    quarantine,
    with_thumbnail,
)
from fracture_ops.deid.profile import DeidKeys
from fracture_ops.deid.report import THUMBNAILS, finish
from fracture_ops.errors import ConfigError, ManifestError


def _sibling(uri: str, name: str) -> str:
    parent = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)
    return storage.join(parent, name)


def _ids(row: dict) -> tuple[str | None, str | None]:
    import pandas as pd

    pid = None if pd.isna(row["patient_id"]) else str(row["patient_id"])
    study = None if pd.isna(row["study_id"]) else str(row["study_id"])
    return pid, study


def _process_row(row: dict, keys: DeidKeys, cfg: DeidConfig) -> tuple[dict, Processed | None]:
    """De-identify one row's image (in a worker): its audit record and output, or None."""
    new_id = keys.image_id(str(row["image_id"]))
    rec = {"input": keys.path_hash(str(row["image_uri"])), "image_id": new_id}
    pid, study = _ids(row)
    problem = storage.image_uri_problem(str(row["image_uri"]), cfg.data_roots)
    if problem:  # never opened: a manifest must not make this step copy any readable file
        rec.update(status="quarantined", reason=f"image_uri {problem}")
        return rec, None
    try:
        data = storage.read_bytes(row["image_uri"])
        suffix = Path(str(row["image_uri"])).suffix.lower()
        return rec, with_thumbnail(process_bytes(data, suffix, keys, cfg, pid, study))
    except Exception as exc:  # noqa: BLE001 - quarantined rows are listed in the report
        quarantine(rec, exc)
        return rec, None


def _write_row(row: dict, rec: dict, done: Processed, keys: DeidKeys, out_dir: str) -> dict:
    name = f"{HELD_DIR + '/' if is_held(done) else ''}images/{rec['image_id']}{done.ext}"
    uri = storage.write_bytes(storage.join(out_dir, *name.split("/")), done.data)
    fill_record(rec, done, name)
    if is_held(done):
        rec["sha256"] = hashlib.sha256(done.data).hexdigest()
    pid, study = _ids(row)
    return dict(row, image_id=rec["image_id"], image_uri=uri,
                patient_id=keys.patient(pid) if pid is not None else None,
                study_id=keys.uid(study) if study is not None else None)


def _pass_boxes(cfg: DeidConfig, id_map: dict[str, str], out_dir: str) -> str | None:
    from fracture_ops.data.manifest import BOX_COLUMNS

    uri = cfg.boxes_uri or _sibling(cfg.manifest_uri, catalog.INGEST_BOXES.file)
    if not storage.exists(uri):
        if cfg.boxes_uri:
            raise ManifestError("deidentify: boxes_uri does not exist")
        return None
    boxes = storage.read_parquet(uri)
    boxes = boxes[boxes["image_id"].astype(str).isin(id_map)].copy()
    boxes["image_id"] = boxes["image_id"].astype(str).map(id_map)
    boxes = boxes[[c for c in BOX_COLUMNS if c in boxes.columns]]
    boxes = boxes.sort_values(list(boxes.columns), kind="stable").reset_index(drop=True)
    return storage.write_parquet(storage.join(out_dir, catalog.DEID_BOXES.file), boxes)


def deidentify_manifest_step(cfg: DeidConfig) -> dict:
    """Manifest mode: de-identify every row's image and pseudonymise the manifest's ids.

    Writes ``images/``, ``manifest.deid.parquet``, ``boxes.deid.parquet`` (when a box table
    exists), ``report.json``, ``audit.jsonl``, ``config.resolved.yaml`` and ``_SUCCESS`` (last)
    under ``cfg.output_dir("deidentify")``. Extra columns not in ``keep_columns`` are dropped
    (they may carry names); ``lbl_*`` columns are kept.

    Returns:
        The summary, including ``manifest_uri`` of the de-identified manifest.

    Raises:
        ConfigError: ``manifest_uri`` unset or no secret.
        ManifestError: unreadable manifest or missing columns.
        ErrorBudgetExceeded: too many rows quarantined.
    """
    import pandas as pd

    from fracture_ops.data.manifest import MANIFEST_COLUMNS, MULTILABEL_PREFIX, normalize_manifest

    if not cfg.manifest_uri:
        raise ConfigError("deidentify: manifest_uri is not set")
    try:
        manifest = normalize_manifest(storage.read_parquet(cfg.manifest_uri))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"deidentify: cannot read the manifest: {type(exc).__name__}") from exc
    keys = load_keys(cfg)
    out_dir = cfg.output_dir(STEP)
    storage.reset_dir(out_dir)
    records, rows, held_rows, id_map, thumbs = [], [], [], {}, {}
    inputs = manifest.to_dict("records")
    for row, (rec, done) in zip(inputs, parallel_map(_process_row, inputs, keys, cfg,
                                                     "deidentify")):
        records.append(rec)
        if done is not None:
            new_row = _write_row(row, rec, done, keys, out_dir)
            if done.thumbnail and (len(thumbs) < THUMBNAILS or is_held(done)):
                thumbs[rec["output"]] = done.thumbnail
            if is_held(done):  # released into the manifest by `deid review --approve`
                held_rows.append(new_row)
                continue
            rows.append(new_row)
            id_map[str(row["image_id"])] = new_row["image_id"]
    keep = [c for c in manifest.columns if c in MANIFEST_COLUMNS or c in cfg.keep_columns
            or c.startswith(MULTILABEL_PREFIX)]
    out = normalize_manifest(pd.DataFrame(rows, columns=list(manifest.columns))[keep])
    manifest_out = storage.write_parquet(storage.join(out_dir, catalog.DEID_MANIFEST.file), out)
    if held_rows:  # the rows `deid review --approve` adds to the manifest
        held = normalize_manifest(pd.DataFrame(held_rows, columns=list(manifest.columns))[keep])
        storage.write_parquet(storage.join(out_dir, HELD_DIR, "manifest.held.parquet"), held)
    boxes_out = _pass_boxes(cfg, id_map, out_dir)
    extra = {"manifest_uri": manifest_out, "boxes_uri": boxes_out, "output_dir": out_dir,
             "rows": len(out), "dropped_columns": sorted(set(manifest.columns) - set(keep))}
    return finish(out_dir, records, cfg, keys, "manifest", extra, thumbs)
