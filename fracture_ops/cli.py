"""``fracture-ops <step>``: one subcommand per pipeline step.

The same command runs on a laptop, in tests, in the local runner and as a Kubernetes pod's command.
Each subcommand lives in the module that implements the step, which exposes
``configure_parser(parser)`` and ``run_cli(args) -> dict``; modules are imported only when their
subcommand runs, so ``fracture-ops --help`` is fast.

On success the step's small JSON summary is printed as the last line of stdout (and written to
``$FRACTURE_OPS_XCOM_FILE`` when set, which is how pod runs hand it to Airflow).

Exit codes: 0 success, 1 internal error (a retry may help), 2 bad command line or config,
3 bad input data (fix the data; retrying will not help), 4 error budget exceeded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from fracture_ops import errors

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("fracture_ops.data.synthetic", "generate the synthetic radiograph data set"),
    "ingest": ("fracture_ops.data.sources", "turn a data source layout into a canonical manifest"),
    "validate": ("fracture_ops.data.validation", "validate a manifest and its images; quarantine bad rows"),
    "deidentify": ("fracture_ops.deid.step", "de-identify DICOM (PS3.15 Annex E) in a folder or manifest"),
    "deid": ("fracture_ops.deid.review", "de-identification sign-off: `deid review OUTPUT "
             "--approve ID` releases files held for review (see gallery.html)"),
    "pacs-ingest": ("fracture_ops.pacs.ingest", "pull new radiograph studies from a PACS over "
                    "DICOMweb, de-identified on arrival, into a dataset manifest"),
    "pacs-report": ("fracture_ops.pacs.report", "send the champion's results (DICOM SR and "
                    "Grad-CAM secondary capture) back to the PACS under the original studies"),
    "split": ("fracture_ops.data.split", "patient-wise stratified train/val/test split"),
    "detect": ("fracture_ops.detection.cli", "YOLOv8 fracture localisation: train, val, predict"),
    "train": ("fracture_ops.training.train", "train a classifier (timm backbone) on a split"),
    "fit": ("fracture_ops.workflows.fit", "train by the path the data set's size calls for: "
            "train/val when large, cross-validation then a refit when small (the DAG's train task)"),
    "cv": ("fracture_ops.workflows.cv", "patient-grouped K-fold cross-validation of the training "
           "recipe: pooled out-of-fold AUROC with intervals, recommended epochs"),
    "calibrate": ("fracture_ops.evaluation.calibration", "fit temperature/isotonic calibration on val"),
    "tune-thresholds": ("fracture_ops.evaluation.thresholds", "tune per-class thresholds on val"),
    "evaluate": ("fracture_ops.evaluation.evaluate", "metrics with patient bootstrap CIs, plots"),
    "cam": ("fracture_ops.explain.cam", "Grad-CAM report on the test split, or one --image"),
    "package": ("fracture_ops.training.package", "log the MLflow pyfunc model with calibration+thresholds"),
    "register": ("fracture_ops.registry.register", "register the packaged model as the new challenger"),
    "infer": ("fracture_ops.inference.batch", "score new studies with the champion model into the prediction log"),
    "infer-plan": ("fracture_ops.inference.shards:plan", "sharded inference, 1/3: split the day's "
                   "new studies into shards scored by one task each, with a pinned model version"),
    "infer-shard": ("fracture_ops.inference.shards:shard", "sharded inference, 2/3: score one "
                    "shard of a plan into the run folder"),
    "infer-merge": ("fracture_ops.inference.shards:merge", "sharded inference, 3/3: write every "
                    "shard's rows as the batch's one part of the date partition"),
    "reference": ("fracture_ops.inference.reference", "score the champion's validation split into its drift reference table"),
    "drift": ("fracture_ops.monitoring.drift_step", "Evidently drift report of the latest prediction-log window vs the reference"),
    "gate": ("fracture_ops.registry.gates", "challenger vs champion on the same test set (never promotes)"),
    "registry": ("fracture_ops.registry.promotion", "promote an approved challenger, roll back, status"),
}

# one worked example per command (tests/test_config_cli.py parses each one): the chain of a
# manual run shares one --run-id, so every step finds the one before it
EXAMPLES: dict[str, str] = {
    "synth": "fracture-ops synth data/synthetic --patients 200 --dicom-fraction 0.25",
    "ingest": "fracture-ops ingest exports/ --layout folder --run-id r1",
    "validate": "fracture-ops validate --run-id r1",
    "deidentify": "fracture-ops deidentify --run-id r1 --workers 2",
    "deid": "fracture-ops deid review data/artifacts/runs/r1/deidentify --approve IMAGE_ID",
    "pacs-ingest": "fracture-ops pacs-ingest --dataset ward7 --lookback-days 2",
    "pacs-report": "fracture-ops pacs-report --dataset ward7 --max-studies 50",
    "split": "fracture-ops split --run-id r1 --seed 0",
    "detect": "fracture-ops detect train --run-id r1 --epochs 50",
    "train": "fracture-ops train --run-id r1 --backbone tf_efficientnet_lite0 --image-size 384 "
             "--epochs 20",
    "fit": "fracture-ops fit --run-id r1 --cv-below-images 1000 --epochs 20",
    "cv": "fracture-ops cv --run-id r1 --folds 5 --epochs 10",
    "calibrate": "fracture-ops calibrate --run-id r1 --method temperature",
    "tune-thresholds": "fracture-ops tune-thresholds --run-id r1 --method min_sensitivity "
                       "--min-sensitivity 0.9",
    "evaluate": "fracture-ops evaluate --run-id r1 --n-bootstrap 2000",
    "cam": "fracture-ops cam --run-id r1 --top-k 8",
    "package": "fracture-ops package --run-id r1",
    "register": "fracture-ops register --run-id r1",
    "infer": "fracture-ops infer incoming/2026-12-07 --date 2026-12-07",
    "infer-plan": "fracture-ops infer-plan incoming/2026-12-07 --date 2026-12-07 --shards 4",
    "infer-shard": "fracture-ops infer-shard incoming/2026-12-07 --plan PLAN_URI --shard 0",
    "infer-merge": "fracture-ops infer-merge --plan PLAN_URI",
    "reference": "fracture-ops reference --split val",
    "drift": "fracture-ops drift --date 2026-12-07 --window-days 7",
    "gate": "fracture-ops gate --run-id r1",
    "registry": "fracture-ops registry status   (or: promote, rollback, verify-audit, guard-rules)",
}

EPILOG = (
    "exit codes: 0 ok, 1 internal error, 2 usage/config error, 3 bad input data, "
    "4 error budget exceeded. Research and education only; not for clinical use."
)


def step_entry(command: str, which: str):
    """A subcommand's ``configure_parser`` (``which="configure"``) or ``run_cli`` (``"run"``).

    ``module:name`` in :data:`COMMANDS` names a module holding several subcommands, as
    ``configure_<name>_parser`` and ``run_<name>_cli``.
    """
    module, _, name = COMMANDS[command][0].partition(":")
    attr = (f"configure_{name}_parser" if which == "configure" else f"run_{name}_cli") if name \
        else ("configure_parser" if which == "configure" else "run_cli")
    return getattr(importlib.import_module(module), attr)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; with ``only``, import and configure just that subcommand."""
    parser = argparse.ArgumentParser(
        prog="fracture-ops",
        description="Bone-fracture detection MLOps platform: one subcommand per pipeline step.",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<step>")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example: {EXAMPLES[name]}\n\n{EPILOG}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == only:
            step_entry(name, "configure")(p)
            if f"example: {EXAMPLES[name]}" not in (p.epilog or ""):  # a step's own epilog
                p.epilog = f"example: {EXAMPLES[name]}\n\n{p.epilog or EPILOG}"
    return parser


def _values_like_flags(args: argparse.Namespace) -> tuple[str, str] | None:
    """The first argument value (positional, option value or list item) that starts with ``-``.

    Pipeline commands put positionals after ``--``, so a trigger value such as
    ``--config=/tmp/x.yaml`` arrives as a value; no step takes a value that looks like a flag,
    so it is refused (exit 2) instead of being used as a path. Negative numbers are typed by
    their options and never reach here as strings.
    """
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item.startswith("-"):
                return name, item
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fracture-ops`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if a in COMMANDS), None)
    if only in ("train", "fit"):  # --nproc-per-node N > 1: the same command under torchrun
        from fracture_ops.training.distributed import launch, nodes_from_env, split_launch

        try:
            nproc, rest = split_launch(argv)
            nodes, node_rank = nodes_from_env()
        except errors.ConfigError as exc:
            print(f"fracture-ops {only}: error: {exc}", file=sys.stderr)
            return errors.EXIT_USAGE
        if (nproc > 1 or nodes > 1) and only == "fit":
            from fracture_ops.workflows.fit import takes_cv_path

            if takes_cv_path(build_parser(only).parse_args(rest)):
                if node_rank > 0:  # every node runs this command; the folds run on node 0
                    logging.getLogger("fracture_ops.cli").warning(
                        "fit: a small data set is cross-validated on node 0 alone; node %d has "
                        "nothing to do", node_rank)
                    return 0
                logging.getLogger("fracture_ops.cli").warning(
                    "fit: a small data set is cross-validated in one process; "
                    "--nproc-per-node %d and %d nodes apply to the large-data path only", nproc, nodes)
                nproc, nodes, argv = 1, 1, rest
        if (nproc > 1 or nodes > 1) and "RANK" not in os.environ:
            return launch(nproc, rest)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return errors.EXIT_USAGE
    flagged = _values_like_flags(args)
    if flagged:
        name, value = flagged
        print(f"fracture-ops {args.command}: error: argument {name}: value {value!r} starts "
              "with '-': a flag cannot be passed where a value belongs", file=sys.stderr)
        return errors.EXIT_USAGE
    from fracture_ops.cli_common import setup_logging

    setup_logging(args.verbose)
    log = logging.getLogger("fracture_ops.cli")
    try:
        summary = step_entry(args.command, "run")(args)
    except errors.FractureOpsError as exc:
        log.error("%s failed: %s", args.command, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    text = json.dumps(summary or {}, sort_keys=True, default=str)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports the step
        log.info("rank %s done: %s", os.environ["RANK"], text)
        return errors.EXIT_OK
    xcom = os.environ.get("FRACTURE_OPS_XCOM_FILE")
    if xcom:
        os.makedirs(os.path.dirname(xcom) or ".", exist_ok=True)
        with open(xcom, "w", encoding="utf-8") as fh:
            fh.write(text)
    print(text)
    return errors.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
