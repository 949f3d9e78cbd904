"""Patient-wise train/val/test split, stratified by label.

The core, :func:`split_by_patient`, is pure: manifest in, :class:`Split` out. It uses
scikit-learn's ``StratifiedGroupKFold`` twice (test carved first, then validation from the rest),
so every patient lands in exactly one split and label prevalence stays close to the whole.
A fixed test set can be carried over between runs: patients that were in the previous test split
stay there, and only new patients are allocated. :func:`assert_patient_disjoint` guards every
split written to disk.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.data.manifest import table_hash
from fracture_ops.errors import LeakageError, ManifestError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class SplitConfig(StepConfig):
    """Config of the ``split`` step."""

    section: ClassVar[str] = "split"
    manifest_uri: str = ""
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = Field(0, ge=0, description="seed of the split, the training and the bootstrap")
    stratify_column: str = "label"
    fixed_test_uri: str | None = None  # a previous split.parquet whose test patients stay in test

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self


@dataclass
class Split:
    """A split: the manifest with a ``split`` column, and its report."""

    table: pd.DataFrame
    report: dict


def _fold_pick(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of one stratified, grouped fold holding about ``fraction`` of the rows."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1 / fraction)))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ManifestError(f"only {n_groups} patients: too few for a {fraction:.0%} split")
    # StratifiedGroupKFold warns when a class has fewer groups than folds; that is expected on tiny data
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(y)), y, groups))
    mask = np.zeros(len(y), bool)
    mask[held] = True
    return mask


def split_by_patient(manifest: pd.DataFrame, cfg: SplitConfig,
                     fixed_test_patients: set[str] | None = None) -> Split:
    """Assign each row to train/val/test, grouped by ``patient_id`` and stratified by label.

    Args:
        manifest: canonical manifest (needs ``patient_id`` and the stratify column).
        cfg: fractions, seed and stratify column.
        fixed_test_patients: patients that must stay in test (carried over from an earlier run).

    Returns:
        A :class:`Split` whose table has a ``split`` column.

    Raises:
        ManifestError: missing columns, missing patient ids, or too few patients.
    """
    for col in ("patient_id", cfg.stratify_column):
        if col not in manifest.columns:
            raise ManifestError(f"cannot split: manifest lacks column {col!r}")
    if manifest["patient_id"].isna().any() or (manifest["patient_id"].astype(str) == "").any():
        raise ManifestError("cannot split: some rows have no patient_id (validate first)")
    df = manifest.sort_values("image_id", kind="stable").reset_index(drop=True)
    groups = df["patient_id"].astype(str).to_numpy()
    y = df[cfg.stratify_column].astype(str).to_numpy()
    split = np.full(len(df), "train", dtype=object)
    fixed = np.isin(groups, list(fixed_test_patients or ()))
    split[fixed] = "test"
    free = ~fixed
    # the test share still to be filled from new patients, relative to the free rows
    test_target = max(0.0, cfg.test_fraction * len(df) - fixed.sum()) / max(free.sum(), 1)
    if test_target > 0.02:
        held = _fold_pick(y[free], groups[free], min(test_target, 0.5), cfg.seed)
        idx = np.flatnonzero(free)[held]
        split[idx] = "test"
    rest = split == "train"
    val_share = cfg.val_fraction * len(df) / max(rest.sum(), 1)
    held = _fold_pick(y[rest], groups[rest], min(val_share, 0.5), cfg.seed + 1)
    split[np.flatnonzero(rest)[held]] = "val"
    table = df.assign(split=split)
    assert_patient_disjoint(table)
    return Split(table=table, report=split_report(table, cfg.stratify_column, fixed.sum()))


def assert_patient_disjoint(table: pd.DataFrame) -> None:
    """Raise :class:`LeakageError` when any patient appears in more than one split."""
    per_patient = table.groupby("patient_id")["split"].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        # patient ids are pseudonyms after de-identification; report a count and a few of them
        sample = ", ".join(map(str, leaking.index[:5]))
        raise LeakageError(f"{len(leaking)} patient(s) appear in more than one split, e.g. {sample}")


def split_report(table: pd.DataFrame, label_col: str = "label", fixed_rows: int = 0) -> dict:
    """Per-split counts of images and patients and label prevalence, plus the whole's."""
    def stats(df: pd.DataFrame) -> dict:
        prev = df[label_col].astype(str).value_counts(normalize=True).sort_index()
        return {"images": len(df), "patients": int(df["patient_id"].nunique()),
                "prevalence": {k: round(float(v), 4) for k, v in prev.items()}}

    report = {s: stats(table[table["split"] == s]) for s in SPLITS}
    report["all"] = stats(table)
    report["fixed_test_rows"] = int(fixed_rows)
    report["split_hash"] = table_hash(table, ["image_id", "patient_id", "split"])
    return report


def split_step(cfg: SplitConfig) -> dict:
    """Read the manifest, split it, check leakage, write ``split.parquet`` and ``report.json``."""
    if not cfg.manifest_uri:  # a manual chain: this run's finished de-identification
        cfg = cfg.model_copy(update={"manifest_uri": cfg.run_input("split")})
    manifest = storage.read_parquet(cfg.manifest_uri)
    fixed = None
    if cfg.fixed_test_uri:
        previous = storage.read_parquet(cfg.fixed_test_uri)
        fixed = set(previous.loc[previous["split"] == "test", "patient_id"].astype(str))
        log.info("split: keeping %d patients of the fixed test set", len(fixed))
    result = split_by_patient(manifest, cfg, fixed)
    out = cfg.output_dir("split")
    storage.reset_dir(out)
    storage.write_parquet(storage.join(out, catalog.SPLIT.file), result.table)
    storage.write_json(storage.join(out, catalog.SPLIT_REPORT.file), result.report)
    write_resolved(cfg, out)
    for s in SPLITS:
        r = result.report[s]
        log.info("split %-5s %6d images %5d patients prevalence %s", s, r["images"], r["patients"],
                 r["prevalence"])
    summary = {"split_uri": storage.join(out, catalog.SPLIT.file),
               "split_hash": result.report["split_hash"],
               **{f"{s}_images": result.report[s]["images"] for s in SPLITS}}
    storage.mark_success(out, summary)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops split MANIFEST``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    parser.add_argument("manifest", nargs="?", help="manifest Parquet (clean or de-identified)")
    parser.add_argument("--val-fraction", type=float, help="share of images for validation (0.15)")
    parser.add_argument("--test-fraction", type=float, help="share of images for test (0.15)")
    add_field_flags(parser, SplitConfig, "seed")
    parser.add_argument("--fixed-test", dest="fixed_test_uri",
                        help="previous split.parquet whose test patients stay in test")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the split step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(SplitConfig, args, manifest_uri=args.manifest,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           seed=args.seed, fixed_test_uri=args.fixed_test_uri)
    return split_step(cfg)
