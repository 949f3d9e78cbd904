"""The catalog: every command and every artifact the pipeline's steps hand each other, named once.

An :class:`Artifact` is a file a step writes into its folder of a run (``<root>/runs/<run_id>/
<step>/<file>``) and another step (or the demo, or the registry) reads: its step, its file name,
its format and its zone (``dataset``: the dataset store, de-identified; ``raw``: the raw zone,
which holds identifying tables before de-identification). Step modules write and read through
these entries (``catalog.SPLIT.file``); ``orchestration/specs.py`` builds the DAG's arguments and
each step's ``outputs`` from them (:func:`outputs_of`), and the DAG's edges follow.

A :class:`Command` is a ``fracture-ops`` subcommand: the module that implements it and the two
functions it calls there, by name (``configure_parser`` and ``run_cli`` unless a module holds
several commands), its one-line help and a worked example (``tests/test_config_cli.py`` parses
each). ``fracture_ops/cli.py`` builds its parser from :data:`COMMANDS`.

Adding a step touches four files: its module, its entries here, its spec, its test
(``tests/test_architecture.py`` adds a toy step between ``deidentify`` and ``split`` on a copy of
the package and counts them). This module imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Artifact:
    """One file of a run folder: ``<zone root>/runs/<run_id>/<step>/<file>``."""

    step: str
    file: str
    format: Literal["parquet", "json", "html", "pt"]
    zone: Literal["dataset", "raw"] = "dataset"
    about: str = ""

    @property
    def path(self) -> str:
        """Relative to the run folder: ``<step>/<file>``."""
        return f"{self.step}/{self.file}"


# ingest and validate write identifying tables to the raw zone only
INGEST_MANIFEST = Artifact("ingest", "manifest.parquet", "parquet", "raw", "canonical manifest")
INGEST_BOXES = Artifact("ingest", "boxes.parquet", "parquet", "raw", "fracture boxes, if any")
INGEST_REPORT = Artifact("ingest", "report.json", "json", about="counts, layout, patient ids")
VALIDATE_SUMMARY = Artifact("validate", "summary.json", "json", about="checks and quarantine")
VALIDATE_REPORT = Artifact("validate", "report.html", "html", about="the validation report")
CLEAN_MANIFEST = Artifact("validate", "manifest.clean.parquet", "parquet", "raw",
                          "rows that passed validation")
CLEAN_BOXES = Artifact("validate", "boxes.clean.parquet", "parquet", "raw",
                       "boxes of the rows that passed")
DEID_MANIFEST = Artifact("deidentify", "manifest.deid.parquet", "parquet",
                         about="de-identified manifest (pseudonymous patient ids)")
DEID_BOXES = Artifact("deidentify", "boxes.deid.parquet", "parquet",
                      about="boxes keyed by de-identified image ids")
SPLIT = Artifact("split", "split.parquet", "parquet", about="patient-wise train/val/test")
SPLIT_REPORT = Artifact("split", "report.json", "json", about="split counts and hash")
MODEL = Artifact("train", "model.pt", "pt", about="weights + architecture + eval transform")
PREDICTIONS = Artifact("train", "predictions.parquet", "parquet",
                       about="logits of val and test rows")
MODEL_INFO = Artifact("train", "model_info.json", "json", about="what was trained, on what")
CALIBRATION = Artifact("calibrate", "calibration.json", "json", about="the fitted calibrator")
THRESHOLDS = Artifact("tune_thresholds", "thresholds.json", "json", about="per-class thresholds")
EVALUATION = Artifact("evaluate", "evaluation.json", "json", about="metrics with intervals")
EVALUATION_REPORT = Artifact("evaluate", "evaluation.html", "html",
                             about="the report: curves with bands, thresholds, studies, regions")
CAM_REPORT = Artifact("cam", "report.html", "html", about="Grad-CAM report")
PACKAGE = Artifact("package", "package.json", "json", about="the logged MLflow model")
REGISTERED = Artifact("register", "registered.json", "json", about="the registered version")
GATE = Artifact("gate", "gate.json", "json", about="the gate's verdict and evidence")
DETECT_METRICS = Artifact("detect_train", "metrics.json", "json", about="YOLOv8 mAP")
INFER_PLAN = Artifact("infer_plan", "plan.json", "json", about="shards and the pinned model")
PACS_REPORT = Artifact("pacs_report", "report.json", "json", about="results sent to the PACS")
PACS_INGEST_REPORT = Artifact("pacs_ingest", "report.json", "json", about="studies pulled")



# what each step of a manual chain reads when no input is given (and what the DAG passes it):
# the artifact of the step before. A step in the middle changes its successor's entry here.
INPUTS: dict[str, Artifact] = {
    "validate": INGEST_MANIFEST,
    "deidentify": CLEAN_MANIFEST,
    "split": DEID_MANIFEST,
    "train": SPLIT,  # the DAG's train task (fit), and train and cv run by hand
}


def input_of(step: str) -> Artifact:
    """The artifact ``step`` reads from the step before it (:data:`INPUTS`)."""
    return INPUTS[step]


def artifacts() -> tuple[Artifact, ...]:
    """Every artifact of the catalog (the module's ``Artifact`` constants, wherever defined)."""
    return tuple(v for v in dict(globals()).values() if isinstance(v, Artifact))


def outputs_of(step: str) -> tuple[str, ...]:
    """The run-folder paths (``<step>/<file>``) of every artifact ``step`` writes."""
    return tuple(a.path for a in artifacts() if a.step == step)


@dataclass(frozen=True)
class Command:
    """One ``fracture-ops`` subcommand: ``module.configure(parser)`` adds its arguments,
    ``module.run(args) -> dict`` runs it."""

    module: str
    help: str
    example: str
    configure: str = "configure_parser"
    run: str = "run_cli"


# the order is the order of ``fracture-ops --help``; the chain of a manual run shares one
# --run-id, so every step finds the one before it
COMMANDS: dict[str, Command] = {
    "synth": Command("fracture_ops.data.synthetic", "generate the synthetic radiograph data set",
                     "fracture-ops synth data/synthetic --patients 200 --dicom-fraction 0.25"),
    "ingest": Command("fracture_ops.data.sources",
                      "turn a data source layout into a canonical manifest",
                      "fracture-ops ingest exports/ --layout folder --run-id r1"),
    "validate": Command("fracture_ops.data.validation",
                        "validate a manifest and its images; quarantine bad rows",
                        "fracture-ops validate --run-id r1"),
    "deidentify": Command("fracture_ops.deid.deidentify",
                          "de-identify DICOM (PS3.15 Annex E) in a folder or manifest",
                          "fracture-ops deidentify --run-id r1 --workers 2"),
    "deid": Command("fracture_ops.deid.review", "de-identification sign-off: `deid review OUTPUT "
                    "--approve ID` releases files held for review (see gallery.html)",
                    "fracture-ops deid review data/artifacts/runs/r1/deidentify --approve IMAGE_ID"),
    "pacs-ingest": Command("fracture_ops.pacs.ingest", "pull new radiograph studies from a PACS "
                           "over DICOMweb, de-identified on arrival, into a dataset manifest",
                           "fracture-ops pacs-ingest --dataset ward7 --lookback-days 2"),
    "pacs-report": Command("fracture_ops.pacs.report", "send the champion's results (DICOM SR "
                           "and Grad-CAM secondary capture) back to the PACS under the original "
                           "studies", "fracture-ops pacs-report --dataset ward7 --max-studies 50"),
    "split": Command("fracture_ops.data.split", "patient-wise stratified train/val/test split",
                     "fracture-ops split --run-id r1 --seed 0"),
    "detect": Command("fracture_ops.detection.cli",
                      "YOLOv8 fracture localisation: train, val, predict",
                      "fracture-ops detect train --run-id r1 --epochs 50"),
    "train": Command("fracture_ops.training.train",
                     "train a classifier (timm backbone) on a split",
                     "fracture-ops train --run-id r1 --backbone tf_efficientnet_lite0 "
                     "--image-size 384 --epochs 20"),
    "fit": Command("fracture_ops.workflows.fit", "train by the path the data set's size calls "
                   "for: train/val when large, cross-validation then a refit when small (the "
                   "DAG's train task)", "fracture-ops fit --run-id r1 --cv-below-images 1000 "
                   "--epochs 20"),
    "cv": Command("fracture_ops.workflows.cv", "patient-grouped K-fold cross-validation of the "
                  "training recipe: pooled out-of-fold AUROC with intervals, recommended epochs",
                  "fracture-ops cv --run-id r1 --folds 5 --epochs 10"),
    "calibrate": Command("fracture_ops.evaluation.calibration",
                         "fit temperature/isotonic calibration on val",
                         "fracture-ops calibrate --run-id r1 --method temperature"),
    "tune-thresholds": Command("fracture_ops.evaluation.thresholds",
                               "tune per-class thresholds on val",
                               "fracture-ops tune-thresholds --run-id r1 --method min_sensitivity "
                               "--min-sensitivity 0.9"),
    "evaluate": Command("fracture_ops.evaluation.evaluate",
                        "metrics with patient bootstrap CIs, plots",
                        "fracture-ops evaluate --run-id r1 --n-bootstrap 2000"),
    "cam": Command("fracture_ops.explain.cam", "Grad-CAM report on the test split, or one --image",
                   "fracture-ops cam --run-id r1 --top-k 8"),
    "package": Command("fracture_ops.training.package",
                       "log the MLflow pyfunc model with calibration+thresholds",
                       "fracture-ops package --run-id r1"),
    "register": Command("fracture_ops.registry.register",
                        "register the packaged model as the new challenger",
                        "fracture-ops register --run-id r1"),
    "infer": Command("fracture_ops.inference.infer",
                     "score new studies with the champion model into the prediction log",
                     "fracture-ops infer incoming/2026-12-07 --date 2026-12-07"),
    "infer-plan": Command("fracture_ops.inference.shards", "sharded inference, 1/3: split "
                          "the day's new studies into shards scored by one task each, with a "
                          "pinned model version",
                          "fracture-ops infer-plan incoming/2026-12-07 --date 2026-12-07 --shards 4",
                          configure="configure_plan_parser", run="run_plan_cli"),
    "infer-shard": Command("fracture_ops.inference.shards", "sharded inference, 2/3: score "
                           "one shard of a plan into the run folder",
                           "fracture-ops infer-shard incoming/2026-12-07 --plan PLAN_URI --shard 0",
                           configure="configure_shard_parser", run="run_shard_cli"),
    "infer-merge": Command("fracture_ops.inference.shards", "sharded inference, 3/3: write "
                           "every shard's rows as the batch's one part of the date partition",
                           "fracture-ops infer-merge --plan PLAN_URI",
                           configure="configure_merge_parser", run="run_merge_cli"),
    "reference": Command("fracture_ops.inference.reference",
                         "score the champion's validation split into its drift reference table",
                         "fracture-ops reference --split val"),
    "drift": Command("fracture_ops.monitoring.drift_step",
                     "Evidently drift report of the latest prediction-log window vs the reference",
                     "fracture-ops drift --date 2026-12-07 --window-days 7"),
    "gate": Command("fracture_ops.registry.gate",
                    "challenger vs champion on the same test set (never promotes)",
                    "fracture-ops gate --run-id r1"),
    "registry": Command("fracture_ops.registry.promotion",
                        "promote an approved challenger, roll back, status",
                        "fracture-ops registry status   (or: promote, rollback, verify-audit, "
                        "guard-rules)"),
}
