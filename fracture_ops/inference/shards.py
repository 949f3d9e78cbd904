"""Sharded batch inference: plan, score one shard per task, merge into the date partition.

The ``fracture_inference`` DAG fans a day's incoming images out over mapped tasks (Airflow's
dynamic task mapping, one task per shard) and merges their outputs in one last task:

1. ``fracture-ops infer-plan INCOMING --shards N`` lists the incoming files, pins the model
   version (``models:/<name>/<version>``), names the batch exactly as ``infer`` does (a hash of
   every input's id and the version), leaves out what the partition already holds, and splits the
   rest, sorted by ``image_id``, into at most N contiguous shards of near-equal size. The plan
   (``infer_plan/plan.json``) holds only keyed ids, never paths or file names (real file names
   carry patient names).
2. ``fracture-ops infer-shard --plan PLAN --shard K INCOMING`` scores the ids of shard K with the
   pinned version into ``infer/shard-K/`` of the run folder (rows and quarantine tables), never
   into the partition. A rerun replaces that folder; a listed file that has gone is quarantined.
3. ``fracture-ops infer-merge --plan PLAN`` checks that every shard finished with the planned
   version, applies the error budget to the whole batch and writes the shards' rows, in plan
   order, as the batch's one part of the date partition (``part-<batch_id>.parquet``, written
   atomically: a rerun replaces it, a reader never sees half of it).

So rerunning one failed shard, or the merge, neither duplicates nor loses rows, and the rows
equal those of one unsharded ``infer`` run over the same files (the same batch id and part).
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar

import pandas as pd
from pydantic import Field

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.errors import ConfigError, ErrorBudgetExceeded
from fracture_ops.inference.infer import (
    InferConfig,
    add_scoring_args,
    batch_summary,
    check_budget,
    deid_config,
    finalize_rows,
    list_inputs,
    prepare_batch,
    quarantine_frame,
    score_batch,
    scoring_flags,
    write_batch,
)
from fracture_ops.inference.score import Quarantined, ScoreInput, ScoreResult
from fracture_ops.registry.client import resolve_model

log = logging.getLogger(__name__)
PLAN_STEP, SHARD_STEP, MERGE_STEP = "infer_plan", "infer", "infer_merge"
PLAN_FILE = catalog.INFER_PLAN.file
MISSING = "file not found (listed by the plan, gone when its shard ran)"


class PlanConfig(InferConfig):
    """Config of ``infer-plan`` (YAML section ``infer_plan``)."""

    section: ClassVar[str] = "infer_plan"
    shards: int = Field(4, ge=1, le=256, description="most scoring tasks the day's new images "
                        "are split into (one mapped task per shard)")


class ShardConfig(InferConfig):
    """Config of ``infer-shard`` (YAML section ``infer_shard``)."""

    section: ClassVar[str] = "infer_shard"
    plan_uri: str = Field("", description="the plan written by infer-plan")
    shard: int = Field(0, ge=0, description="which shard of the plan to score")


class MergeConfig(StepConfig):
    """Config of ``infer-merge`` (YAML section ``infer_merge``)."""

    section: ClassVar[str] = "infer_merge"
    plan_uri: str = Field("", description="the plan written by infer-plan")
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0,
                                    description="fail when more of the inputs are quarantined")


def split_even(ids: list[str], shards: int) -> list[list[str]]:
    """``ids`` in order, cut into at most ``shards`` contiguous runs whose sizes differ by at
    most one; always at least one run (empty when there is nothing to score)."""
    n = max(1, min(shards, len(ids)))
    size, extra = divmod(len(ids), n)
    out, start = [], 0
    for k in range(n):
        end = start + size + (k < extra)
        out.append(ids[start:end])
        start = end
    return out


def plan_step(cfg: PlanConfig) -> dict:
    """Plan the day's batch: which images each shard scores, with which model version.

    Returns:
        The summary: ``plan_uri``, ``shards`` (the shard numbers ``[0, ..., n-1]`` the DAG maps
        over), ``batch_id``, ``model_uri`` (pinned), ``to_score`` and the counts of ``infer``.

    Raises:
        ConfigError, BadInputError: as :func:`~fracture_ops.inference.infer.prepare_batch`.
    """
    b = prepare_batch(cfg)
    out_dir = cfg.output_dir(PLAN_STEP)
    storage.reset_dir(out_dir)
    write_resolved(cfg, out_dir)
    shards = split_even([i.image_id for i in b.todo], cfg.shards)
    base = batch_summary(cfg, b)
    plan = {"batch_id": b.batch_id, "model_uri": b.ref.uri, "model_name": b.ref.name,
            "model_version": b.ref.version, "date": cfg.date, "partition": b.partition,
            "shards": shards, "summary": base}
    plan_uri = storage.join(out_dir, PLAN_FILE)
    storage.write_json(plan_uri, plan)
    summary = {"step": PLAN_STEP, "plan_uri": plan_uri, "shards": list(range(len(shards))),
               "shard_sizes": [len(s) for s in shards], "to_score": len(b.todo),
               **{k: base[k] for k in ("batch_id", "model_uri", "model_version", "date",
                                       "partition", "inputs", "already_scored",
                                       "already_quarantined")}}
    storage.mark_success(out_dir, summary)
    log.info("infer-plan: %d to score in %d shard(s), model %s v%s, batch %s", len(b.todo),
             len(shards), b.ref.name, b.ref.version, b.batch_id)
    return summary


def read_plan(plan_uri: str) -> dict:
    """The plan at ``plan_uri``.

    Raises:
        ConfigError: no plan_uri, or no readable plan there.
    """
    if not plan_uri:
        raise ConfigError("plan_uri is not set (the plan.json that infer-plan wrote)")
    try:
        plan = storage.read_json(plan_uri)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no readable inference plan at {plan_uri}: {type(exc).__name__}") from exc
    if not isinstance(plan, dict) or not {"shards", "batch_id"} <= set(plan):
        raise ConfigError(f"no readable inference plan at {plan_uri}: not a plan")
    return plan


def shard_dir(cfg: StepConfig, shard: int) -> str:
    """``<run>/infer/shard-<K>``: one mapped task's own folder."""
    return storage.join(cfg.output_dir(SHARD_STEP), f"shard-{shard:04d}")


def shard_step(cfg: ShardConfig) -> dict:
    """Score one shard of a plan with the plan's pinned model version into its own folder.

    Returns:
        The shard's summary: ``rows``, ``quarantined``, ``model_version``, ``class_names``...

    Files that cannot be scored are quarantined without an error budget here: the merge
    applies ``max_bad_fraction`` to the whole batch, as one ``infer`` run would.

    Raises:
        ConfigError: no/unreadable plan, a shard number outside the plan, bad de-id options.
    """
    from fracture_ops.deid.config import load_keys

    plan = read_plan(cfg.plan_uri)
    if not 0 <= cfg.shard < len(plan["shards"]):
        raise ConfigError(f"shard {cfg.shard} is not in the plan (0..{len(plan['shards']) - 1})")
    ids = list(plan["shards"][cfg.shard])
    dcfg = deid_config(cfg)
    keys = load_keys(dcfg)
    by_id = {i.image_id: i for i in list_inputs(cfg.incoming_uri, keys)} if ids else {}
    todo = [by_id[i] for i in ids if i in by_id]
    gone = [Quarantined(ScoreInput(i, ""), MISSING) for i in ids if i not in by_id]
    out_dir = shard_dir(cfg, cfg.shard)
    storage.reset_dir(out_dir)
    write_resolved(cfg, out_dir)
    ref = resolve_model(plan["model_uri"])
    if str(ref.version) != str(plan["model_version"]):
        raise ConfigError(f"the plan pins version {plan['model_version']}, the registry gave "
                          f"{ref.version}")
    summary = {"step": "infer_shard", "shard": cfg.shard, "batch_id": plan["batch_id"],
               "model_version": ref.version, "inputs": len(ids), "rows": 0, "class_names": []}
    result = ScoreResult(pd.DataFrame())
    if todo:
        # no error budget per shard: a shard of a few files with one bad file would fail a
        # batch that is within its budget; infer-merge applies it to the whole batch
        unbudgeted = cfg.model_copy(update={"max_bad_fraction": 1.0})
        result, class_names, stats = score_batch(unbudgeted, todo, ref, keys, dcfg, out_dir)
        summary.update(stats, class_names=class_names)
    result.quarantined.extend(gone)
    quarantine = quarantine_frame(result, plan["batch_id"])
    storage.write_parquet(storage.join(out_dir, "quarantine.parquet"), quarantine)
    storage.write_parquet(storage.join(out_dir, "rows.parquet"), result.rows)
    summary.update(rows=len(result.rows), quarantined=len(quarantine))
    storage.mark_success(out_dir, summary)
    log.info("infer-shard %d: %d row(s), %d quarantined", cfg.shard, summary["rows"],
             summary["quarantined"])
    return summary


def merge_step(cfg: MergeConfig) -> dict:
    """Write every shard's rows as the batch's one part of the date partition.

    Returns:
        The batch summary, as ``infer`` writes it (``rows``, ``quarantined``, ``part_uri``...),
        plus ``shards``.

    Raises:
        ConfigError: no/unreadable plan.
        RuntimeError: a shard has not finished, or finished with another model version (the
            task is retried after the shard's own retry).
        ErrorBudgetExceeded: more than ``max_bad_fraction`` of the batch quarantined (the
            partition is then left unchanged).
    """
    from fracture_ops.registry.client import ModelRef

    plan = read_plan(cfg.plan_uri)
    out_dir = cfg.output_dir(MERGE_STEP)
    storage.reset_dir(out_dir)
    write_resolved(cfg, out_dir)
    rows, quarantines, class_names, stats = [], [], [], {"decode_warnings": 0, "cam_overlays": 0}
    for k in range(len(plan["shards"])):
        folder = shard_dir(cfg, k)
        marker = storage.join(folder, storage.SUCCESS_MARKER)
        done = storage.read_json(marker) if storage.is_complete(folder) else None
        if done is None or done.get("batch_id") != plan["batch_id"]:
            raise RuntimeError(f"infer-merge: shard {k} of batch {plan['batch_id']} has not finished")
        if str(done["model_version"]) != str(plan["model_version"]):
            raise RuntimeError(f"infer-merge: shard {k} scored with version {done['model_version']}, "
                               f"the plan pins {plan['model_version']}")
        if done["class_names"]:  # the shard scored (some rows may all be quarantined)
            rows.append(storage.read_parquet(storage.join(folder, "rows.parquet")))
            class_names = class_names or done["class_names"]
        quarantines.append(storage.read_parquet(storage.join(folder, "quarantine.parquet")))
        for key in stats:
            stats[key] += int(done.get(key, 0))
    quarantine = pd.concat(quarantines, ignore_index=True).astype(str)
    attempted = sum(len(ids) for ids in plan["shards"])
    summary = {**plan["summary"], **stats, "shards": len(plan["shards"])}
    if not attempted:
        storage.mark_success(out_dir, summary)
        log.warning("infer-merge: nothing to score in batch %s", plan["batch_id"])
        return summary
    try:
        check_budget(len(quarantine), attempted, cfg.max_bad_fraction, "infer")
    except ErrorBudgetExceeded:
        storage.write_json(storage.join(out_dir, "quarantine.json"), quarantine.to_dict("records"))
        raise
    ref = ModelRef(plan["model_name"], str(plan["model_version"]))
    if not rows:  # every listed file had gone: nothing was scored, only quarantined
        summary.update(quarantined=len(quarantine))
        storage.mark_success(out_dir, summary)
        return summary
    scored = pd.concat([r for r in rows if len(r)] or rows[:1], ignore_index=True)
    write_batch(plan["partition"], plan["batch_id"],
                finalize_rows(scored, plan["batch_id"], plan["date"], ref), quarantine,
                class_names, summary)
    storage.mark_success(out_dir, summary)
    log.info("infer-merge: %d row(s) from %d shard(s), %d quarantined, batch %s", summary["rows"],
             len(plan["shards"]), summary["quarantined"], plan["batch_id"])
    return summary


# ----------------------------------------------------------------------------------------- CLI

def configure_plan_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops infer-plan INCOMING [--date D] [--shards N] [--model-uri U]``."""
    parser.add_argument("incoming", nargs="?", metavar="INCOMING",
                        help="folder or s3:// prefix of new studies (or incoming_uri in config)")
    parser.add_argument("--date", help="partition date YYYY-MM-DD (default: today UTC)")
    parser.add_argument("--shards", type=int, help="most shards to split the batch into (default 4)")
    add_scoring_args(parser)


def run_plan_cli(args: argparse.Namespace) -> dict:
    from fracture_ops.cli_common import config_from_args

    return plan_step(config_from_args(PlanConfig, args, incoming_uri=args.incoming, date=args.date,
                                      shards=args.shards, **scoring_flags(args)))


def configure_shard_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops infer-shard INCOMING --plan PLAN --shard K``."""
    parser.add_argument("incoming", nargs="?", metavar="INCOMING",
                        help="the folder or s3:// prefix the plan listed")
    parser.add_argument("--plan", dest="plan_uri", help="plan.json written by infer-plan")
    parser.add_argument("--shard", type=int, help="shard number (0-based)")
    parser.add_argument("--cam-positives", action="store_true", default=None,
                        help="write Grad-CAM overlays of positive images into the shard's folder")
    add_scoring_args(parser)


def run_shard_cli(args: argparse.Namespace) -> dict:
    from fracture_ops.cli_common import config_from_args

    flags = scoring_flags(args)
    if flags.pop("model_uri"):
        raise ConfigError("infer-shard: the plan pins the model version; --model-uri is infer-plan's")
    return shard_step(config_from_args(ShardConfig, args, incoming_uri=args.incoming,
                                       plan_uri=args.plan_uri, shard=args.shard,
                                       cam_positives=args.cam_positives, **flags))


def configure_merge_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops infer-merge --plan PLAN``."""
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("--plan", dest="plan_uri", help="plan.json written by infer-plan")
    parser.add_argument("--max-bad-fraction", type=float,
                        help="error budget over the whole batch (default 0.1)")
    add_common_args(parser)


def run_merge_cli(args: argparse.Namespace) -> dict:
    from fracture_ops.cli_common import config_from_args

    return merge_step(config_from_args(MergeConfig, args, plan_uri=args.plan_uri,
                                       max_bad_fraction=args.max_bad_fraction))
