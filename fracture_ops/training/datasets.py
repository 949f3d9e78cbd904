"""A torch Dataset over the manifest, with an optional on-disk cache of decoded, resized images.

Decoding a large JPEG or DICOM costs far more than a forward pass of a small network at 224 px,
so the cache stores each image once, decoded and resized so its longer side is ``cache_size``
(float16 ``.npy``; :func:`preprocess` rounds uncached images the same way), keyed by the image URI, its size/mtime (local) and the cache size. Epochs 2..n
then skip decoding entirely. The cache is safe to share between runs and to delete.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from fracture_ops import storage
from fracture_ops.model.preprocess import read_model_input

log = logging.getLogger(__name__)


def targets_for(table: pd.DataFrame, task: str, class_names: list[str],
                label_column: str = "label") -> np.ndarray:
    """N x K float32 targets: binary = [label == positive], multiclass one-hot, multilabel lbl_*.

    Raises:
        ManifestError: a multiclass label outside class_names, or a missing lbl_ column.
    """
    from fracture_ops.errors import ManifestError

    if task == "binary":
        return (table[label_column].astype(str) == class_names[0]).to_numpy(np.float32)[:, None]
    if task == "multiclass":
        unknown = set(table[label_column].astype(str)) - set(class_names)
        if unknown:
            raise ManifestError(f"labels {sorted(unknown)} are not in class_names {class_names}")
        idx = table[label_column].astype(str).map({c: i for i, c in enumerate(class_names)})
        return np.eye(len(class_names), dtype=np.float32)[idx.to_numpy()]
    cols = [f"lbl_{c}" for c in class_names]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise ManifestError(f"multilabel task needs columns {missing}")
    return table[cols].to_numpy(np.float32)


class DecodeCache:
    """On-disk cache of decoded, resized images (float16 .npy files)."""

    def __init__(self, folder: str | os.PathLike, cache_size: int):
        self.folder = Path(folder)
        self.cache_size = cache_size
        self.folder.mkdir(parents=True, exist_ok=True)

    def _key(self, uri: str) -> Path:
        stamp = ""
        if not storage.is_s3(uri):
            st = os.stat(uri)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        # v2: JPEGs decoded at reduced scale (read_model_input); older entries are not reused
        digest = hashlib.sha1(f"v2|{uri}|{stamp}|{self.cache_size}".encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.npy"

    def load(self, uri: str) -> np.ndarray:
        """The decoded, resized image, from the cache when present."""
        path = self._key(uri)
        if path.exists():
            try:
                return np.load(path).astype(np.float32)
            except (OSError, ValueError):  # a torn write from a killed worker: redo it
                pass
        img = read_model_input(uri, self.cache_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, img.astype(np.float16))
        os.replace(tmp, path)
        return img


def box_regions(table: pd.DataFrame, targets: np.ndarray, boxes: pd.DataFrame,
                class_name: str) -> list[np.ndarray | None]:
    """Where each row's finding is, for box supervision: per row an ``n x 4`` array of boxes as
    fractions of the image (x0, y0, x1, y1), an empty array for a negative row (nothing anywhere),
    or None where it is not known (a positive row without a box of ``class_name``: that row
    trains on its label alone).

    Args:
        table: the split rows (``image_id``).
        targets: their N x 1 binary targets.
        boxes: a box table (:data:`fracture_ops.data.manifest.BOX_COLUMNS`, pixel coordinates
            of the original image, with its ``img_w``/``img_h``).
        class_name: the class whose boxes count (boxes of other classes are ignored).
    """
    sel = boxes[boxes["class_name"].astype(str) == class_name]
    frac = pd.DataFrame({"image_id": sel["image_id"].astype(str),
                         "x0": sel["x_min"] / sel["img_w"], "y0": sel["y_min"] / sel["img_h"],
                         "x1": sel["x_max"] / sel["img_w"], "y1": sel["y_max"] / sel["img_h"]})
    coords = frac[["x0", "y0", "x1", "y1"]].to_numpy(float)
    frac = frac[np.isfinite(coords).all(axis=1)]  # no image size recorded: not a usable box
    by_id = {k: g[["x0", "y0", "x1", "y1"]].to_numpy(np.float32).clip(0, 1)
             for k, g in frac.groupby("image_id")}
    out: list[np.ndarray | None] = []
    for image_id, positive in zip(table["image_id"].astype(str), targets[:, 0] > 0.5, strict=True):
        if not positive:
            out.append(np.zeros((0, 4), np.float32))
        else:
            out.append(by_id.get(image_id))
    return out


def box_mask(regions: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 mask of ``shape`` (H, W) that is 1 inside the boxes (fractions of the image)."""
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    for x0, y0, x1, y1 in regions:
        c0, r0 = int(np.floor(x0 * w)), int(np.floor(y0 * h))
        c1, r1 = max(int(np.ceil(x1 * w)), c0 + 1), max(int(np.ceil(y1 * h)), r0 + 1)
        mask[r0:r1, c0:c1] = 1
    return mask


class ManifestDataset(Dataset):
    """Images and targets of one split.

    Args:
        table: manifest rows (``image_uri`` used).
        targets: N x K float32 targets (:func:`targets_for`).
        transform: callable ``f(image=...) -> {"image": tensor}``.
        cache: optional :class:`DecodeCache`; without it every access decodes the file.
        pre_size: without a cache, resize the longest side to this first (saves augment time).
        regions: per row, the boxes of :func:`box_regions` (box supervision): items are then
            ``(image, target, mask, known)``, the mask under the image's own augmentation and
            ``known`` 0 where the row's boxes are not known.
    """

    def __init__(self, table: pd.DataFrame, targets: np.ndarray, transform: Callable,
                 cache: DecodeCache | None = None, pre_size: int | None = None,
                 regions: list[np.ndarray | None] | None = None):
        self.uris = table["image_uri"].astype(str).tolist()
        self.targets = torch.as_tensor(targets, dtype=torch.float32)
        self.transform, self.cache, self.pre_size = transform, cache, pre_size
        if regions is not None and len(regions) != len(self.uris):
            raise ValueError(f"{len(regions)} box regions for {len(self.uris)} rows")
        self.regions = regions

    def __len__(self) -> int:
        return len(self.uris)

    def load(self, i: int) -> np.ndarray:
        """The decoded image ``i`` (cached and resized when a cache is set)."""
        if self.cache is not None:
            return self.cache.load(self.uris[i])
        return read_model_input(self.uris[i], self.pre_size)

    def __getitem__(self, i: int):
        if self.regions is None:
            return self.transform(self.load(i))["image"], self.targets[i]
        image = self.load(i)
        known = self.regions[i] is not None
        mask = box_mask(self.regions[i] if known else np.zeros((0, 4), np.float32), image.shape[:2])
        out = self.transform(image, mask=mask)
        mask = torch.as_tensor(np.asarray(out["mask"]), dtype=torch.float32)
        # a crop or rotation that takes every box of a positive out of view leaves nothing to
        # point at: that view trains on its label alone, never as "no fracture anywhere"
        known = known and (len(self.regions[i]) == 0 or bool(mask.any()))
        return out["image"], self.targets[i], mask, torch.tensor(float(known))


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int, device: str,
                seed: int = 0, sampler=None) -> DataLoader:
    """A DataLoader with worker processes, pinned memory on CUDA, and a seeded shuffle (or the
    given ``sampler``'s order, e.g. a rank's part under distributed training)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers,
                      pin_memory=device.startswith("cuda"), persistent_workers=workers > 0,
                      generator=gen, drop_last=False,
                      worker_init_fn=_seed_worker if workers > 0 else None)


def _seed_worker(worker_id: int) -> None:
    """Distinct, reproducible streams per worker: torch derives each worker's seed from the
    loader's seeded generator; the albumentations pipeline has its own generator to reseed."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    pipeline = getattr(getattr(info.dataset, "transform", None), "pipeline", None) if info else None
    if pipeline is not None:
        pipeline.set_random_seed(seed)
