"""Synthetic predictions tables for tests and demos (no model needed).

Patients have one to ``max_images`` images that share the patient's labels and a patient-level
random effect on the score, so images of one patient are correlated as in real radiograph sets.
The logits are the Bayes log-odds of that score model (calibrated at image level);
``overconfidence`` multiplies them (> 1 gives an over-confident model to calibrate).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fracture_ops.model.outputs import label_columns, logit_columns

REGIONS = ("hand", "wrist", "leg")


def synthetic_predictions(
    task: str = "binary",
    class_names: list[str] | None = None,
    n_patients: int = 200,
    max_images: int = 4,
    separation: float = 1.5,
    patient_effect: float = 0.7,
    overconfidence: float = 1.0,
    prevalence: float = 0.4,
    seed: int = 0,
) -> tuple[pd.DataFrame, str, list[str]]:
    """A predictions table following the contract of :mod:`.predictions`.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: defaults to ``["fracture"]`` (binary) or three names.
        n_patients: number of patients; splits are 60/20/20 by patient.
        max_images: images per patient are drawn from ``1..max_images``.
        separation: logit shift between positives and negatives (larger: better AUROC).
        patient_effect: standard deviation of the per-patient logit offset.
        overconfidence: factor applied to the calibrated logits.
        prevalence: positive rate per class (binary/multilabel).
        seed: random seed.

    Returns:
        ``(df, task, class_names)``, with a ``body_region`` column.
    """
    rng = np.random.default_rng(seed)
    if class_names is None:
        class_names = ["fracture"] if task == "binary" else ["elbow", "hand", "shoulder"]
    n_classes = len(class_names)
    if task == "multiclass":
        patient_y = np.eye(n_classes, dtype=np.int64)[rng.integers(0, n_classes, n_patients)]
    else:
        patient_y = (rng.random((n_patients, n_classes)) < prevalence).astype(np.int64)
    counts = rng.integers(1, max_images + 1, n_patients)
    patient = np.repeat(np.arange(n_patients), counts)
    y = patient_y[patient]
    offset = rng.normal(0.0, patient_effect, (n_patients, n_classes))[patient]
    x = separation * (y - 0.5) * 2 + offset + rng.normal(0.0, 1.0, y.shape)
    # The Bayes log-odds of x ~ N(+-separation, var): these logits are calibrated before inflation.
    var = 1.0 + patient_effect**2
    z = 2.0 * separation * x / var
    if task != "multiclass":
        z = z + np.log(prevalence / (1.0 - prevalence))
    split = rng.choice(["train", "val", "test"], n_patients, p=[0.6, 0.2, 0.2])[patient]
    df = pd.DataFrame(
        {
            "image_id": [f"img{i:06d}" for i in range(len(patient))],
            "patient_id": [f"pat{p:05d}" for p in patient],
            "split": split,
            "body_region": rng.choice(REGIONS, n_patients)[patient],
        }
    )
    for k, (ycol, zcol) in enumerate(zip(label_columns(class_names), logit_columns(class_names))):
        df[ycol] = y[:, k]
        df[zcol] = z[:, k] * overconfidence
    return df, task, list(class_names)
