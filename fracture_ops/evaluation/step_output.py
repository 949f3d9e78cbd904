"""How the evaluation steps (calibrate, tune_thresholds, evaluate) finish their step folder.

The inputs they share (the predictions table, the calibration and thresholds documents) are the
model's contract and live in :mod:`fracture_ops.model.outputs` and :mod:`fracture_ops.model.documents`.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from fracture_ops import storage
from fracture_ops.config import write_resolved

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"


def finish_step(cfg: BaseModel, out_dir: str, summary: dict, quarantined: list[dict]) -> dict:
    """Write quarantine.json and config.resolved.yaml, then ``_SUCCESS`` (last); return the summary.

    The quarantined rows go to their own file so that the fitted documents (calibration.json,
    thresholds.json) depend on the validation rows alone.
    """
    storage.write_json(storage.join(out_dir, QUARANTINE_FILE), {"rows": quarantined})
    write_resolved(cfg, out_dir)
    storage.mark_success(out_dir, summary)
    log.info("wrote %s", out_dir)
    return summary
