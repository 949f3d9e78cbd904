"""CLI: ``fracture-ops detect train|val|predict`` (YOLOv8 fracture localisation).

Examples::

    fracture-ops detect train --split-uri .../split/split.parquet --boxes-uri .../ingest/boxes.parquet \\
        --imgsz 640 --epochs 50
    fracture-ops detect val --weights .../detect_train/weights/best.pt --split-uri ... --boxes-uri ...
    fracture-ops detect predict path/to/images --weights .../best.pt

Nothing is downloaded: without ``--weights`` training starts from scratch (``--model
yolov8{n,s,m}.yaml``); a named ``.pt`` must be a local file.
"""

from __future__ import annotations

import argparse

ACTIONS = {
    "train": "export the YOLO data set, train, evaluate on test, report, log + register in MLflow",
    "val": "evaluate given weights on one split (metrics.json, predictions.json, report.html)",
    "predict": "predict boxes on an image or a folder (predictions.json + overlay PNGs)",
}


def _model_args(p: argparse.ArgumentParser, weights_help: str) -> None:
    p.add_argument("--weights", help=weights_help)
    p.add_argument("--imgsz", type=int, help="network input size, a multiple of 32 (640)")
    p.add_argument("--batch", type=int, help="batch size (16)")
    p.add_argument("--device", help="auto (CUDA if available, else CPU), cpu, 0, 0,1 (auto)")
    p.add_argument("--workers", type=int, help="data loader workers (2)")
    p.add_argument("--conf", type=float, help="confidence of reported/drawn boxes (0.25)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-uri", help="split.parquet of the split step")
    p.add_argument("--boxes-uri", help="boxes.parquet (pixel boxes) of the ingest step")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``train``, ``val`` and ``predict`` actions, each with its flags."""
    from fracture_ops.cli_common import add_common_args, add_field_flags
    from fracture_ops.detection.yolo import DetectConfig

    subs = parser.add_subparsers(dest="detect_command", metavar="<action>", required=True)
    train = subs.add_parser("train", help=ACTIONS["train"], description=ACTIONS["train"])
    _data_args(train)
    train.add_argument("--model", help="architecture to train from scratch: yolov8n.yaml, "
                       "yolov8s.yaml, yolov8m.yaml or a local yaml (yolov8n.yaml)")
    _model_args(train, "local .pt to start from instead of scratch (never downloaded)")
    add_field_flags(train, DetectConfig, "epochs")
    train.add_argument("--no-mlflow", dest="mlflow", action="store_false", default=None,
                       help="do not log to MLflow or register the model")
    val = subs.add_parser("val", help=ACTIONS["val"], description=ACTIONS["val"])
    _data_args(val)
    _model_args(val, "local .pt to evaluate (required)")
    val.add_argument("--split", dest="eval_split", choices=["val", "test"], help="split (test)")
    pred = subs.add_parser("predict", help=ACTIONS["predict"], description=ACTIONS["predict"])
    pred.add_argument("source", nargs="?", help="an image (PNG/JPEG/DICOM) or a folder of images")
    _model_args(pred, "local .pt to predict with (required)")
    for p in (train, val, pred):
        add_common_args(p)


def run_cli(args: argparse.Namespace) -> dict:
    """Build the :class:`DetectConfig` from the flags and run the chosen action's step."""
    from fracture_ops.cli_common import config_from_args
    from fracture_ops.detection import steps
    from fracture_ops.detection.yolo import DetectConfig

    flags = {k: getattr(args, k, None) for k in
             ("weights", "imgsz", "batch", "device", "workers", "conf", "split_uri", "boxes_uri",
              "model", "epochs", "mlflow", "eval_split")}
    if args.detect_command == "predict":
        flags["source_uri"] = args.source
    cfg = config_from_args(DetectConfig, args, **flags)
    step = {"train": steps.detect_train_step, "val": steps.detect_val_step,
            "predict": steps.detect_predict_step}[args.detect_command]
    return step(cfg)
