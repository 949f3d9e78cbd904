"""The automatic gate: challenger versus champion on the same fixed test set. It never promotes.

Both models score the challenger's test split (the same images, the same labels); the gate
passes when the challenger is

- non-inferior on AUROC: ``auroc_challenger >= auroc_champion - margin`` (default margin 0.02),
- not less sensitive at its operating point: sensitivity at its own tuned threshold is not lower
  than the champion's at the champion's threshold (minus ``sensitivity_tolerance``, default 0),
- not worse calibrated: ``ECE_challenger <= ECE_champion + ece_tolerance`` (default 0.02),

and, for every model (also the first, when there is no champion), above the absolute floors
``min_auroc`` and ``min_sensitivity``. The evidence (all numbers, the test set's hash, both
versions) is written as JSON, logged to the challenger's run and summarised in version tags.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import Field

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig, write_resolved
from fracture_ops.errors import BadInputError
from fracture_ops.registry.client import (
    CHAMPION,
    CLASSIFIER,
    GATE_EVIDENCE,
    TAG_GATE,
    TAG_GATE_CHAMPION,
    TAG_GATE_EVIDENCE,
    TAG_GATE_REASONS,
    TAG_GATE_TEST_SET,
    TAG_RUN_FOLDER,
    alias_version,
    gate_evidence_uri,
    model_uri,
)
from fracture_ops import envvars

log = logging.getLogger(__name__)


class GateConfig(StepConfig):
    """Config of the ``gate`` step."""

    section: ClassVar[str] = "gate"
    model_name: str = CLASSIFIER
    version: str = ""  # default: the version this run registered
    auroc_margin: float = 0.02
    sensitivity_tolerance: float = 0.0
    ece_tolerance: float = 0.02
    min_auroc: float = 0.6
    min_sensitivity: float = 0.5
    ece_bins: int = 15
    # the reference test set pinned for the model (deployment config, not a trigger param):
    # a split/manifest table whose rows with split == "test" (or all rows) every gate scores on
    reference_test_uri: str = Field(default_factory=lambda: os.environ.get(
        envvars.REFERENCE_TEST_URI, ""))
    # without a pinned reference test set a gate would judge a challenger on its own test split:
    # in the cluster (the gpu profile's home) the gate then passes nothing; the local demo opts
    # out and says so in its evidence ($FRACTURE_OPS_REQUIRE_REFERENCE_TEST overrides)
    require_reference_test: bool = Field(default_factory=lambda: os.environ.get(
        envvars.REQUIRE_REFERENCE_TEST,
        "true" if os.environ.get(envvars.RUNNER, "local").strip().lower() == "kubernetes"
        else "false").strip().lower() in ("1", "true", "yes"))


@dataclass
class GateResult:
    """The verdict and its evidence."""

    passed: bool
    reasons: list[str]
    evidence: dict = field(default_factory=dict)


def model_scores(y: np.ndarray, prob: np.ndarray, decision: np.ndarray, bins: int) -> dict:
    """AUROC, sensitivity and specificity at the model's own decisions, and ECE."""
    from sklearn.metrics import roc_auc_score

    from fracture_ops.evaluation.metrics import expected_calibration_error

    pos, neg = y == 1, y == 0
    return {"auroc": float(roc_auc_score(y, prob)) if pos.any() and neg.any() else float("nan"),
            "sensitivity": float(decision[pos].mean()) if pos.any() else float("nan"),
            "specificity": float(1 - decision[neg].mean()) if neg.any() else float("nan"),
            "ece": float(expected_calibration_error(y, prob, bins)), "n": int(len(y))}


def compare(challenger: dict, champion: dict | None, cfg: GateConfig) -> GateResult:
    """The gate's rules on two score dicts (pure)."""
    reasons = []
    if not challenger["auroc"] >= cfg.min_auroc:
        reasons.append(f"AUROC {challenger['auroc']:.4f} below the floor {cfg.min_auroc}")
    if not challenger["sensitivity"] >= cfg.min_sensitivity:
        reasons.append(f"sensitivity {challenger['sensitivity']:.4f} below the floor {cfg.min_sensitivity}")
    if champion is not None:
        if not challenger["auroc"] >= champion["auroc"] - cfg.auroc_margin:
            reasons.append(f"AUROC {challenger['auroc']:.4f} inferior to champion "
                           f"{champion['auroc']:.4f} by more than {cfg.auroc_margin}")
        if not challenger["sensitivity"] >= champion["sensitivity"] - cfg.sensitivity_tolerance:
            reasons.append(f"sensitivity {challenger['sensitivity']:.4f} lower than champion "
                           f"{champion['sensitivity']:.4f}")
        if not challenger["ece"] <= champion["ece"] + cfg.ece_tolerance:
            reasons.append(f"ECE {challenger['ece']:.4f} worse than champion {champion['ece']:.4f} "
                           f"by more than {cfg.ece_tolerance}")
    return GateResult(passed=not reasons, reasons=reasons,
                      evidence={"challenger": challenger, "champion": champion,
                                "rules": cfg.model_dump(include={"auroc_margin", "sensitivity_tolerance",
                                                                 "ece_tolerance", "min_auroc",
                                                                 "min_sensitivity"})})


def score_version(model_uri: str, images: list[str], class_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and decisions of a registered model on images."""
    import mlflow
    import pandas as pd

    from fracture_ops.model.pyfunc import load_classifier_dir

    # built by this package's code from the weights: nothing stored with the model runs
    model = load_classifier_dir(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    out = model.predict(None, pd.DataFrame({"image": images}))
    failed = out["error"].notna()
    if failed.any():  # both models must score the same images: a test image that fails is bad data
        first = int(np.flatnonzero(failed.to_numpy())[0])
        raise BadInputError(f"gate: {int(failed.sum())} test image(s) could not be read, e.g. "
                            f"{images[first]}: {out['error'].iloc[first]}")
    return out[f"prob_{class_name}"].to_numpy(float), out[f"decision_{class_name}"].to_numpy(int)


def _test_set(version, reference_uri: str = "") -> tuple[list[str], np.ndarray, str, str]:
    """The test images and labels: the pinned reference test set when one is configured, else
    the challenger's own test split (promotion then refuses it where a reference hash is
    pinned)."""
    folder = version.tags.get(TAG_RUN_FOLDER, "")
    info = storage.read_json(storage.join(folder, catalog.MODEL_INFO.path))
    source = reference_uri or info["split_uri"]
    table = storage.read_parquet(source)
    test = table[table["split"] == "test"] if "split" in table.columns else table
    test = test.sort_values("image_id")
    if test.empty:
        raise BadInputError(f"gate: the test set {source} is empty")
    cls = info["class_names"][0]
    y = (test["label"].astype(str) == cls).to_numpy(int)
    return test["image_uri"].tolist(), y, cls, test_set_hash(test)


def test_set_hash(test) -> str:
    """The test set's identity: ids, labels and every image's bytes (SHA-256), so a table with
    the same ids and labels over other images is another test set."""
    import hashlib

    from fracture_ops.data.manifest import table_hash

    content = [hashlib.sha256(storage.read_bytes(uri)).hexdigest() for uri in test["image_uri"]]
    return table_hash(test.assign(content_sha256=content), ["image_id", "label", "content_sha256"])


def gate_step(cfg: GateConfig) -> dict:
    """Score challenger and champion on the challenger's test set; tag the verdict. Never promotes."""
    import mlflow

    from fracture_ops import tracking

    tracking.setup(CLASSIFIER)
    client = mlflow.MlflowClient()
    version_no = cfg.version or storage.read_json(
        storage.join(cfg.output_dir(catalog.REGISTERED.step), catalog.REGISTERED.file))["version"]
    version = client.get_model_version(cfg.model_name, version_no)
    images, y, cls, test_hash = _test_set(version, cfg.reference_test_uri)
    prob, dec = score_version(model_uri(cfg.model_name, version=version_no), images, cls)
    challenger = model_scores(y, prob, dec, cfg.ece_bins) | {"version": version_no}
    champion = None
    champ = alias_version(client, cfg.model_name, CHAMPION)
    if champ is not None and str(champ.version) != str(version_no):
        prob_c, dec_c = score_version(model_uri(cfg.model_name, version=champ.version), images, cls)
        champion = model_scores(y, prob_c, dec_c, cfg.ece_bins) | {"version": str(champ.version)}
    result = compare(challenger, champion, cfg)
    if not cfg.reference_test_uri:
        if cfg.require_reference_test:
            result.passed = False
            result.reasons.append("no pinned reference test set (FRACTURE_OPS_REFERENCE_TEST_URI): "
                                  "a gate here passes nothing scored on the challenger's own split")
        result.evidence["reference_test"] = ("missing: gate refused" if cfg.require_reference_test
                                             else "none: scored on the challenger's own test "
                                             "split (local demo, opted out)")
    else:
        result.evidence["reference_test"] = "pinned"
    # everything promotion checks against the registry's state at promotion time
    result.evidence.update(test_set_hash=test_hash, n_test=len(y), model=cfg.model_name,
                           challenger_version=str(version_no),
                           champion_version=str(champion["version"]) if champion else "none")
    out = cfg.output_dir("gate")
    storage.reset_dir(out)
    evidence_uri = storage.write_json(storage.join(out, catalog.GATE.file),
                                      {"passed": result.passed, "reasons": result.reasons, **result.evidence})
    with mlflow.start_run(run_id=version.run_id):
        mlflow.log_dict({"passed": result.passed, "reasons": result.reasons, **result.evidence},
                        GATE_EVIDENCE)
    verdict = "passed" if result.passed else "failed"
    tags = {TAG_GATE: verdict, TAG_GATE_REASONS: "; ".join(result.reasons)[:4000] or "none",
            TAG_GATE_CHAMPION: str(champion["version"]) if champion else "none",
            TAG_GATE_TEST_SET: test_hash, TAG_GATE_EVIDENCE: gate_evidence_uri(version.run_id)}
    for k, v in tags.items():
        client.set_model_version_tag(cfg.model_name, version_no, k, v)
    log.info("gate %s for %s v%s: %s", verdict, cfg.model_name, version_no, result.reasons or "all rules met")
    write_resolved(cfg, out)
    summary = {"version": version_no, "gate": verdict, "reasons": result.reasons,
               "champion_version": tags[TAG_GATE_CHAMPION], "evidence_uri": evidence_uri}
    storage.mark_success(out, summary)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops gate [--version V]``."""
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("--version", help="model version to gate (default: the one this run registered)")
    parser.add_argument("--model-name", help=f"registered model (default {CLASSIFIER})")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    """Run the gate step from parsed CLI arguments."""
    from fracture_ops.cli_common import config_from_args

    return gate_step(config_from_args(GateConfig, args, version=args.version, model_name=args.model_name))
