"""Fracture localisation with YOLOv8 (ultralytics), offline by construction.

- :mod:`~fracture_ops.detection.dataset`: manifest + boxes + split -> a YOLO data set on disk.
- :mod:`~fracture_ops.detection.yolo`: ``DetectConfig``; train / validate / predict wrappers.
- :mod:`~fracture_ops.detection.metrics`: mAP and per-class AP, image-level AUROC and sensitivity.
- :mod:`~fracture_ops.detection.report`: the self-contained HTML report.
- :mod:`~fracture_ops.detection.tracking` and ``pyfunc_model``: MLflow logging and registration.
- :mod:`~fracture_ops.detection.steps` and ``cli``: ``fracture-ops detect train|val|predict``.

Nothing here is imported by ``fracture_ops/__init__.py``; ultralytics loads only when a step runs.
"""
