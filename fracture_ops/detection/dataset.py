"""Manifest + boxes + split -> an ultralytics YOLO detection data set on local disk.

Layout (the one ultralytics documents for YOLO detection data sets)::

    <root>/images/{train,val,test}/<name>.png|.jpg
    <root>/labels/{train,val,test}/<name>.txt      one ``cls cx cy w h`` line per box, normalised
    <root>/data.yaml                               absolute ``path``, split folders, class names

Images that ultralytics would read exactly as :func:`fracture_ops.data.images.read_image` does
(local 8-bit gray/RGB PNG or JPEG, complete, without an EXIF rotation) are symlinked; everything
else (DICOM, 16-bit PNG, truncated or EXIF-rotated JPEG, S3 objects) is decoded with ``read_image``
and written as an 8-bit PNG, so pixel coordinates in the box table stay valid. ultralytics rewrites
truncated JPEGs in place, which is one more reason never to link those. Images without boxes get an
empty label file (explicit negatives). Unreadable images are quarantined with their reason.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fracture_ops import storage
from fracture_ops.data.split import SPLITS, assert_patient_disjoint
from fracture_ops.errors import BadInputError, ErrorBudgetExceeded, ImageDecodeError, ManifestError

log = logging.getLogger(__name__)

DEFAULT_CLASS = "fracture"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_EXIF_ORIENTATION = 0x0112


@dataclass
class YoloDataset:
    """An exported YOLO data set.

    Attributes:
        root: local folder holding ``images/``, ``labels/`` and ``data.yaml``.
        data_yaml: path of ``data.yaml`` (absolute).
        class_names: class names in label-index order.
        files: ``image_id -> exported image path`` for every exported image.
        splits: ``image_id -> split name``.
        quarantined: ``[{"image_id", "reason"}]`` for images that could not be exported.
        counts: per split, images, boxes and negatives (images without a box).
    """

    root: Path
    data_yaml: Path
    class_names: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def class_names_from_boxes(boxes: pd.DataFrame, names: list[str] | None = None) -> list[str]:
    """Class names in index order: ``names`` when given, else the sorted box classes.

    Raises:
        ManifestError: a box class is missing from ``names``.
    """
    found = sorted(set(boxes["class_name"].astype(str))) if len(boxes) else []
    if names:
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise ManifestError(f"box classes {unknown} are not in class_names {names}")
        return list(names)
    return found or [DEFAULT_CLASS]


def box_to_yolo(box: tuple[float, float, float, float], img_w: float, img_h: float
                ) -> tuple[float, float, float, float]:
    """Pixel ``(x_min, y_min, x_max, y_max)`` -> normalised ``(cx, cy, w, h)``, clipped to the image.

    Raises:
        BadInputError: the image size is not positive.
    """
    if img_w <= 0 or img_h <= 0:
        raise BadInputError(f"image size must be positive, got {img_w}x{img_h}")
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), img_w), min(max(x1, 0.0), img_w)))
    y0, y1 = sorted((min(max(y0, 0.0), img_h), min(max(y1, 0.0), img_h)))
    return ((x0 + x1) / 2 / img_w, (y0 + y1) / 2 / img_h, (x1 - x0) / img_w, (y1 - y0) / img_h)


def yolo_to_box(cx: float, cy: float, w: float, h: float, img_w: float, img_h: float
                ) -> tuple[float, float, float, float]:
    """Normalised ``(cx, cy, w, h)`` -> pixel ``(x_min, y_min, x_max, y_max)``."""
    return ((cx - w / 2) * img_w, (cy - h / 2) * img_h, (cx + w / 2) * img_w, (cy + h / 2) * img_h)


def yolo_label_lines(boxes: pd.DataFrame, class_names: list[str],
                     size: tuple[int, int] | None = None) -> list[str]:
    """YOLO label lines for the boxes of one image.

    Args:
        boxes: rows of the box side table (pixel coordinates) for one image.
        class_names: class names in index order.
        size: ``(width, height)`` of the image as exported; defaults to the table's ``img_w``/``img_h``.

    Returns:
        ``["cls cx cy w h", ...]`` with 6 decimals (well below a pixel for images up to 10^5 px).
        Degenerate boxes (zero width or height after clipping) are dropped.
    """
    index = {n: i for i, n in enumerate(class_names)}
    lines = []
    for r in boxes.itertuples(index=False):
        w, h = size if size else (float(r.img_w), float(r.img_h))
        cx, cy, bw, bh = box_to_yolo((r.x_min, r.y_min, r.x_max, r.y_max), w, h)
        if bw <= 0 or bh <= 0:
            continue
        lines.append(f"{index[str(r.class_name)]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return lines


def parse_label_lines(lines: list[str], class_names: list[str], img_w: float, img_h: float
                      ) -> list[dict]:
    """Inverse of :func:`yolo_label_lines`: label lines -> ``{"class_name", "box"}`` in pixels."""
    out = []
    for line in lines:
        cls, cx, cy, w, h = line.split()[:5]
        out.append({"class_name": class_names[int(float(cls))],
                    "box": yolo_to_box(float(cx), float(cy), float(w), float(h), img_w, img_h)})
    return out


def safe_name(image_id: str) -> str:
    """A file-system-safe file stem for an image id (ids are pseudonyms after de-identification)."""
    return _SAFE_NAME.sub("_", str(image_id)).strip("._") or "image"


def linkable(uri: str) -> bool:
    """True when ultralytics would read the file exactly as ``read_image`` does, so a link suffices.

    That is a local, complete, 8-bit gray or RGB PNG/JPEG without an EXIF rotation (OpenCV applies
    EXIF orientation, ``read_image`` does not).
    """
    if storage.is_s3(uri) or not Path(uri).is_file():
        return False
    from PIL import Image

    try:
        with Image.open(uri) as im:
            if im.format not in ("PNG", "JPEG") or im.mode not in ("L", "RGB"):
                return False
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return False
            fmt = im.format
    except Exception:  # unreadable header: let read_image produce the reason
        return False
    if fmt == "JPEG":
        with open(uri, "rb") as fh:
            fh.seek(-2, os.SEEK_END)
            return fh.read() == b"\xff\xd9"
    return True


def encode_png(img: np.ndarray) -> bytes:
    """A [0, 1] float image -> 8-bit grayscale PNG bytes."""
    from PIL import Image

    from fracture_ops.data.images import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG")
    return buf.getvalue()


def _export_image(uri: str, target_stem: Path) -> tuple[Path, tuple[int, int]]:
    """Link or convert one image; returns ``(path, (width, height))`` as exported."""
    from fracture_ops.data.images import read_image, read_image_size

    if linkable(uri):
        path = target_stem.with_suffix(Path(uri).suffix.lower())
        path.symlink_to(Path(uri).resolve())
        return path, read_image_size(str(path))
    img, _ = read_image(uri)
    path = target_stem.with_suffix(".png")
    path.write_bytes(encode_png(img))
    return path, (img.shape[1], img.shape[0])


def export_yolo_dataset(table: pd.DataFrame, boxes: pd.DataFrame, out_dir: str | Path,
                        class_names: list[str] | None = None,
                        max_bad_fraction: float = 0.05,
                        splits: tuple[str, ...] = SPLITS) -> YoloDataset:
    """Write a YOLO detection data set for every split present in ``table``.

    Args:
        table: split table (canonical manifest + ``split`` column).
        boxes: box side table (:data:`fracture_ops.data.manifest.BOX_COLUMNS`), pixel coordinates.
        out_dir: local folder (emptied first).
        class_names: class names in index order; default: the box classes, or ``["fracture"]``.
        max_bad_fraction: largest share of unreadable images tolerated (they are quarantined).
        splits: the splits to export; training needs ``train`` and ``val`` (checked when exported).

    Returns:
        The :class:`YoloDataset`.

    Raises:
        ManifestError: missing ``split`` column, or an exported train/val split (or every
            exported split) without readable images.
        LeakageError: a patient appears in more than one split.
        ErrorBudgetExceeded: more unreadable images than ``max_bad_fraction`` allows.
    """
    if "split" not in table.columns:
        raise ManifestError("detection export needs a split table (a 'split' column)")
    assert_patient_disjoint(table)
    names = class_names_from_boxes(boxes, class_names)
    root = Path(out_dir).resolve()
    storage.reset_dir(str(root))
    ds = YoloDataset(root=root, data_yaml=root / "data.yaml", class_names=names)
    by_image = {k: g for k, g in boxes.groupby("image_id")} if len(boxes) else {}
    from fracture_ops.cli_common import progress

    rows = [r for r in table.itertuples(index=False) if str(r.split) in splits]
    for row in progress(rows, "detect export", total=len(rows)):
        _export_row(row, by_image.get(row.image_id, boxes.iloc[:0]), ds)
    _check_budget(ds, len(rows), max_bad_fraction)
    for split in splits:
        if split in ("train", "val") and not ds.counts.get(split, {}).get("images"):
            raise ManifestError(f"detection export: the {split} split has no readable images")
    if not ds.files:
        raise ManifestError(f"detection export: no readable images in split(s) {', '.join(splits)}")
    _write_data_yaml(ds)
    return ds


def _export_row(row, img_boxes: pd.DataFrame, ds: YoloDataset) -> None:
    split = str(row.split)
    (ds.root / "images" / split).mkdir(parents=True, exist_ok=True)
    (ds.root / "labels" / split).mkdir(parents=True, exist_ok=True)
    stem = _unique_stem(safe_name(row.image_id), ds.root / "labels" / split)
    try:
        path, size = _export_image(str(row.image_uri), ds.root / "images" / split / stem)
    except ImageDecodeError as exc:
        ds.quarantined.append({"image_id": str(row.image_id), "split": split, "reason": exc.cause})
        return
    lines = yolo_label_lines(img_boxes, ds.class_names, size)
    (ds.root / "labels" / split / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    ds.files[str(row.image_id)] = path
    ds.splits[str(row.image_id)] = split
    c = ds.counts.setdefault(split, {"images": 0, "boxes": 0, "negatives": 0})
    c["images"] += 1
    c["boxes"] += len(lines)
    c["negatives"] += int(not lines)


def _unique_stem(stem: str, label_dir: Path) -> str:
    """``stem``, or ``stem_2``, ``stem_3``... when two image ids map to the same safe name."""
    candidate, n = stem, 1
    while (label_dir / f"{candidate}.txt").exists():
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def _check_budget(ds: YoloDataset, total: int, max_bad_fraction: float) -> None:
    for q in ds.quarantined:
        log.warning("detect export: quarantined %s: %s", q["image_id"], q["reason"])
    if total and len(ds.quarantined) / total > max_bad_fraction:
        raise ErrorBudgetExceeded(
            f"{len(ds.quarantined)} of {total} images unreadable (budget {max_bad_fraction:.0%})")


def _write_data_yaml(ds: YoloDataset) -> None:
    # ultralytics wants train and val keys even when only one split is evaluated
    first = next(iter(ds.counts))
    data: dict = {"path": str(ds.root)}
    for split in SPLITS:
        if ds.counts.get(split, {}).get("images") or split in ("train", "val"):
            data[split] = f"images/{split if ds.counts.get(split) else first}"
    data["names"] = dict(enumerate(ds.class_names))
    ds.data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))


def load_split_inputs(split_uri: str, boxes_uri: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``split.parquet`` and the box table (empty when ``boxes_uri`` is None).

    Raises:
        ManifestError: the split table lacks a ``split`` column or the box table lacks columns.
    """
    from fracture_ops.data.manifest import BOX_COLUMNS, empty_boxes

    table = storage.read_parquet(split_uri)
    if "split" not in table.columns:
        raise ManifestError(f"{split_uri} has no 'split' column (run the split step first)")
    boxes = storage.read_parquet(boxes_uri) if boxes_uri else empty_boxes()
    missing = [c for c in BOX_COLUMNS if c not in boxes.columns]
    if missing:
        raise ManifestError(f"box table {boxes_uri} lacks column(s): {', '.join(missing)}")
    return table, boxes
