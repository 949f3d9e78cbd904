"""The scoring core shared by the ``infer`` and ``reference`` steps.

1. :func:`resolve_model` turns a registry URI (``models:/name@alias`` or ``models:/name/3``) into
   the concrete version, once, so what is loaded is what gets recorded even if the alias moves
   during the run.
2. :func:`load_scorer` loads that version's pyfunc model (the same network, eval transform,
   calibrator and thresholds the model server uses).
3. :func:`load_input` reads one file: DICOM is de-identified first (PS3.15 Annex E, through
   :func:`fracture_ops.deid.dicom.deidentify_dicom_bytes`) and only the de-identified bytes are
   decoded and inspected; then the per-image features and the model's preprocessing.
4. :func:`score_inputs` decodes files in a small thread pool (Pillow, OpenCV and zlib release the
   GIL while decoding), scores them in batches and quarantines every file that fails with a
   PHI-free reason instead of stopping; it stops early once the error budget cannot be met.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fracture_ops import storage
from fracture_ops.errors import ImageDecodeError
from fracture_ops.inference import features as F
from fracture_ops.model.outputs import decisions
from fracture_ops.model.prefetch import prefetch
from fracture_ops.registry.client import ModelRef

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


class Scorer:
    """A loaded model version: batched forward pass, calibration, decisions, embeddings.

    Args:
        ref: the concrete version.
        model_dir: local folder of the downloaded pyfunc model.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
    """

    def __init__(self, ref: ModelRef, model_dir: str, device: str = "auto"):
        import torch

        from fracture_ops.model.pyfunc import load_classifier_dir

        self.ref = ref
        # runs no code stored with the model; BadInputError when it is not our classifier
        self.clf = load_classifier_dir(model_dir)
        self.model_pt, self.info = self.clf.model_path, self.clf.info
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = self.clf.model.to(device).eval()

    @property
    def class_names(self) -> list[str]:
        return list(self.clf.class_names)

    @property
    def pre_size(self) -> int | None:
        return self.clf.pre_size

    @property
    def decode_side(self) -> int | None:
        """The JPEG decoding scale's floor: ``pre_size`` for models trained with reduced-scale
        decoding, None (full decoding) for older ones."""
        return self.clf.pre_size if self.clf.jpeg_draft else None

    def score(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Score preprocessed images (see :func:`load_input`) in one forward pass.

        Returns:
            ``probs`` (N x K, calibrated), ``decisions`` (N x K, 0/1) and the embedding summary
            columns of :func:`features.embedding_features`.
        """
        import torch

        x = torch.stack([self.clf.transform(im)["image"] for im in images]).to(self.device)
        with torch.inference_mode():
            feats = self.model.forward_features(x.contiguous(memory_format=torch.channels_last))
            emb = self.model.forward_head(feats, pre_logits=True)
            logits = self.model.forward_head(feats)  # == model(x): timm's forward is these two
            if self.clf.tta_hflip:  # the model's test-time flip, as the pyfunc model scores
                mirrored = x.flip(-1).contiguous(memory_format=torch.channels_last)
                logits = (logits + self.model(mirrored)) / 2
        probs = self.clf.calibrator.transform(logits.float().cpu().numpy()).reshape(len(images), -1)
        out = {"probs": probs, "decisions": decisions(probs, self.clf.task, self.clf.thresholds)}
        out.update(F.embedding_features(emb.float().cpu().numpy()))
        return out


def load_scorer(ref: ModelRef, device: str = "auto") -> Scorer:
    """Download (or find in the local store) and load one registered version."""
    import mlflow

    return Scorer(ref, mlflow.artifacts.download_artifacts(artifact_uri=ref.uri), device)


@dataclass(frozen=True)
class ScoreInput:
    """One file to score: its PHI-free id, where it is, and its label when known."""

    image_id: str
    uri: str
    label: str | None = None


@dataclass
class LoadedImage:
    """A decoded input: the model's preprocessed image and the recorded features."""

    item: ScoreInput
    image: np.ndarray
    features: dict
    warnings: tuple[str, ...] = ()


@dataclass
class Quarantined:
    """A file that could not be scored, with a reason that names no path or PHI."""

    item: ScoreInput
    reason: str


def _read(uri: str) -> bytes:
    """File bytes; a missing file is bad input, other storage failures are internal errors."""
    try:
        return storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ImageDecodeError(uri, "file not found or unreadable") from exc
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise ImageDecodeError(uri, "file not found") from exc
        raise


def _decode(data: bytes, fmt: str, max_side: int | None = None):
    """Decode bytes with :func:`read_image` (through a temporary file: it reads URIs), at the
    reduced JPEG scale the model's own reads use (``max_side``: its ``pre_size``)."""
    from fracture_ops.data.images import read_image

    with tempfile.NamedTemporaryFile(suffix=".dcm" if fmt == "dicom" else f".{fmt}") as fh:
        fh.write(data)
        fh.flush()
        return read_image(fh.name, max_side=max_side)


def load_input(item: ScoreInput, pre_size: int | None, keys, deid_cfg,
               max_side: int | None = None) -> LoadedImage:
    """Read, de-identify (DICOM: header and burned-in text), decode and describe one file.

    Args:
        item: the file.
        pre_size: the model's pre-transform size (``Scorer.pre_size``).
        keys: :class:`~fracture_ops.deid.profile.DeidKeys`.
        deid_cfg: :class:`~fracture_ops.deid.config.DeidConfig` (profile options, blank regions).
        max_side: JPEGs are decoded at a reduced scale no smaller than this
            (``Scorer.decode_side``; None: in full).

    Raises:
        ImageDecodeError: missing, unreadable or undecodable file.
        Exception: de-identification or decoder errors (callers quarantine them).
    """
    return decode_input(item, _read(item.uri), pre_size, keys, deid_cfg, max_side)


def decode_input(item: ScoreInput, data: bytes, pre_size: int | None, keys,
                 deid_cfg, max_side: int | None = None) -> LoadedImage:
    """:func:`load_input` for bytes already read (``max_side``: :attr:`Scorer.decode_side`)."""
    from fracture_ops.data.images import sniff_format
    from fracture_ops.model.preprocess import preprocess

    fmt = sniff_format(data, item.uri)
    cats = F.unknown_categoricals()
    if fmt == "dicom":
        import pydicom

        from fracture_ops.deid.dicom import deidentify_dicom_bytes

        data, _ = deidentify_dicom_bytes(data, keys, deid_cfg)  # the original bytes go no further
        cats = F.dicom_categoricals(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))
    img, meta = _decode(data, fmt, max_side)
    feats = {**F.intensity_features(img), **cats, "source_format": fmt,
             **F.size_features(meta.height, meta.width, meta.bit_depth)}
    return LoadedImage(item, preprocess(img, pre_size), feats, meta.warnings)


def quarantine_reason(exc: Exception) -> str:
    """A reason for the report that names neither the file nor any header value."""
    from fracture_ops.errors import FileRejected

    if isinstance(exc, ImageDecodeError):
        return exc.cause
    if isinstance(exc, FileRejected):
        return f"de-identification: {exc}"
    return f"unreadable: {type(exc).__name__}"


def _safe_load(item: ScoreInput, pre_size, keys, deid_cfg,
               max_side: int | None = None) -> LoadedImage | Quarantined:
    try:
        data = _read(item.uri)  # storage outages propagate (a retry may help), missing files not
    except ImageDecodeError as exc:
        return Quarantined(item, quarantine_reason(exc))
    try:
        return decode_input(item, data, pre_size, keys, deid_cfg, max_side)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the batch
        return Quarantined(item, quarantine_reason(exc))


@dataclass
class ScoreResult:
    """Rows scored, files quarantined, and whether the error budget stopped the run early."""

    rows: pd.DataFrame
    quarantined: list[Quarantined] = field(default_factory=list)
    warnings: int = 0
    stopped_early: bool = False


def score_inputs(items: list[ScoreInput], scorer: Scorer, keys, deid_cfg, *, batch_size: int = 32,
                 workers: int = 2, max_bad: int | None = None, desc: str = "score",
                 on_batch: Callable[[list[LoadedImage], dict], None] | None = None) -> ScoreResult:
    """Score every item; quarantine the ones that fail.

    Args:
        items: files to score (ids unique).
        scorer: the loaded model.
        keys, deid_cfg: de-identification keys and options for DICOM inputs.
        batch_size: images per forward pass.
        workers: decoding threads.
        max_bad: stop as soon as more than this many files are quarantined (None: never).
        desc: progress bar label.
        on_batch: called with each batch's loaded images and its :meth:`Scorer.score` output
            (used for CAM overlays of positives).

    Returns:
        A :class:`ScoreResult`; ``rows`` has ``image_id``, ``prob_*``, ``decision_*``, the
        ``feat_*`` and categorical columns and ``label``, sorted by ``image_id``.
    """
    from fracture_ops.cli_common import progress

    def load(item: ScoreInput):
        return _safe_load(item, scorer.pre_size, keys, deid_cfg, scorer.decode_side)

    result, batch, frames = ScoreResult(rows=pd.DataFrame()), [], []
    window = max(2 * batch_size, 2 * workers)
    with closing(prefetch(items, load, workers, window)) as stream:
        for loaded in progress(stream, desc=desc, total=len(items)):
            if isinstance(loaded, Quarantined):
                result.quarantined.append(loaded)
                if max_bad is not None and len(result.quarantined) > max_bad:
                    result.stopped_early = True
                    break
                continue
            result.warnings += bool(loaded.warnings)
            batch.append(loaded)
            if len(batch) >= batch_size:
                frames.append(_score_batch(batch, scorer, on_batch))
                batch = []
    if batch and not result.stopped_early:
        frames.append(_score_batch(batch, scorer, on_batch))
    result.rows = _rows(frames, scorer.class_names)
    return result


def _score_batch(batch: list[LoadedImage], scorer: Scorer, on_batch) -> pd.DataFrame:
    out = scorer.score([b.image for b in batch])
    frame = pd.DataFrame([{"image_id": b.item.image_id, **b.features, "label": b.item.label}
                          for b in batch])
    for k, c in enumerate(scorer.class_names):
        frame[f"prob_{c}"] = out["probs"][:, k].astype(np.float64)
        frame[f"decision_{c}"] = out["decisions"][:, k]
    for col in ("feat_emb_mean", "feat_emb_std", "feat_emb_norm"):
        frame[col] = out[col]
    if on_batch is not None:
        on_batch(batch, out)
    return frame


def _rows(frames: list[pd.DataFrame], class_names: list[str]) -> pd.DataFrame:
    from fracture_ops.model.prediction_log import ID_COLUMNS, log_columns

    cols = [c for c in log_columns(class_names) if c not in ID_COLUMNS[1:]]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    rows = pd.concat(frames, ignore_index=True)[cols]
    return rows.sort_values("image_id", kind="stable").reset_index(drop=True)
