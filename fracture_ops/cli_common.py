"""Helpers shared by the CLI subcommands: common flags, config loading, logging, progress bars."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from pydantic import BaseModel

from fracture_ops.config import load_config
from fracture_ops import envvars

C = TypeVar("C", bound=BaseModel)
log = logging.getLogger("fracture_ops")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config``, ``--set``, ``--run-id`` and ``--artifact-root`` to a step's parser."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", metavar="YAML", help="config file (local path or s3://); its "
                   "section named after the step is used when present")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field of this step's config (repeatable; the fields are "
                   "those of --config's section, see the flags above)")
    g.add_argument("--run-id", help="run folder name under <artifact_root>/runs/ (default: manual)")
    g.add_argument("--artifact-root", help="where outputs go (local folder or s3:// prefix; "
                   "default $FRACTURE_OPS_ARTIFACT_ROOT or ./data/artifacts)")
    g.add_argument("--raw-root", help="raw zone: the only place where steps before "
                   "de-identification write original ids and paths (default $FRACTURE_OPS_RAW_ROOT"
                   " or <artifact-root>-raw)")


_FLAG_TYPES = {"integer": int, "number": float, "string": str}


def add_field_flags(parser: argparse.ArgumentParser, cls: type[BaseModel], *names: str) -> None:
    """Add one ``--field-name`` flag per config field, generated from the field itself.

    Type, choices (a ``Literal``), bounds and the help text (the field's description and its
    default) all come from ``cls``, the same source as the DAG trigger forms
    (:func:`fracture_ops.config.field_schema`), so a flag cannot disagree with the config. Values
    the user gives are checked by the config, which names the field on an error (exit 2);
    :func:`config_from_args` picks the given flags up.
    """
    from fracture_ops.config import field_schema

    generated = list(parser.get_default("config_fields") or [])
    for name in names:
        schema = field_schema(cls, name)
        kind = schema.get("type")
        kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
        text = schema.get("description", "").rstrip(".")
        bounds = [f"{op} {schema[key]}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                  ("maximum", "<="), ("exclusiveMaximum", "<")) if key in schema]
        default = schema.get("default", cls.model_fields[name].default)
        help_text = "; ".join(x for x in (text, ", ".join(bounds),
                                          f"default {default}" if default not in (None, "") else "") if x)
        flag = "--" + name.replace("_", "-")
        if kind == "boolean":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=_FLAG_TYPES.get(kind, str), default=None,
                                choices=schema.get("enum"), help=help_text,
                                metavar=None if "enum" in schema else name.upper())
        generated.append(name)
    parser.set_defaults(config_fields=generated)


def config_from_args(cls: type[C], args: argparse.Namespace, **explicit) -> C:
    """Build a step config: file < ``--set`` overrides < flags (non-None only): the flags that
    :func:`add_field_flags` generated, then the ``explicit`` ones."""
    overrides = list(getattr(args, "overrides", []) or [])
    generated = {k: getattr(args, k) for k in getattr(args, "config_fields", None) or []
                 if k in cls.model_fields}
    extra = {k: v for k, v in {**generated, **explicit}.items() if v is not None}
    if getattr(args, "run_id", None):
        extra["run_id"] = args.run_id
    if getattr(args, "artifact_root", None):
        extra["artifact_root"] = args.artifact_root
    if getattr(args, "raw_root", None):
        extra["raw_root"] = args.raw_root
    from fracture_ops.config import _deep_merge, parse_overrides

    merged = _deep_merge(parse_overrides(overrides), extra)
    return load_config(cls, getattr(args, "config", None), merged)


# third-party loggers that report their own internals at INFO (Great Expectations prints ~200
# "Skipping registering function" lines per validate run); WARNING and above still show
QUIET_LOGGERS = ("great_expectations", "mlflow", "alembic", "botocore", "boto3", "s3transfer",
                 "urllib3", "PIL", "matplotlib", "h5py", "numexpr", "filelock", "fsspec", "httpx",
                 "timm", "evidently", "ultralytics", "pytesseract", "rapidocr", "onnxruntime")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps; stdout is kept for the step's JSON summary.

    Without ``verbose`` the :data:`QUIET_LOGGERS` log WARNING and above only, and MLflow's
    artifact progress bars are off (unless ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` is set);
    ``-v`` brings everything back at DEBUG.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # a handler filter, not logger levels: some libraries set their loggers' levels
        # themselves when imported (Great Expectations' data context sets INFO)
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, _QuietThirdParty) for f in handler.filters):
                handler.addFilter(_QuietThirdParty())
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class _QuietThirdParty(logging.Filter):
    """Drop records below WARNING from :data:`QUIET_LOGGERS` and their children."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] not in QUIET_LOGGERS


def progress(iterable: Iterable, desc: str, total: int | None = None):
    """A tqdm progress bar on stderr; quiet when ``FRACTURE_OPS_NO_PROGRESS=1``."""
    from tqdm.auto import tqdm

    disable = os.environ.get(envvars.NO_PROGRESS) == "1"
    return tqdm(iterable, desc=desc, total=total, disable=disable, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)
