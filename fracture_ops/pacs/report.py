"""``fracture-ops pacs-report``: the champion's results back to the PACS, as DICOM.

For each study that ``pacs-ingest`` brought in and that has no result yet from this model
version, the model scores the study's de-identified radiographs (the images it was trained on
the like of) and, per radiograph, a Comprehensive SR (probability, decision at the tuned
threshold, model name and version, "research use only") and a Secondary Capture with the
Grad-CAM overlay are built over the ORIGINAL instance, retrieved from the PACS, and sent to it by
STOW-RS, so they file under the original patient and study in the radiologist's viewer.

Data flow and who sees what: this path works inside the hospital, on identified data, and keeps
it out of the dataset store. The original instance is retrieved into memory only; the links from
image ids to original UIDs and the ledger of what was sent (``sent/<study>.v<version>.json``:
the SR and SC UIDs; a study is recorded once all its radiographs were sent) live in the raw zone (``<raw_root>/pacs/<dataset>/``), beside the ingest
watermark. The dataset store gets only the run's PHI-free counts. The SR and SC carry the
patient's identity because they go back to the PACS that already holds it; nothing else does.
The overlay is drawn on the de-identified pixels (burned-in text blanked).

A study is sent once per model version (the ledger), and the objects' UIDs are derived from the
source instance and the version, so a rerun after a failure re-sends identical objects. An image
the model cannot read, or an instance the PACS no longer has, is skipped with its reason; the
PACS failing (down, slow, 401) follows the rules of :mod:`fracture_ops.pacs.dicomweb`.
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar

from pydantic import Field

from fracture_ops import catalog
from fracture_ops import storage
from fracture_ops.config import StepConfig
from fracture_ops.errors import BadInputError, ConfigError
from fracture_ops.pacs.dicomweb import PacsAuthError, PacsConnection, PacsRequestError, PacsUnavailable
from fracture_ops.pacs.ingest import raw_dir
from fracture_ops.registry.client import CHAMPION_URI

log = logging.getLogger(__name__)
STEP = "pacs_report"


class PacsReportConfig(StepConfig):
    """Config of the ``pacs-report`` step (YAML section ``pacs_report``)."""

    section: ClassVar[str] = "pacs_report"

    dataset: str = Field("pacs", pattern=r"^[A-Za-z0-9_-]+$",
                         description="the pacs-ingest dataset whose studies get results")
    model_uri: str = Field(CHAMPION_URI, description="registered model to report with "
                           "(resolved to one version for the whole run)")
    max_studies: int = Field(200, ge=1, le=100000, description="studies reported per run")
    cam: bool = Field(True, description="also send the Grad-CAM overlay as a Secondary Capture")
    retries: int = Field(5, ge=0, le=20)
    backoff_s: float = Field(2.0, ge=0.0, le=600.0)
    timeout_s: float = Field(60.0, gt=0, le=3600)


def _links(cfg: PacsReportConfig) -> dict[str, tuple[str, str, str]]:
    import pandas as pd

    folder = storage.join(raw_dir(cfg), "links")
    uris = storage.list_files(folder, (".parquet",)) if storage.exists(folder) else []
    if not uris:
        return {}
    table = pd.concat([storage.read_parquet(u) for u in uris], ignore_index=True)
    return {r.image_id: (r.study_uid, r.series_uid, r.sop_uid) for r in table.itertuples()}


def _ledger_uri(cfg: PacsReportConfig, study_key: str, model: str, version: str) -> str:
    return storage.join(raw_dir(cfg), "sent", f"{study_key}.{model}.v{version}.json")


class Reporter:
    """The loaded model version, its Grad-CAM and the PACS connection of one run."""

    def __init__(self, cfg: PacsReportConfig, conn: PacsConnection):
        import mlflow

        from fracture_ops import tracking
        from fracture_ops.model.pyfunc import load_classifier_dir
        from fracture_ops.registry.client import resolve_model

        mlflow.set_tracking_uri(tracking.tracking_uri())
        self.cfg, self.conn = cfg, conn
        try:
            self.ref = resolve_model(cfg.model_uri)
        except BadInputError as exc:  # no champion yet: a setting to change, not bad data
            raise ConfigError(
                f"pacs-report: no model at {cfg.model_uri} ({exc}). Promote an approved "
                "challenger (fracture-ops registry promote, or the fracture_promotion DAG), or "
                "name a version: --model-uri models:/fracture-classifier/<version>") from exc
        self.clf = load_classifier_dir(mlflow.artifacts.download_artifacts(artifact_uri=self.ref.uri))
        if self.clf.task != "binary":  # one probability, one threshold: what the SR states
            raise ConfigError(f"pacs-report: {self.ref.name} v{self.ref.version} is a {self.clf.task} "
                              "model; results go back to the PACS for binary fracture models only")
        self.class_name = self.clf.class_names[0]  # binary: the positive class
        self.explainer = None
        if cfg.cam:
            from fracture_ops.model.gradcam import GradCamExplainer, load_classifier

            self.explainer = GradCamExplainer(load_classifier(self.clf.model_path), self.class_name)
        self.client = conn.client()

    def results(self, rows) -> list[tuple[dict, object | None, str | None]]:
        """``(row, ImageResult or None, why not)`` for each manifest row of one study."""
        import pandas as pd

        from fracture_ops.pacs.dicom_results import ImageResult

        preds = self.clf.predict(None, pd.DataFrame({"image": list(rows["image_uri"])}))
        k = self.clf.class_names.index(self.class_name)
        out = []
        for row, (_, p) in zip(rows.to_dict("records"), preds.iterrows()):
            if p["error"] is not None:
                out.append((row, None, str(p["error"])))
                continue
            out.append((row, ImageResult(
                probability=float(p[f"prob_{self.class_name}"]),
                decision=bool(p[f"decision_{self.class_name}"]),
                threshold=float(self.clf.thresholds[k]), class_name=self.class_name,
                model_name=self.ref.name, model_version=self.ref.version), None))
        return out

    def overlay(self, image_uri: str):
        """The Grad-CAM overlay (RGB uint8) on the de-identified image."""
        from fracture_ops.data.images import read_image
        from fracture_ops.model.gradcam import overlay
        from fracture_ops.model.preprocess import read_model_input

        image, _ = read_image(image_uri)
        model_input = read_model_input(image_uri, self.clf.pre_size, jpeg_draft=self.clf.jpeg_draft)
        return overlay(image, self.explainer.explain(image, model_input).cam)

    def study(self, rows, link: dict) -> tuple[dict, list[dict]]:
        """Build and send one study's objects: ``(ledger entry, skipped images)``."""
        from fracture_ops.pacs.dicom_results import build_sc, build_sr

        objects, sent, skipped = [], {}, []
        for row, result, why in self.results(rows):
            if result is None:
                skipped.append({"image_id": row["image_id"], "reason": why})
                continue
            if row["image_id"] not in link:
                skipped.append({"image_id": row["image_id"], "reason": "no link to the original instance"})
                continue
            study, series, sop = link[row["image_id"]]
            try:
                source = self.conn.call("WADO-RS retrieve of the original instance",
                                        lambda s=study, r=series, i=sop: self.client.retrieve_instance(s, r, i))
            except (PacsAuthError, PacsUnavailable):
                raise
            except Exception as exc:  # noqa: BLE001 - the PACS no longer has it, or it is unreadable
                skipped.append({"image_id": row["image_id"], "reason": f"original: {type(exc).__name__}"})
                continue
            made = [build_sr(source, result)]
            if self.explainer is not None:
                made.append(build_sc(source, self.overlay(row["image_uri"]), result))
            objects += made
            sent[row["image_id"]] = {"sr": str(made[0].SOPInstanceUID),
                                     "sc": str(made[1].SOPInstanceUID) if len(made) > 1 else None,
                                     "probability": result.probability, "decision": result.decision}
        if objects:
            answer = self.conn.call("STOW-RS of the results", lambda: self.client.store_instances(objects))
            refused = list(getattr(answer, "FailedSOPSequence", None) or [])
            if refused:  # 202: the PACS kept some and refused others; nothing is recorded as sent
                raise PacsRequestError(f"pacs-report: the PACS refused {len(refused)} of {len(objects)} "
                                       "result objects")
        return sent, skipped

    def close(self) -> None:
        if self.explainer is not None:
            self.explainer.close()


def pacs_report_step(cfg: PacsReportConfig, conn: PacsConnection | None = None) -> dict:
    """Send the results of the studies not yet reported by this model version.

    Raises:
        BadInputError: the dataset has no manifest yet (run ``pacs-ingest`` first), or the
            model is not registered.
        ConfigError: no PACS URL, or the PACS refused the account.
        PacsUnavailable: the PACS kept failing (the ledger keeps what was sent).
    """
    conn = conn or PacsConnection.from_env(timeout_s=cfg.timeout_s, retries=cfg.retries,
                                           backoff_s=cfg.backoff_s)
    manifest_uri = storage.join(cfg.artifact_root, "pacs", cfg.dataset, "manifest.parquet")
    if not storage.exists(manifest_uri):
        raise BadInputError(f"pacs-report: dataset {cfg.dataset!r} has no manifest yet (run pacs-ingest)")
    manifest = storage.read_parquet(manifest_uri)
    reporter = Reporter(cfg, conn)
    links = _links(cfg)
    version = reporter.ref.version
    studies = sorted(set(manifest["study_id"].astype(str)))
    name = reporter.ref.name
    pending = [s for s in studies if not storage.exists(_ledger_uri(cfg, s, name, version))]
    todo = pending[:cfg.max_studies]
    from fracture_ops.cli_common import progress

    objects, skipped, failed = 0, [], []
    try:
        for study in progress(todo, "pacs-report studies"):
            try:
                sent, skip = reporter.study(manifest[manifest["study_id"].astype(str) == study], links)
            except (PacsAuthError, PacsUnavailable):
                raise
            except Exception as exc:  # noqa: BLE001 - this study only; tried again next run
                failed.append({"study_id": study, "reason": type(exc).__name__})
                log.warning("pacs-report: study %s failed (%s); tried again next run", study,
                            type(exc).__name__)
                continue
            skipped += skip
            objects += sum(1 + (v["sc"] is not None) for v in sent.values())
            if skip:  # an image not reported yet (unreadable now, or gone): the study again next run
                continue
            storage.write_json(_ledger_uri(cfg, study, name, version),
                               {"model": name, "version": version, "images": sent})
    finally:
        reporter.close()
    summary = {"model_name": reporter.ref.name, "model_version": version, "studies": len(studies),
               "studies_reported": len(todo), "studies_already_reported": len(studies) - len(pending),
               "studies_left": len(pending) - len(todo), "objects_sent": objects,
               "images_skipped": len(skipped), "studies_failed": len(failed)}
    out_dir = cfg.output_dir(STEP)
    # PHI-free: counts and pseudonymous image ids with reasons only
    storage.write_json(storage.join(out_dir, catalog.PACS_REPORT.file), {**summary, "skipped": skipped,
                                                              "failed": failed})
    storage.mark_success(out_dir, summary)
    log.info("pacs-report: %d objects sent for %d studies (model %s v%s), %d images skipped",
             objects, len(todo), reporter.ref.name, version, len(skipped))
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """CLI: ``fracture-ops pacs-report``."""
    from fracture_ops.cli_common import add_common_args, add_field_flags

    add_field_flags(parser, PacsReportConfig, "dataset", "model_uri", "max_studies", "cam", "retries",
                    "backoff_s", "timeout_s")
    parser.epilog = ("Sends a DICOM SR and a Grad-CAM Secondary Capture per radiograph to the PACS "
                     "($FRACTURE_OPS_PACS_URL / _USERNAME / _PASSWORD) under the original study. "
                     + (parser.epilog or ""))
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    from fracture_ops.cli_common import config_from_args

    return pacs_report_step(config_from_args(PacsReportConfig, args))
