"""The detection steps: ``detect_train_step``, ``detect_val_step``, ``detect_predict_step``.

Each reads its inputs, calls the pure helpers of :mod:`dataset`, :mod:`yolo`, :mod:`metrics` and
:mod:`report`, writes under ``<artifact_root>/runs/<run_id>/<step>/`` (reset first; ``_SUCCESS``
last) and returns a small JSON summary. ultralytics needs local files, so a step whose artifact
root is on S3 works in a temporary folder and uploads it at the end.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from collections.abc import Iterator

import numpy as np
import pandas as pd

from fracture_ops import storage
from fracture_ops.config import write_resolved
from fracture_ops.data.manifest import BINARY_LABELS, manifest_hash
from fracture_ops.detection import metrics as M
from fracture_ops.detection import yolo
from fracture_ops.detection.dataset import (YoloDataset, export_yolo_dataset, load_split_inputs,
                                            safe_name)
from fracture_ops.detection.report import (ReportItem, draw_overlay, item_image, png_bytes,
                                           render_report)
from fracture_ops.detection.yolo import DetectConfig, ImagePrediction
from fracture_ops.errors import ConfigError, ErrorBudgetExceeded

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


@contextlib.contextmanager
def local_workdir(out: str) -> Iterator[Path]:
    """The step folder itself when local, else a temporary folder uploaded to ``out`` at the end."""
    storage.reset_dir(out)
    if not storage.is_s3(out):
        yield Path(out).resolve()
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
        storage.upload_dir(tmp, out)


def _ground_truth(table: pd.DataFrame, boxes: pd.DataFrame) -> tuple[dict, dict, str]:
    """Per image: GT boxes (xyxy) and the 0/1 fracture label used for image-level metrics.

    The label column is the classification track's ground truth, so both tracks are scored on the
    same labels; sources without binary labels fall back to "has a box".
    """
    gt = {k: g[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float) for k, g in
          boxes.groupby("image_id")} if len(boxes) else {}
    binary = set(table["label"].astype(str)) <= set(BINARY_LABELS)
    y = {str(r.image_id): int(str(r.label) == "fracture") if binary else int(str(r.image_id) in gt)
         for r in table.itertuples(index=False)}
    return gt, y, "label" if binary else "boxes"


def evaluate(cfg: DetectConfig, weights: Path, ds: YoloDataset, table: pd.DataFrame,
             boxes: pd.DataFrame, split: str, work: Path) -> tuple[dict, list[ImagePrediction], list]:
    """Box metrics (ultralytics val), image-level metrics and report items for one split.

    Returns:
        ``(metrics, predictions at cfg.conf, report items sorted worst first)``.
    """
    det = yolo.validate(cfg, weights, ds.data_yaml, split, work)
    ids = [i for i, s in ds.splits.items() if s == split]
    files = [str(ds.files[i]) for i in ids]
    model = yolo.load_model(cfg.model_copy(update={"weights": str(weights)}), for_training=False)
    # streamed in batches: full-size radiographs do not all fit in memory at once
    preds, _ = yolo.predict_uris(model, files, ids, cfg, conf=min(cfg.score_conf, cfg.conf))
    gt, y, y_source = _ground_truth(table, boxes)
    metrics = {"split": split, "images": len(ids), **M.det_metrics_summary(det, ds.class_names)}
    image_level = M.image_level_metrics([y[p.image_id] for p in preds], [p.score for p in preds],
                                        cfg.spec_target)
    metrics["image_level"] = {**image_level, "label_source": y_source}
    shown = [ImagePrediction(p.image_id, p.width, p.height,
                             [b for b in p.boxes if b["confidence"] >= cfg.conf], p.score)
             for p in preds]
    items = []
    file_of = dict(zip(ids, files))
    for p in shown:
        g = gt.get(p.image_id, np.zeros((0, 4)))
        pb = np.array([[b["x_min"], b["y_min"], b["x_max"], b["y_max"]] for b in p.boxes]).reshape(-1, 4)
        items.append(ReportItem(p.image_id, file_of[p.image_id], [tuple(b) for b in g], p.boxes,
                                M.match_image(g, pb), p.score))
    items.sort(key=lambda it: M.severity_key(it.match, it.score))
    return metrics, shown, items


def _write_eval_outputs(work: Path, title: str, metrics: dict, preds: list[ImagePrediction],
                        items: list, cfg: DetectConfig, notes: list[str]) -> list[Path]:
    """metrics.json, predictions.json, report.html; returns their paths."""
    storage.write_json(work / "metrics.json", metrics)
    storage.write_json(work / "predictions.json", [p.to_json() for p in preds])
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    flat.update({f"image {k}": v for k, v in metrics["image_level"].items()})
    flat["per_class"] = metrics.get("per_class")
    html = render_report(title, flat, items[:cfg.report_images], notes)
    storage.write_text(work / "report.html", html)
    return [work / "metrics.json", work / "predictions.json", work / "report.html"]


def _samples(items: list, n: int, folder: Path) -> list[Path]:
    """Overlay PNGs of ``n`` images spread over the worst-first order (bad and good ones)."""
    if not items or n <= 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    picks = sorted(set(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int)))
    out = []
    for rank, i in enumerate(picks):
        it = items[i]
        path = folder / f"{rank:02d}_{safe_name(it.image_id)}.png"
        path.write_bytes(png_bytes(draw_overlay(item_image(it), it.gt, it.pred)))
        out.append(path)
    return out


def detect_train_step(cfg: DetectConfig) -> dict:
    """Export the YOLO data set, train, evaluate on ``cfg.eval_split``, report, log to MLflow.

    Raises:
        ConfigError: no split table, bad weights or architecture (before any heavy work).
        ManifestError / LeakageError / ErrorBudgetExceeded: bad input data.
    """
    if not cfg.split_uri:
        raise ConfigError("detect train: split_uri is required")
    yolo.check_weights(cfg.weights, required=False)
    if not cfg.weights:
        yolo.check_architecture(cfg.model)
    table, boxes = load_split_inputs(cfg.split_uri, cfg.boxes_uri)
    out = cfg.output_dir("detect_train")
    with local_workdir(out) as work:
        ds = export_yolo_dataset(table, boxes, work / "dataset", cfg.class_names, cfg.max_bad_fraction)
        cfg = cfg.model_copy(update={"class_names": ds.class_names})
        t0 = time.perf_counter()
        best = yolo.train(cfg, ds.data_yaml, work)
        train_s = time.perf_counter() - t0
        weights = work / "weights" / "best.pt"
        weights.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, weights)
        metrics, preds, items = evaluate(cfg, weights, ds, table, boxes, cfg.eval_split, work)
        metrics["dataset"] = {"counts": ds.counts, "quarantined": ds.quarantined,
                              "manifest_hash": manifest_hash(table)}
        notes = _notes(cfg, ds)
        files = _write_eval_outputs(work, "Fracture detection: training run", metrics, preds,
                                    items, cfg, notes)
        write_resolved(cfg, str(work))
        samples = _samples(items, cfg.sample_images, work / "samples")
        summary = _summary(out, metrics, train_s)
        if cfg.mlflow:
            from fracture_ops.detection.tracking import log_detection_run

            summary.update(log_detection_run(
                cfg, {**metrics, "train_seconds": train_s}, weights,
                files + [work / "config.resolved.yaml"], samples,
                tags={"manifest_hash": manifest_hash(table)},
                example_image=str(next(iter(ds.files.values())))))
        storage.write_json(work / "summary.json", summary)
    storage.mark_success(out, summary)
    return summary


def _notes(cfg: DetectConfig, ds: YoloDataset) -> list[str]:
    start = f"weights {Path(cfg.weights).name}" if cfg.weights else f"{cfg.model} from scratch"
    counts = "; ".join(f"{s}: {c['images']} images, {c['boxes']} boxes, {c['negatives']} negatives"
                       for s, c in ds.counts.items())
    return [f"Model: {start}; imgsz {cfg.imgsz}, epochs {cfg.epochs}, batch {cfg.batch}.",
            f"Data: {counts}. Quarantined: {len(ds.quarantined)}.",
            f"Drawn boxes: confidence >= {cfg.conf}; image score = highest box confidence "
            f"(boxes >= {min(cfg.score_conf, cfg.conf)}), 0 without a box."]


def _summary(out: str, metrics: dict, train_s: float | None = None) -> dict:
    il = metrics["image_level"]
    s = {"out_dir": out, "split": metrics["split"], "images": metrics["images"],
         "map50": round(metrics["map50"], 4), "map50_95": round(metrics["map50_95"], 4),
         "image_auroc": round(il["auroc"], 4) if il["auroc"] == il["auroc"] else None}
    if train_s is not None:
        s["weights_uri"] = storage.join(out, "weights", "best.pt")
        s["train_seconds"] = round(train_s, 1)
    return s


def detect_val_step(cfg: DetectConfig) -> dict:
    """Evaluate given weights on ``cfg.eval_split`` of a split table (metrics, predictions, report)."""
    weights = yolo.check_weights(cfg.weights, required=True)
    if not cfg.split_uri:
        raise ConfigError("detect val: split_uri is required")
    table, boxes = load_split_inputs(cfg.split_uri, cfg.boxes_uri)
    names = cfg.class_names or _model_class_names(cfg)
    out = cfg.output_dir("detect_val")
    with local_workdir(out) as work:
        ds = export_yolo_dataset(table, boxes, work / "dataset", names, cfg.max_bad_fraction,
                                 splits=(cfg.eval_split,))
        metrics, preds, items = evaluate(cfg, weights, ds, table, boxes, cfg.eval_split, work)
        metrics["dataset"] = {"counts": ds.counts, "quarantined": ds.quarantined}
        _write_eval_outputs(work, f"Fracture detection: evaluation on {cfg.eval_split}", metrics,
                            preds, items, cfg, _notes(cfg, ds))
        write_resolved(cfg, str(work))
        summary = _summary(out, metrics)
    storage.mark_success(out, summary)
    return summary


def _model_class_names(cfg: DetectConfig) -> list[str]:
    model = yolo.load_model(cfg, for_training=False)
    return [str(model.names[i]) for i in sorted(model.names)]


def _source_images(source: str) -> tuple[list[str], list[str]]:
    """Image URIs under a folder (or the single file) and their ids (relative path, no suffix)."""
    if not source:
        raise ConfigError("detect predict: source_uri (an image or a folder) is required")
    is_file = source.lower().endswith(IMAGE_SUFFIXES) and storage.exists(source)
    uris = [source] if is_file else storage.list_files(source, IMAGE_SUFFIXES)
    if not uris:
        raise ConfigError(f"detect predict: no images ({', '.join(IMAGE_SUFFIXES)}) at {source}")
    base = "" if is_file else str(source).rstrip("/\\")
    ids = [str(PurePosixPath(u[len(base):].replace("\\", "/").lstrip("/")).with_suffix(""))
           if base else PurePosixPath(u.replace("\\", "/")).stem for u in uris]
    return uris, ids


def detect_predict_step(cfg: DetectConfig) -> dict:
    """Predict boxes on an image or a folder: ``predictions.json`` + ``overlays/*.png``.

    Boxes are in the original image's pixel coordinates; images that cannot be read are
    quarantined (``quarantine.json``) up to ``cfg.max_bad_fraction``.
    """
    from fracture_ops.data.images import read_image

    weights = yolo.check_weights(cfg.weights, required=True)
    uris, ids = _source_images(cfg.source_uri)
    model = yolo.load_model(cfg, for_training=False)
    out = cfg.output_dir("detect_predict")
    with local_workdir(out) as work:
        preds, bad = yolo.predict_uris(model, uris, ids, cfg, cfg.conf)
        if bad and len(bad) / len(uris) > cfg.max_bad_fraction:
            raise ErrorBudgetExceeded(f"{len(bad)} of {len(uris)} images unreadable "
                                      f"(budget {cfg.max_bad_fraction:.0%})")
        by_id = dict(zip(ids, uris))
        (work / "overlays").mkdir()
        for p in preds:
            img = read_image(by_id[p.image_id])[0]
            (work / "overlays" / f"{safe_name(p.image_id)}.png").write_bytes(
                png_bytes(draw_overlay(img, [], p.boxes, max_side=1024)))
        storage.write_json(work / "predictions.json", [p.to_json() for p in preds])
        storage.write_json(work / "quarantine.json", bad)
        write_resolved(cfg, str(work))
        summary = {"out_dir": out, "predictions_uri": storage.join(out, "predictions.json"),
                   "images": len(preds), "quarantined": len(bad), "weights": weights.name,
                   "images_with_boxes": sum(bool(p.boxes) for p in preds)}
    storage.mark_success(out, summary)
    return summary
