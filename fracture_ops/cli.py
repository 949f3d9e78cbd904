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

from fracture_ops import catalog, envvars, errors

# name -> (module, one-line help) and name -> worked example, from the catalog's commands
# (tests/test_config_cli.py parses each example)
COMMANDS: dict[str, tuple[str, str]] = {n: (c.module, c.help) for n, c in catalog.COMMANDS.items()}
EXAMPLES: dict[str, str] = {n: c.example for n, c in catalog.COMMANDS.items()}

EPILOG = (
    "exit codes: 0 ok, 1 internal error, 2 usage/config error, 3 bad input data, "
    "4 error budget exceeded. Research and education only; not for clinical use."
)


def step_entry(command: str, which: str):
    """A subcommand's configure function (``which="configure"``) or run function (``"run"``),
    as its catalog entry names them."""
    entry = catalog.COMMANDS[command]
    return getattr(importlib.import_module(entry.module),
                   entry.configure if which == "configure" else entry.run)


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
    xcom = os.environ.get(envvars.XCOM_FILE)
    if xcom:
        os.makedirs(os.path.dirname(xcom) or ".", exist_ok=True)
        with open(xcom, "w", encoding="utf-8") as fh:
            fh.write(text)
    print(text)
    return errors.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
