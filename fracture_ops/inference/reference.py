"""The ``reference`` step: the champion's validation split scored like new studies, with labels.

Drift monitoring compares each day of the prediction log with this table. It is built by the very
code that writes the log (:func:`fracture_ops.inference.score.score_inputs`: same de-identification,
decoding, features and model), so any difference between the two is in the data, not the code.
Categorical features come from the files (DICOM tags), not from the split's manifest columns, for
the same reason: new PNG/JPEG studies carry no view or region either.

Output: ``<artifact_root>/reference/<model_name>/v<version>/reference.parquet`` with
``_SUCCESS`` last. One table per model version, built once: a rerun for a version whose table is
complete returns at once (``skipped: true``) unless ``force`` is set. ``image_id`` and ``label``
are the split's; ``scored_date`` is the date the version was registered, so a forced rebuild
gives the same file.
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar

import pandas as pd
from pydantic import Field

from fracture_ops import storage
from fracture_ops.config import write_resolved
from fracture_ops.errors import BadInputError
from fracture_ops.model import prediction_log as layout
from fracture_ops.inference.score import ScoreInput, load_scorer, score_inputs
from fracture_ops.registry.client import resolve_model
from fracture_ops.inference.infer import (
    ScoringConfig,
    add_scoring_args,
    batch_id_for,
    check_budget,
    deid_config,
    finalize_rows,
    quarantine_frame,
    scoring_flags,
)

log = logging.getLogger(__name__)
STEP = "reference"


class ReferenceConfig(ScoringConfig):
    """Config of the ``reference`` step (YAML section ``reference``)."""

    section: ClassVar[str] = "reference"
    split: str = Field("val", description="split of the model's training split table to score")
    force: bool = Field(False, description="rebuild even when the table is complete")


def split_inputs(split_uri: str, split: str) -> list[ScoreInput]:
    """The rows of one split as scoring inputs, labels included.

    Raises:
        BadInputError: the split table is missing or has no rows for ``split``.
    """
    if not split_uri or not storage.exists(split_uri):
        raise BadInputError("reference: the model's split table (split_uri in model.pt info) "
                            "is missing")
    table = storage.read_parquet(split_uri)
    rows = table[table["split"].astype(str) == split]
    if rows.empty:
        raise BadInputError(f"reference: the model's split table has no {split!r} rows")
    return [ScoreInput(str(r["image_id"]), str(r["image_uri"]),
                       None if pd.isna(r["label"]) else str(r["label"]))
            for r in rows.to_dict("records")]


def build_reference_step(cfg: ReferenceConfig) -> dict:
    """Score the champion's validation split into its reference table (once per version).

    Returns:
        The summary (also in ``_SUCCESS``): ``reference_uri``, ``rows``, ``quarantined``,
        ``model_version``, ``batch_id``; ``skipped`` is true when the table already existed.

    Raises:
        ConfigError: non-registry model_uri, no de-id secret.
        BadInputError: no such model/alias, or its split table is missing/empty.
        ErrorBudgetExceeded: too many validation images could not be scored.
    """
    from fracture_ops.deid.config import load_keys

    ref = resolve_model(cfg.model_uri)
    out_dir = layout.reference_dir(cfg.artifact_root, ref.name, ref.version)
    if storage.is_complete(out_dir) and not cfg.force:
        log.info("reference for %s v%s already complete; skipping", ref.name, ref.version)
        # the model URI from the registry, never from a file in the artifact store
        return {**storage.read_json(storage.join(out_dir, storage.SUCCESS_MARKER)),
                "model_name": ref.name, "model_version": ref.version, "model_uri": ref.uri,
                "skipped": True}
    dcfg = deid_config(cfg)
    keys = load_keys(dcfg)
    scorer = load_scorer(ref, cfg.device)
    items = split_inputs(scorer.info.get("split_uri", ""), cfg.split)
    batch_id = batch_id_for([i.image_id for i in items], ref)
    result = score_inputs(items, scorer, keys, dcfg, batch_size=cfg.batch_size, workers=cfg.workers,
                          max_bad=int(cfg.max_bad_fraction * len(items)), desc="reference")
    storage.reset_dir(out_dir)
    write_resolved(cfg, out_dir)
    quarantine = quarantine_frame(result, batch_id)
    storage.write_parquet(storage.join(out_dir, "quarantine.parquet"), quarantine)
    check_budget(len(result.quarantined), len(items), cfg.max_bad_fraction, STEP,
                 result.stopped_early)
    rows = finalize_rows(result.rows, batch_id, ref.created_date, ref)
    uri = layout.write_table(storage.join(out_dir, layout.REFERENCE_FILE), rows, scorer.class_names)
    summary = {"step": STEP, "model_name": ref.name, "model_version": ref.version,
               "model_uri": ref.uri, "batch_id": batch_id, "split": cfg.split,
               "reference_uri": uri, "inputs": len(items), "rows": len(rows),
               "quarantined": len(quarantine),
               "quarantine": quarantine[["image_id", "reason"]].head(50).to_dict("records"),
               "skipped": False}
    storage.mark_success(out_dir, summary)
    log.info("reference: %d row(s), %d quarantined, %s v%s", len(rows), len(quarantine),
             ref.name, ref.version)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops reference [--model-uri U] [--split val] [--force]``."""
    parser.add_argument("--split", help="split to score (default val)")
    parser.add_argument("--force", action="store_true", default=None,
                        help="rebuild even when the reference table is complete")
    add_scoring_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the reference step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    cfg = config_from_args(ReferenceConfig, args, split=args.split, force=args.force,
                           **scoring_flags(args))
    return build_reference_step(cfg)
