"""The MLflow pyfunc model: images in, calibrated probabilities and per-class decisions out.

Input: a DataFrame with one string column ``image``: a local path / ``s3://`` URI, or the
base64-encoded bytes of a PNG, JPEG or DICOM file. Output: for every class ``c``, ``prob_<c>``
(calibrated probability) and ``decision_<c>`` (0/1 at the tuned threshold; for a multi-class task
the decision is the arg-max class), and ``error``: None, or why that row's image could not be read
(that row gets no probability; the others are scored as they would be alone). Artifacts: ``model.pt`` (weights and network description),
``calibration.json`` and ``thresholds.json``. The model applies exactly the evaluation's transform,
so it reproduces the evaluation's probabilities.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

try:  # the class must subclass PythonModel; keep the module importable without mlflow too
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is part of the train extra
    PythonModel = object


# the models-from-code file ``package`` logs (importing it registers the model with MLflow)
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")


def _looks_like_base64(s: str) -> bool:
    return len(s) > 256 and not s.startswith(("/", "s3://", ".")) and "\n" not in s[:100]


def decode_input(value: str, max_side: int | None = None) -> np.ndarray:
    """Read one ``image`` cell (URI or base64 file bytes) into a [0,1] grayscale array
    (``max_side``: see :func:`fracture_ops.data.images.read_image`)."""
    from fracture_ops.data.images import read_image

    if _looks_like_base64(value):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = None
        if raw is not None:
            suffix = ".dcm" if raw[128:132] == b"DICM" else ".img"
            with tempfile.NamedTemporaryFile(suffix=suffix) as fh:
                fh.write(raw)
                fh.flush()
                return read_image(fh.name, max_side=max_side)[0]
    return read_image(value, max_side=max_side)[0]


BATCH_SIZE = 32  # images per forward pass in predict


class FractureClassifier(PythonModel):
    """pyfunc wrapper around the trained timm network plus calibration and thresholds."""

    def load_context(self, context) -> None:
        from fracture_ops.model.documents import read_calibrator, read_thresholds
        from fracture_ops.model.network import load_model
        from fracture_ops.model.preprocess import served_transform

        self.model_path = context.artifacts["model"]
        saved = load_model(self.model_path)
        self.info = info = saved.info
        self.task, self.class_names = info["task"], list(info["class_names"])
        self.model = saved.model
        tf = saved.transform
        self.pre_size = tf.get("pre_size")
        # reduced-scale JPEG decoding as in training (models trained before it: full decoding)
        self.jpeg_draft = bool(tf.get("jpeg_draft", False))
        self.tta_hflip = bool(tf.get("tta_hflip", False))
        self.transform = served_transform(tf)
        # the packaged documents, read as every step reads them (model/documents.py)
        self.calibrator = read_calibrator(context.artifacts["calibration"], self.task)
        self.thresholds, _ = read_thresholds(context.artifacts["thresholds"], self.class_names)

    def logits(self, images: list[np.ndarray], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Raw logits for decoded images (eval transform, CPU or the model's device)."""
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        out = [self._forward(b) for b in batches]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)))

    def _forward(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        from fracture_ops.model.network import tta_logits

        with torch.inference_mode():
            x = torch.stack([self.transform(im)["image"] for im in images])
            x = x.contiguous(memory_format=torch.channels_last)
            return tta_logits(self.model, x, self.tta_hflip).float().numpy()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Calibrated probabilities and decisions for every row of ``model_input`` that can be
        read; one image that cannot be read never fails the batch.

        Returns:
            per class ``prob_<c>`` (float, NaN for an unreadable row) and ``decision_<c>``
            (nullable ``Int64``, missing for an unreadable row), and ``error``: None, or why that
            row's image could not be read (``ImageDecodeError: truncated JPEG``, a missing file,
            bad base64). The rows that were read are scored exactly as they would be alone.
        """
        if "image" not in model_input.columns:
            raise ValueError("input needs a string column 'image' (URI or base64 file bytes)")
        from fracture_ops.model.outputs import decisions

        values = model_input["image"].tolist()
        errors: list[str | None] = [None] * len(values)
        raw = np.zeros((len(values), len(self.class_names)), dtype=np.float32)
        batch: list[np.ndarray] = []
        rows: list[int] = []
        from fracture_ops.model.prefetch import prefetch

        # decoding runs up to two batches ahead of the forward pass, in order
        decoded = prefetch(values, self._load, min(8, os.cpu_count() or 1), 2 * BATCH_SIZE)
        for i, (img, err) in enumerate(decoded):
            errors[i] = err
            if img is not None:
                batch.append(img)
                rows.append(i)
            if len(batch) == BATCH_SIZE or (i == len(values) - 1 and batch):
                raw[rows[-len(batch):]] = self._forward(batch)  # decoding goes on meanwhile
                batch = []
        probs = np.full((len(values), len(self.class_names)), np.nan)
        decided = np.zeros(probs.shape, dtype=np.int64)
        if rows:
            scored = self.calibrator.transform(raw[rows])
            probs[rows] = scored.reshape(len(rows), -1)
            decided[rows] = decisions(probs[rows], self.task, self.thresholds)
        bad = np.array([e is not None for e in errors], dtype=bool)
        out = pd.DataFrame(index=model_input.index)
        for k, c in enumerate(self.class_names):
            out[f"prob_{c}"] = probs[:, k]
            out[f"decision_{c}"] = pd.array(np.where(bad, 0, decided[:, k]), dtype="Int64")
            out.loc[bad, f"decision_{c}"] = pd.NA
        out["error"] = pd.Series(errors, index=model_input.index, dtype=object)
        return out

    def _load(self, value) -> tuple[np.ndarray | None, str | None]:
        """One decoded, preprocessed image, or ``(None, why it could not be read)``."""
        from fracture_ops.errors import BadInputError
        from fracture_ops.model.preprocess import preprocess

        try:
            side = self.pre_size if self.jpeg_draft else None
            return preprocess(decode_input(str(value), side), self.pre_size), None
        # a decode error (read_image raises ImageDecodeError), a missing file, bad base64
        except (BadInputError, OSError, ValueError, EOFError) as exc:
            return None, _reason(exc)


def _reason(exc: BaseException) -> str:
    """``<ExceptionType>: <first line of the message>`` (at most 300 characters)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300].rstrip(": ")


def load_classifier_dir(model_dir: str) -> FractureClassifier:
    """A downloaded classifier model, built by this package's own code.

    ``mlflow.pyfunc.load_model`` would run the model-code file stored with the model (or unpickle
    an object, for models logged before models-from-code); whoever can write the artifact store
    could change either. This reads only the ``MLmodel`` file's artifact paths and the weights
    (``weights_only=True``), so loading runs no code that came with the model.

    Raises:
        BadInputError: the folder is not a fracture-ops classifier model.
    """
    from pathlib import Path
    from types import SimpleNamespace

    import yaml

    from fracture_ops.errors import BadInputError

    root = Path(model_dir)
    try:
        meta = yaml.safe_load((root / "MLmodel").read_text(encoding="utf-8"))
        artifacts = meta["flavors"]["python_function"]["artifacts"]
        paths = {k: root / artifacts[k]["path"] for k in ("model", "calibration", "thresholds")}
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise BadInputError(f"{model_dir} is not a fracture-ops classifier model: {exc}") from exc
    for key, path in paths.items():
        if not path.resolve().is_relative_to(root.resolve()) or not path.is_file():
            raise BadInputError(f"{model_dir}: artifact {key!r} missing or outside the model folder")
    clf = FractureClassifier()
    clf.load_context(SimpleNamespace(artifacts={k: str(v) for k, v in paths.items()}, model_config={}))
    return clf


def example_input(image_uri: str) -> pd.DataFrame:
    """A one-row input example holding the base64 bytes of a real image."""
    from fracture_ops import storage

    return pd.DataFrame({"image": [base64.b64encode(storage.read_bytes(image_uri)).decode("ascii")]})


os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
