"""Per-image features recorded beside every prediction, for drift monitoring (pure functions).

- Intensity statistics (mean, standard deviation, 1st/99th percentiles) of the decoded [0, 1]
  image, measured on a copy shrunk with area averaging so its longer side is at most
  :data:`STATS_SIZE`: the figures then do not depend on the model's input size (reference and
  log stay comparable across model versions) and a 3000 x 2500 radiograph costs milliseconds.
  Batch inference measures them on the image as decoded for the model (a JPEG at 1/2-1/8 scale,
  longer side >= the model's ``pre_size``), which is the same image up to that shrink when
  ``pre_size`` >= :data:`STATS_SIZE` (image size 224 and up).
- Size (height, width, aspect = width / height) and stored bit depth, from the file.
- View, laterality and body region from the DICOM tags View Position (0018,5101), Image
  Laterality (0020,0062) (else Laterality (0020,0060)) and Body Part Examined (0018,0015), read
  from the de-identified data set; PNG/JPEG files carry none, so they get the manifest's unknown
  values ``UNKNOWN`` / ``U`` / ``unknown``.
- A summary of the backbone's pooled embedding (mean, standard deviation, L2 norm of the vector
  ``forward_head(forward_features(x), pre_logits=True)``), a cheap signal of covariate shift in
  the space the classifier sees.
"""

from __future__ import annotations

import numpy as np

from fracture_ops.data.manifest import LATERALITIES
from fracture_ops.model.preprocess import shrink_longest

STATS_SIZE = 256
UNKNOWN_VIEW, UNKNOWN_LATERALITY, UNKNOWN_REGION = "UNKNOWN", "U", "unknown"

# DICOM PS3.3 C.8.11.5 View Position defined terms (plus common free text) -> manifest views
_VIEWS = {"AP": "AP", "PA": "PA", "LL": "LAT", "RL": "LAT", "LAT": "LAT", "LATERAL": "LAT",
          "RLD": "LAT", "LLD": "LAT", "RLO": "OBL", "LLO": "OBL", "OBL": "OBL", "OBLIQUE": "OBL"}


def intensity_features(img: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and 1st/99th percentiles of a [0, 1] grayscale image.

    Args:
        img: 2-D float image in [0, 1] (as :func:`fracture_ops.data.images.read_image` returns).

    Returns:
        ``feat_mean``, ``feat_std``, ``feat_p01``, ``feat_p99``.
    """
    small = shrink_longest(np.asarray(img, dtype=np.float32), STATS_SIZE).astype(np.float64)
    p01, p99 = np.percentile(small, (1.0, 99.0))
    return {"feat_mean": float(small.mean()), "feat_std": float(small.std()),
            "feat_p01": float(p01), "feat_p99": float(p99)}


def size_features(height: int, width: int, bit_depth: int) -> dict[str, float | int]:
    """``feat_height``, ``feat_width``, ``feat_aspect`` (width / height) and ``feat_bit_depth``."""
    return {"feat_height": int(height), "feat_width": int(width),
            "feat_aspect": float(width) / float(height) if height else float("nan"),
            "feat_bit_depth": int(bit_depth)}


def _tag_text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):  # multi-valued: first value
        value = next(iter(value), "")
    return str(value).strip()


def dicom_categoricals(ds) -> dict[str, str]:
    """View, laterality and body region from a (de-identified) pydicom data set.

    Args:
        ds: a ``pydicom.Dataset`` (pixel data not needed).

    Returns:
        ``view`` (one of the manifest's views), ``laterality`` (``L``/``R``/``B``/``U``),
        ``body_region`` (Body Part Examined in lower case, or ``unknown``).
    """
    raw_view = _tag_text(ds, "ViewPosition").upper()
    view = _VIEWS.get(raw_view, "OTHER" if raw_view else UNKNOWN_VIEW)
    side = (_tag_text(ds, "ImageLaterality") or _tag_text(ds, "Laterality")).upper()
    region = _tag_text(ds, "BodyPartExamined").lower()
    return {"view": view, "laterality": side if side in LATERALITIES else UNKNOWN_LATERALITY,
            "body_region": region or UNKNOWN_REGION}


def unknown_categoricals() -> dict[str, str]:
    """The categorical features of a file that carries no tags (PNG/JPEG)."""
    return {"view": UNKNOWN_VIEW, "laterality": UNKNOWN_LATERALITY, "body_region": UNKNOWN_REGION}


def embedding_features(emb: np.ndarray) -> dict[str, np.ndarray]:
    """Row-wise summary of pooled embeddings.

    Args:
        emb: ``N x D`` pooled features (pre-logits).

    Returns:
        ``feat_emb_mean``, ``feat_emb_std``, ``feat_emb_norm`` (L2), each of length N.
    """
    emb = np.asarray(emb, dtype=np.float64).reshape(len(emb), -1)
    return {"feat_emb_mean": emb.mean(axis=1), "feat_emb_std": emb.std(axis=1),
            "feat_emb_norm": np.linalg.norm(emb, axis=1)}
