"""The ``register`` step: the packaged model becomes a new version of ``fracture-classifier``.

The version gets the alias ``challenger`` and tags carrying the headline test metrics with their
confidence intervals, the data and split hashes, the git revision and the run folder. Registering
checks before it creates: a rerun for the same MLflow run finds its existing version and only
refreshes its tags and alias. It never touches the ``champion`` alias: promotion needs a person.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from typing import ClassVar

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.errors import BadInputError
from fracture_ops.registry.client import (
    CHALLENGER,
    CLASSIFIER,
    TAG_APPROVAL,
    TAG_GATE,
    TAG_MODEL_CARD,
    TAG_RUN_FOLDER,
    ensure_registered_model,
    find_version,
    model_uri,
)
from fracture_ops import envvars

log = logging.getLogger(__name__)


class RegisterConfig(StepConfig):
    """Config of the ``register`` step (URIs default to this run's step folders)."""

    section: ClassVar[str] = "register"
    model_name: str = CLASSIFIER
    package_dir: str = ""
    evaluation_dir: str = ""
    train_dir: str = ""


def git_revision() -> str:
    """``$FRACTURE_OPS_GIT_REVISION`` (set in images) or the checkout's HEAD, else ``unknown``."""
    rev = os.environ.get(envvars.GIT_REVISION)
    if rev:
        return rev
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version_tags(headline: dict, info: dict, run_folder: str) -> dict[str, str]:
    """Tags of a new version: metrics (with CI), hashes, revision, provenance."""
    tags = {f"metric.{k}": f"{v:.4f}" for k, v in headline.items() if isinstance(v, (int, float))}
    tags.update({"manifest_hash": info.get("manifest_hash", ""), "split_hash": info.get("split_hash", ""),
                 "backbone": info.get("backbone", ""), "git_revision": git_revision(),
                 TAG_RUN_FOLDER: run_folder, TAG_GATE: "pending", TAG_APPROVAL: "pending"})
    return tags


def register_model_version(model_uri: str, run_id: str, name: str, tags: dict[str, str]):
    """Create (or find) the version, tag it and point ``challenger`` at it."""
    import mlflow

    client = mlflow.MlflowClient()
    ensure_registered_model(client, name, "Bone-fracture classifier (research use only).")
    version = find_version(client, name, run_id)
    if version is None:
        # mlflow.register_model resolves MLflow 3 logged-model URIs (models:/m-...) to their source
        version = mlflow.register_model(model_uri, name)
        log.info("registered %s version %s", name, version.version)
    else:  # a rerun refreshes the metrics; the gate's verdict and a reviewer's decision stay
        tags = {k: v for k, v in tags.items() if k not in (TAG_GATE, TAG_APPROVAL)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def attach_model_card(run_folder: str, out: str, name: str, version, run_id: str) -> str:
    """Write the model card, log it with the run, and make it the version's description."""
    import mlflow

    from fracture_ops.registry.model_card import write_model_card

    md, md_uri, html_uri = write_model_card(run_folder, out, name, str(version.version), run_id,
                                            git_revision())
    client = mlflow.MlflowClient()
    client.log_text(run_id, md, "model_card/model_card.md")
    client.log_text(run_id, storage.read_text(html_uri), "model_card/model_card.html")
    client.update_model_version(name, version.version, description=md[:60000])
    client.set_model_version_tag(name, version.version, TAG_MODEL_CARD, f"runs:/{run_id}/model_card/model_card.html")
    return html_uri


def register_step(cfg: RegisterConfig) -> dict:
    """Register the packaged model as the new challenger.

    Raises:
        BadInputError: the package or evaluate step has not finished.
    """
    from fracture_ops import tracking

    package_dir = cfg.package_dir or cfg.output_dir("package")
    eval_dir = cfg.evaluation_dir or cfg.output_dir("evaluate")
    train_dir = cfg.train_dir or cfg.output_dir("train")
    for folder in (package_dir, eval_dir, train_dir):
        if not storage.is_complete(folder):
            raise BadInputError(f"register: {folder} has not finished (_SUCCESS missing)")
    package = storage.read_json(storage.join(package_dir, catalog.PACKAGE.file))
    headline = storage.read_json(storage.join(eval_dir, storage.SUCCESS_MARKER)).get("headline", {})
    info = storage.read_json(storage.join(train_dir, catalog.MODEL_INFO.file))
    tracking.setup(info.get("experiment", CLASSIFIER))
    run_folder = storage.join(cfg.artifact_root, "runs", cfg.run_id)
    version = register_model_version(package["model_uri"], package["mlflow_run_id"], cfg.model_name,
                                     version_tags(headline, info, run_folder))
    out = cfg.output_dir("register")
    storage.reset_dir(out)
    card_uri = attach_model_card(run_folder, out, cfg.model_name, version, package["mlflow_run_id"])
    summary = {"model_card": card_uri, "model_name": cfg.model_name, "version": str(version.version), "alias": CHALLENGER,
               "model_uri": model_uri(cfg.model_name, version=version.version),
               "mlflow_run_id": package["mlflow_run_id"]}
    write_resolved(cfg, out)
    storage.write_json(storage.join(out, catalog.REGISTERED.file), summary)
    storage.mark_success(out, summary)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops register [--model-name N]``."""
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("--model-name", help=f"registered model name (default {CLASSIFIER})")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the register step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    return register_step(config_from_args(RegisterConfig, args, model_name=args.model_name))
