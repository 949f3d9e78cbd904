"""Typed configuration for every step (pydantic), loaded as: defaults < YAML file < overrides.

Overrides are ``key=value`` strings (from the CLI's ``--set`` or an Airflow trigger form); values
are parsed as YAML scalars so ``epochs=3`` is an int and ``hflip=true`` a bool. Each step writes
its resolved config beside its outputs (``config.resolved.yaml``) so a run can be reproduced.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fracture_ops import catalog, envvars, storage
from fracture_ops.errors import ConfigError

DEFAULT_ARTIFACT_ROOT_ENV = envvars.ARTIFACT_ROOT
RAW_ROOT_ENV = envvars.RAW_ROOT
RUN_ID = re.compile(r"[A-Za-z0-9_.:+-]{1,250}")


def default_raw_root(artifact_root: str) -> str:
    """``$FRACTURE_OPS_RAW_ROOT``, else the artifact root with ``-raw`` appended (a sibling
    folder, or for ``s3://bucket`` the bucket ``bucket-raw``): never inside the dataset store."""
    return os.environ.get(RAW_ROOT_ENV) or artifact_root.rstrip("/") + "-raw"


def default_artifact_root() -> str:
    """``$FRACTURE_OPS_ARTIFACT_ROOT`` or ``./data/artifacts`` (the embedded default)."""
    return os.environ.get(DEFAULT_ARTIFACT_ROOT_ENV, str(Path("data") / "artifacts"))


class StepConfig(BaseModel):
    """Fields every step shares. Unknown keys are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    artifact_root: str = Field("", description="where run folders go: a local folder or an s3:// "
                               "prefix; empty: $FRACTURE_OPS_ARTIFACT_ROOT or ./data/artifacts")
    run_id: str = "manual"
    # where identifying data (raw paths, original ids) may be written: see raw_dir()
    raw_root: str = Field("", description="raw zone for the identifying tables before "
                          "de-identification (its own bucket and credentials, with an expiry); "
                          "empty: $FRACTURE_OPS_RAW_ROOT or <artifact_root>-raw")

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str) -> str:
        # run ids become folder names that reruns empty: no path separators, no '.'/'..'
        if not RUN_ID.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"run_id {value!r} may hold only letters, digits and . _ : + -")
        return value

    def model_post_init(self, __context: Any) -> None:
        if not self.artifact_root:
            object.__setattr__(self, "artifact_root", default_artifact_root())
        if not self.raw_root:
            object.__setattr__(self, "raw_root", default_raw_root(self.artifact_root))
        art, raw = self.artifact_root.rstrip("/"), self.raw_root.rstrip("/")
        if raw == art or raw.startswith(art + "/") or (
                not storage.is_s3(raw) and not storage.is_s3(art)
                and Path(raw).resolve().is_relative_to(Path(art).resolve())):
            raise ConfigError(f"raw_root {self.raw_root!r} must lie outside artifact_root "
                              "(identifying data stays out of the dataset store)")

    def output_dir(self, step: str) -> str:
        """``<artifact_root>/runs/<run_id>/<step>``: the dataset store (no identifiers)."""
        return storage.step_dir(self.artifact_root, self.run_id, step)

    def run_input(self, step: str) -> str:
        """This run's input of ``step`` when none is given: the catalog's ``input_of(step)``,
        the artifact the step before it wrote in this run, in its zone.

        Raises:
            ConfigError: that step has not finished in this run (no ``_SUCCESS``: it never ran,
                failed, or exceeded its error budget), so nothing it left is used.
        """
        art = catalog.input_of(step)
        folder = self.raw_dir(art.step) if art.zone == "raw" else self.output_dir(art.step)
        if not storage.is_complete(folder):
            raise ConfigError(f"{step}: no input given, and step {art.step!r} of run "
                              f"{self.run_id!r} has not finished ({folder} has no _SUCCESS)")
        return storage.join(folder, art.file)

    def raw_dir(self, step: str) -> str:
        """``<raw_root>/runs/<run_id>/<step>``: the raw zone, the only place where the steps
        before de-identification write original ids and paths (see ``docs`` in README)."""
        return storage.step_dir(self.raw_root, self.run_id, step)


C = TypeVar("C", bound=BaseModel)


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a=1", "b.c=x"]`` into ``{"a": 1, "b": {"c": "x"}}``.

    Raises:
        ConfigError: an override is not of the form ``key=value``.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        value = _scalar(raw)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _scalar(raw: str) -> Any:
    """A YAML scalar (``3`` -> int, ``true`` -> bool), but dates stay strings and anything YAML
    cannot read (``2026-13-45``) stays the raw string for the config's own validation."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError):
        return raw
    return raw if isinstance(value, (datetime.date, datetime.datetime)) else value


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_config(cls: type[C], path: str | None = None, overrides: Iterable[str] | dict = ()) -> C:
    """Build a config of type ``cls`` from a YAML file and overrides.

    Args:
        cls: the step's config class.
        path: optional YAML file (local or s3://); a ``<step>:`` section is used when present.
        overrides: ``key=value`` strings or an already parsed dict; they win over the file.

    Raises:
        ConfigError: unreadable YAML, unknown keys or invalid values (the message names the field).
    """
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(storage.read_text(path)) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        section = getattr(cls, "section", None)
        if section and isinstance(data.get(section), dict):
            shared = {k: v for k, v in data.items() if k in ("artifact_root", "run_id", "raw_root")}
            data = {**shared, **data[section]}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    data = _deep_merge(data, extra)
    try:
        return cls(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid {cls.__name__}: {problems}") from exc


def write_resolved(cfg: BaseModel, folder: str) -> str:
    """Write the resolved config as ``config.resolved.yaml`` in ``folder``."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True)
    return storage.write_text(storage.join(folder, "config.resolved.yaml"), text)


def field_schema(cls: type[BaseModel], name: str) -> dict[str, Any]:
    """The JSON schema of one config field: ``default``, ``type``, bounds (``minimum``,
    ``maximum``, ``exclusiveMinimum``, ...), ``enum`` for a ``Literal``, ``description``.

    This is what a DAG trigger form's ``Param`` and a CLI flag are generated from, so the config
    class stays the one place a default, a bound or a description is written. A default that is
    computed (``default_factory``) is left out: the caller resolves it.

    Raises:
        KeyError: ``cls`` has no field ``name``.
    """
    if name not in cls.model_fields:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    prop = dict(cls.model_json_schema(mode="validation")["properties"][name])
    prop.pop("title", None)
    variants = prop.pop("anyOf", None)
    if variants:  # Optional[X]: X's schema, and null allowed
        inner = next(v for v in variants if v.get("type") != "null")
        prop = {**inner, **prop, "type": [inner.get("type", "string"), "null"]}
    return prop
