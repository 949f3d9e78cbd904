"""The ``cam`` step: a Grad-CAM report on a split, or one overlay for one image.

Report mode reads the train step's folder (``model.pt``, ``predictions.parquet``), scores the split
with the calibration and thresholds fitted on validation (this run's ``calibrate`` and
``tune_thresholds`` folders when they exist; raw sigmoid/softmax and 0.5 otherwise), picks the top
positive predictions, the false negatives and the false positives, and explains each with Grad-CAM
(Selvaraju et al., ICCV 2017; see :mod:`fracture_ops.model.gradcam`). Images are found through
the split table named in ``model_info.json`` (``split_uri``). When fracture boxes are available
(this run's ``ingest/boxes.parquet`` or ``boxes_uri``) each case also gets the share of CAM energy
inside its boxes relative to their area (1 = chance).

Outputs under ``<artifact_root>/runs/<run_id>/cam/``: ``report.html`` (self-contained),
``cams.json`` (the cases), ``config.resolved.yaml`` and ``_SUCCESS`` last. Images that cannot be
read are listed in ``cams.json`` and the report; past ``error_budget`` the step fails.

Single-image mode (``fracture-ops cam --image X``) writes one overlay PNG and returns the
probability and decision. Research and education only; not for clinical use.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.errors import BadInputError, ConfigError, ErrorBudgetExceeded
from fracture_ops.model.network import MODEL_FILE

log = logging.getLogger(__name__)

STEP = "cam"


class CamConfig(StepConfig):
    """Config of the ``cam`` step.

    ``calibration_uri``/``thresholds_uri``/``boxes_uri``: None = this run's step output when it
    exists (siblings of ``train_dir``), ``""`` = none (raw probabilities, 0.5, no boxes).
    """

    section: ClassVar[str] = STEP
    train_dir: str = ""  # default: this run's train folder
    calibration_uri: str | None = None
    thresholds_uri: str | None = None
    boxes_uri: str | None = None
    split: Literal["train", "val", "test"] = "test"
    class_name: str | None = None  # default: the first class (binary: the positive one)
    top_k: int = Field(8, ge=0)
    max_errors: int = Field(8, ge=0)
    alpha: float = Field(0.4, ge=0, le=1)  # weight of the heatmap in the overlay
    target_layer: str | None = None  # dotted module path; default per backbone family
    display_size: int = Field(320, ge=64, le=2048)
    device: str = "auto"
    error_budget: float = Field(0.25, ge=0, le=1)


def _sibling(train_dir: str, step: str, filename: str) -> str:
    """``<run>/<step>/<filename>`` next to ``<run>/train`` when that step finished, else ``""``."""
    parent = train_dir.rstrip("/").rsplit("/", 1)[0] if storage.is_s3(train_dir) \
        else str(Path(train_dir).parent)
    folder = storage.join(parent, step)
    uri = storage.join(folder, filename)
    return uri if storage.is_complete(folder) and storage.exists(uri) else ""


def _run_boxes(train_dir: str, raw_run_dir: str = "") -> str:
    """This run's boxes keyed like the predictions: after de-identification image ids change, so
    the de-identified table comes first; a run trained without de-identification (its ids are
    the source's own) has only the validated or ingested table, in the raw zone."""
    uri = _sibling(train_dir, catalog.DEID_BOXES.step, catalog.DEID_BOXES.file)
    if uri or not raw_run_dir:
        return uri
    for step, name in ((catalog.CLEAN_BOXES.step, catalog.CLEAN_BOXES.file),
                       (catalog.INGEST_BOXES.step, catalog.INGEST_BOXES.file)):
        uri = _sibling(storage.join(raw_run_dir, "train"), step, name)
        if uri:
            return uri
    return ""


def _resolve(value: str | None, train_dir: str, step: str, filename: str) -> str:
    return _sibling(train_dir, step, filename) if value is None else value


def class_scores(rows: pd.DataFrame, task: str, class_names: list[str], calibrator,
                 thresholds: np.ndarray, class_name: str):
    """Calibrated probability, decision and label of one class for every row.

    Returns:
        ``(prob, decision, label, threshold)``: float, bool and int arrays, and the class's
        threshold (None for multiclass, where the decision is the arg-max class).
    """
    from fracture_ops.model.outputs import decisions, logits, targets

    k = class_names.index(class_name)
    probs = calibrator.transform(logits(rows, class_names))
    decision = decisions(probs, task, thresholds)[:, k].astype(bool)
    threshold = None if task == "multiclass" else float(thresholds[k])
    return probs[:, k], decision, targets(rows, class_names)[:, k], threshold


def select_cases(prob: np.ndarray, decision: np.ndarray, label: np.ndarray, top_k: int,
                 max_errors: int) -> dict[str, list[int]]:
    """Row indices per report section (``top``, ``fn``, ``fp``); ties keep the row order.

    Top positives: predicted positive, highest probability first. False negatives: label 1,
    predicted 0, lowest probability first. False positives: label 0, predicted 1, highest first.
    """
    down = np.argsort(-np.asarray(prob), kind="stable")
    up = np.argsort(np.asarray(prob), kind="stable")
    return {"top": [int(i) for i in down if decision[i]][:top_k],
            "fn": [int(i) for i in up if label[i] and not decision[i]][:max_errors],
            "fp": [int(i) for i in down if decision[i] and not label[i]][:max_errors]}


def _image_uris(info: dict) -> dict[str, str]:
    uri = info.get("split_uri") or ""
    if not uri or not storage.exists(uri):
        raise BadInputError(f"cam: the split table named in model_info.json was not found: {uri!r}")
    table = storage.read_parquet(uri)
    return dict(zip(table["image_id"].astype(str), table["image_uri"].astype(str)))


def _boxes_by_image(uri: str) -> dict[str, list[tuple]]:
    if not uri:
        return {}
    if not storage.exists(uri):
        raise BadInputError(f"cam: boxes file not found: {uri}")
    df = storage.read_parquet(uri) if uri.endswith(".parquet") else \
        pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype={"image_id": str})
    return {str(i): list(g[["x_min", "y_min", "x_max", "y_max", "img_w", "img_h"]]
                         .itertuples(index=False, name=None)) for i, g in df.groupby("image_id")}


def _scaled_boxes(rows: list[tuple], shape: tuple[int, int]) -> list[tuple]:
    """Boxes in the pixels of the image as read (the table's img_w/img_h may differ)."""
    h, w = shape
    out = []
    for x0, y0, x1, y1, bw, bh in rows:
        sx = w / bw if bw and bw == bw else 1.0
        sy = h / bh if bh and bh == bh else 1.0
        out.append((x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    return out


def _label_text(positive: bool, class_name: str) -> str:
    return class_name if positive else f"not {class_name}"


def _explain_case(explainer, image: np.ndarray, boxes: list[tuple], cfg: CamConfig,
                  model_input: np.ndarray | None = None) -> dict:
    """CAM of one image; the localisation ratio in original pixels, the pictures at display size.
    ``model_input``: the same file as the model reads it (``read_model_input``)."""
    import cv2

    from fracture_ops.model.gradcam import box_energy, overlay
    from fracture_ops.explain.report import fit_for_display, png_data_uri

    cam = explainer.explain(image, model_input).cam
    out: dict = {"box_energy_ratio": None}
    scaled = _scaled_boxes(boxes, image.shape) if boxes else []
    if scaled:
        energy, area = box_energy(cam, scaled)
        out["box_energy_ratio"] = round(energy / area, 4) if area > 0 else None
    shown = fit_for_display(image, cfg.display_size)  # overlay at display size: cheap on 3k px
    over = overlay(shown, cv2.resize(cam, shown.shape[::-1], interpolation=cv2.INTER_AREA),
                   cfg.alpha)
    f = shown.shape[0] / image.shape[0]
    for x0, y0, x1, y1 in scaled:  # the known fracture boxes, green
        cv2.rectangle(over, (int(x0 * f), int(y0 * f)), (int(x1 * f), int(y1 * f)), (0, 255, 0), 1)
    out["original_png"] = png_data_uri(shown)
    out["overlay_png"] = png_data_uri(over)
    return out


def _explain_all(explainer, rows: pd.DataFrame, sections: dict[str, list[int]], scores,
                 uris: dict[str, str], boxes: dict[str, list], cfg: CamConfig):
    """Explain each selected row once; returns ``(cases per section, quarantined)``."""
    from fracture_ops.cli_common import progress
    from fracture_ops.data.images import read_image
    from fracture_ops.model.preprocess import read_model_input
    from fracture_ops.errors import ImageDecodeError

    prob, decision, label, threshold = scores
    done: dict[int, dict | None] = {}
    quarantined: list[dict] = []
    todo = sorted({i for idx in sections.values() for i in idx})
    for i in progress(todo, "cam", total=len(todo)):
        image_id = str(rows["image_id"].iloc[i])
        try:
            if image_id not in uris:
                raise BadInputError("image_id not in the split table")
            image = read_image(uris[image_id])[0]
            model_input = read_model_input(uris[image_id], explainer.loaded.pre_size,
                                           explainer.loaded.jpeg_draft)
            done[i] = _explain_case(explainer, image, boxes.get(image_id, []), cfg, model_input)
        except (ImageDecodeError, BadInputError) as exc:
            quarantined.append({"image_id": image_id, "reason": str(getattr(exc, "cause", exc))})
            done[i] = None
    if todo and len(quarantined) / len(todo) > cfg.error_budget:
        raise ErrorBudgetExceeded(f"cam: {len(quarantined)} of {len(todo)} images could not be "
                                  f"explained (budget {cfg.error_budget:.0%})")
    cases = {}
    for key, idx in sections.items():
        cases[key] = [{"section": key, "image_id": str(rows["image_id"].iloc[i]),
                       "class_name": explainer.class_name, "prob": round(float(prob[i]), 6),
                       "threshold": threshold, "decision": int(decision[i]),
                       "label": int(label[i]), **done[i]} for i in idx if done[i] is not None]
    return cases, quarantined


def _header(cfg: CamConfig, info: dict, explainer, sources: dict, n_rows: int) -> dict:
    return {"run id": cfg.run_id, "backbone": info.get("backbone"), "task": info.get("task"),
            "explained class": explainer.class_name, "Grad-CAM layer": explainer.layer_name,
            "input size": info.get("image_size"), "best epoch": info.get("best_epoch"),
            "best val AUROC": info.get("best_val_auroc"),
            "MLflow training run": info.get("mlflow_run_id"), "split": f"{cfg.split} ({n_rows} images)",
            "calibration": sources["calibration"], "thresholds": sources["thresholds"]}


def _open_model(cfg: CamConfig, train_dir: str):
    from fracture_ops.model.gradcam import GradCamExplainer, load_classifier
    from fracture_ops.model.network import resolve_device

    model_uri = storage.join(train_dir, MODEL_FILE)
    if not storage.exists(model_uri):
        raise BadInputError(f"cam: no model.pt in {train_dir} (run the train step first)")
    loaded = load_classifier(model_uri, resolve_device(cfg.device))
    return GradCamExplainer(loaded, cfg.class_name, cfg.target_layer)


def _calibration(cfg: CamConfig, train_dir: str, task: str, class_names: list[str]):
    from fracture_ops.model.documents import read_calibrator, read_thresholds

    cal_uri = _resolve(cfg.calibration_uri, train_dir, catalog.CALIBRATION.step, catalog.CALIBRATION.file)
    thr_uri = _resolve(cfg.thresholds_uri, train_dir, catalog.THRESHOLDS.step, catalog.THRESHOLDS.file)
    calibrator = read_calibrator(cal_uri, task)
    thresholds, thr_source = read_thresholds(thr_uri, class_names, calibrator.method)
    sources = {"calibration": f"{calibrator.method} ({cal_uri or 'none: raw probabilities'})",
               "thresholds": thr_source}
    return calibrator, thresholds, sources


def cam_step(cfg: CamConfig) -> dict:
    """Write the Grad-CAM report of one split.

    Returns:
        Summary: report URI, cases per section, quarantined images.

    Raises:
        BadInputError: the train folder, its predictions, the split table or a named
            calibration/thresholds/boxes file is missing.
        ErrorBudgetExceeded: too many selected images could not be read.
        ConfigError: unknown class or target layer.
    """
    from fracture_ops.model.outputs import split_rows
    from fracture_ops.model.outputs import read_predictions
    from fracture_ops.explain.report import render_report

    train_dir = cfg.train_dir or cfg.output_dir("train")
    if not storage.is_complete(train_dir):
        raise BadInputError(f"cam: training in {train_dir} has not finished (_SUCCESS missing)")
    explainer = _open_model(cfg, train_dir)
    try:
        preds = read_predictions(train_dir, cfg.error_budget)
        calibrator, thresholds, sources = _calibration(cfg, train_dir, preds.task, preds.class_names)
        rows = split_rows(preds.df, cfg.split).sort_values("image_id", kind="stable")
        rows = rows.reset_index(drop=True)
        scores = class_scores(rows, preds.task, preds.class_names, calibrator, thresholds,
                              explainer.class_name)
        sections = select_cases(scores[0], scores[1], scores[2], cfg.top_k, cfg.max_errors)
        info = explainer.loaded.info
        boxes = _boxes_by_image(cfg.boxes_uri if cfg.boxes_uri is not None
                                else _run_boxes(train_dir, storage.step_dir(cfg.raw_root, cfg.run_id, "")))
        cases, quarantined = _explain_all(explainer, rows, sections, scores, _image_uris(info),
                                          boxes, cfg)
    finally:
        explainer.close()
    out = cfg.output_dir(STEP)
    storage.reset_dir(out)
    notes = [f"{q['image_id']}: could not be explained ({q['reason']})" for q in quarantined]
    header = _header(cfg, info, explainer, sources, len(rows))
    storage.write_text(storage.join(out, catalog.CAM_REPORT.file), render_report(header, cases, notes))
    listing = [{k: v for k, v in c.items() if not k.endswith("_png")}
               for key in ("top", "fn", "fp") for c in cases[key]]
    storage.write_json(storage.join(out, "cams.json"),
                       {"header": header, "cases": listing, "quarantined": quarantined})
    write_resolved(cfg, out)
    summary = {"report_uri": storage.join(out, catalog.CAM_REPORT.file),
               "cams_uri": storage.join(out, "cams.json"),
               **{f"{k}_cases": len(cases[k]) for k in ("top", "fn", "fp")},
               "quarantined": len(quarantined)}
    storage.mark_success(out, summary)
    return summary


def explain_image(cfg: CamConfig, image_uri: str, out_png: str | None = None) -> dict:
    """Grad-CAM overlay of one image, with its calibrated probability and decision.

    Args:
        cfg: model folder, calibration, thresholds, class, layer and overlay settings.
        image_uri: PNG, JPEG or DICOM (local or s3://).
        out_png: where to write the overlay (default ``<run>/cam_image/overlay.png``).

    Returns:
        ``{"image", "overlay", "class_name", "prob", "threshold", "decision", "logit"}``.

    Raises:
        ImageDecodeError: the image cannot be read.
        BadInputError: the model or a named calibration/thresholds file is missing.
    """
    from PIL import Image

    from fracture_ops.data.images import read_image
    from fracture_ops.model.preprocess import read_model_input
    from fracture_ops.model.gradcam import overlay

    image = read_image(image_uri)[0]
    train_dir = cfg.train_dir or cfg.output_dir("train")
    explainer = _open_model(cfg, train_dir)
    try:
        info = explainer.loaded.info
        calibrator, thresholds, _ = _calibration(cfg, train_dir, info["task"], info["class_names"])
        result = explainer.explain(image, read_model_input(image_uri, explainer.loaded.pre_size,
                                                           explainer.loaded.jpeg_draft))
    finally:
        explainer.close()
    from fracture_ops.model.outputs import decisions

    k = info["class_names"].index(explainer.class_name)
    probs = calibrator.transform(result.logits[None].astype(np.float64))
    prob = float(probs[0, k])
    positive = bool(decisions(probs, info["task"], thresholds)[0, k])
    threshold = None if info["task"] == "multiclass" else float(thresholds[k])
    out = out_png or storage.join(cfg.output_dir("cam_image"), "overlay.png")
    buf = io.BytesIO()
    Image.fromarray(overlay(image, result.cam, cfg.alpha)).save(buf, format="PNG")
    storage.write_bytes(out, buf.getvalue())
    return {"image": image_uri, "overlay": out, "class_name": explainer.class_name,
            "prob": round(prob, 6), "threshold": threshold,
            "decision": _label_text(positive, explainer.class_name),
            "logit": round(float(result.logits[k]), 6)}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops cam [--split test --top-k 8]`` or ``fracture-ops cam --image X``."""
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("--image", help="explain one image (PNG/JPEG/DICOM) instead of a split")
    parser.add_argument("--model-dir", dest="train_dir", help="train step folder (default: this run's)")
    parser.add_argument("--out", help="--image: overlay PNG to write (default <run>/cam_image/overlay.png)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split to report (default test)")
    parser.add_argument("--top-k", type=int, help="top positive predictions to show (default 8)")
    parser.add_argument("--max-errors", type=int, help="false negatives and positives to show (8 each)")
    parser.add_argument("--calibration", dest="calibration_uri",
                        help="calibration.json or its folder (default: this run's calibrate step)")
    parser.add_argument("--thresholds", dest="thresholds_uri",
                        help="thresholds.json or its folder (default: this run's tune_thresholds step)")
    parser.add_argument("--target-layer", help="module to hook, e.g. layer3 (default per backbone)")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the cam step (or one image) from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(CamConfig, args, train_dir=args.train_dir, split=args.split,
                           top_k=args.top_k, max_errors=args.max_errors,
                           calibration_uri=args.calibration_uri, thresholds_uri=args.thresholds_uri,
                           target_layer=args.target_layer)
    if args.image:
        return explain_image(cfg, args.image, args.out)
    if args.out:
        raise ConfigError("--out applies to --image only (the report goes to <run>/cam/)")
    return cam_step(cfg)
