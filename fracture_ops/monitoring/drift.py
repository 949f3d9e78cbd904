"""Drift of a prediction-log window against the model's reference table, with Evidently.

Three questions, each answered with Evidently 0.7 (``Report`` over two ``Dataset`` objects):

1. Data drift: do the image features (``feat_*`` numbers; view, laterality, body region and
   source format) of the window look like the reference's? One ``ValueDrift`` per column via
   ``DataDriftPreset`` plus ``DriftedColumnsCount`` for the share of drifted columns.
2. Prediction drift: do the calibrated probabilities (``prob_<c>``) and decisions
   (``decision_<c>``: the decision rate) move? One ``ValueDrift`` per column.
3. Quality: where ground truth has arrived (window rows with a label), accuracy, precision,
   recall, specificity, F1 and AUROC (only when both classes are present) against the
   reference's, plus the drift of the label itself (prior shift).

Evidently picks the statistical test per column when none is configured (its documented
defaults, ``evidently.legacy.calculations.stattests.registry._get_default_stattest``: K-S for
numbers and chi-square/Z-test for categories up to 1000 reference rows, Wasserstein/Jensen-Shannon
distances above); a column drifts when its p-value is below, or its distance at or above, the
threshold. Whether a column drifted is read from Evidently's own per-column test, so the report
and the summary cannot disagree.

Nothing here touches disk: :mod:`fracture_ops.monitoring.drift_step` reads and writes.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fracture_ops.errors import BadInputError, ConfigError, FractureOpsError

from fracture_ops.model.prediction_log import (
    CATEGORICAL_FEATURES,
    DECISION_PREFIX,
    FEATURE_PREFIX,
    NUMERIC_FEATURES,
    PROB_PREFIX,
)

MISSING = "(missing)"  # a null category is a category: a burst of unknown views is drift too
TARGET = "target"  # 1 when the row's label is the evaluated class (one-vs-rest)


class DriftSettings(BaseModel):
    """How drift is measured and when it is flagged (the step's config extends this).

    ``num_stattest``/``cat_stattest``: an Evidently test name (``ks``, ``wasserstein``, ``psi``,
    ``chisquare``, ``jensenshannon``, ...) for number/category columns; None = Evidently's default
    per column. ``stattest_threshold``: the p-value (tests) or distance (distances) threshold of
    every column; None = the test's default (0.05 for p-values, 0.1 for distances).
    ``critical_features``: column names or glob patterns (``prob_*``) whose drift alone flags drift.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    drift_share_threshold: float = Field(0.3, gt=0, le=1, description="flag drift when this share "
                                         "of the feature columns drifts")
    num_stattest: str | None = None
    cat_stattest: str | None = None
    stattest_threshold: float | None = Field(None, gt=0)
    per_column_stattest: dict[str, str] = {}
    per_column_threshold: dict[str, float] = {}
    critical_features: list[str] = ["prob_*"]
    positive_class: str | None = None  # class of the quality section; default the first prob_ column


@dataclass
class DriftOutcome:
    """What one window's drift analysis found (see :func:`analyse_drift`)."""

    features: dict[str, dict]  # column -> {type, method, threshold, score, drifted}
    predictions: dict[str, dict]  # prob_/decision_ column -> the same
    drift_share: float
    n_drifted: int
    decision_rate: dict[str, dict]  # class -> {"window", "reference"}
    performance: dict[str, Any]
    drift_detected: bool = False
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    snapshots: list = field(default_factory=list)  # Evidently snapshots, for the HTML report


def feature_columns(reference: pd.DataFrame, window: pd.DataFrame) -> tuple[list, list, list]:
    """The feature columns both tables hold with some values.

    Returns:
        ``(numeric, categorical, notes)``: ``feat_*`` columns (the contract's first, then any
        other ``feat_*``) and the categorical columns, plus a note per column left out.
    """
    notes = []
    extra = sorted(c for c in reference.columns if c.startswith(FEATURE_PREFIX) and c not in NUMERIC_FEATURES)
    numeric, categorical = [], []
    for col in [*NUMERIC_FEATURES, *extra, *CATEGORICAL_FEATURES]:
        if col not in reference.columns or col not in window.columns:
            notes.append(f"{col}: not in both the window and the reference; left out")
        elif col.startswith(FEATURE_PREFIX) and (reference[col].isna().all() or window[col].isna().all()):
            notes.append(f"{col}: no values in the window or the reference; left out")
        else:
            (numeric if col.startswith(FEATURE_PREFIX) else categorical).append(col)
    return numeric, categorical, notes


def prediction_columns(reference: pd.DataFrame, window: pd.DataFrame) -> tuple[list, list]:
    """``prob_<c>`` and ``decision_<c>`` columns present in both tables."""
    both = [c for c in reference.columns if c in set(window.columns)]
    return ([c for c in both if c.startswith(PROB_PREFIX)], [c for c in both if c.startswith(DECISION_PREFIX)])


def _prepared(df: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """Only the analysed columns; numbers as float, categories as strings with nulls named."""
    out = pd.DataFrame(index=range(len(df)))
    for col in numeric:
        out[col] = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
    for col in categorical:
        out[col] = df[col].astype("string").fillna(MISSING).replace("", MISSING).astype(str).to_numpy()
    return out


def check_stattests(settings: DriftSettings) -> None:
    """Fail early, naming the option, when a configured test name is unknown to Evidently.

    Raises:
        ConfigError: an unknown test, or one that does not apply to that kind of column.
    """
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    wanted = [("num_stattest", settings.num_stattest, ColumnType.Numerical),
              ("cat_stattest", settings.cat_stattest, ColumnType.Categorical)]
    wanted += [(f"per_column_stattest.{c}", m, None) for c, m in settings.per_column_stattest.items()]
    for option, name, kind in wanted:
        if name is None:
            continue
        kinds = [kind] if kind else [ColumnType.Numerical, ColumnType.Categorical]
        errors = []
        for k in kinds:
            try:
                get_registered_stattest(name, k)
            except Exception as exc:  # StatTestNotFoundError / StatTestInvalidFeatureTypeError
                errors.append(exc)
        if len(errors) == len(kinds):
            raise ConfigError(f"drift: {option}={name!r} is not usable: {errors[0]}")


def _column_test(settings: DriftSettings, col: str, categorical: bool) -> tuple[str | None, float | None]:
    method = settings.per_column_stattest.get(col) or (
        settings.cat_stattest if categorical else settings.num_stattest)
    return method, settings.per_column_threshold.get(col, settings.stattest_threshold)


def _run_report(metrics: list, current: pd.DataFrame, reference: pd.DataFrame, numeric: list,
                categorical: list, include_tests: bool, classification=None):
    from evidently import DataDefinition, Dataset, Report

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical,
                                classification=classification)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # constant columns (bit depth) make Evidently's correlation and chi-square divide by zero;
        # the drift tests handle them, the warnings are noise in the step's log
        warnings.simplefilter("ignore")
        return Report(metrics, include_tests=include_tests).run(
            current_data=Dataset.from_pandas(current, data_definition=definition),
            reference_data=Dataset.from_pandas(reference, data_definition=definition))


def _display_name(method: str, kind: str) -> str:
    """Evidently's display name of a test ("ks" -> "K-S p_value"); auto-picked ones have it."""
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    try:
        col_type = ColumnType.Categorical if kind == "cat" else ColumnType.Numerical
        return get_registered_stattest(method, col_type).display_name
    except Exception:  # already a display name
        return method


def column_results(snapshot_dict: dict, types: dict[str, str]) -> dict[str, dict]:
    """Per-column drift from a snapshot's ``dict()``: score, method, threshold and the verdict.

    The verdict is Evidently's own ``ValueDrift`` test (``FAIL`` = drift detected).
    """
    failed = {t["metric_config"]["metric_id"]: t["status"] == "FAIL"
              for t in snapshot_dict.get("tests", []) if t.get("id") == "drift"}
    out = {}
    for m in snapshot_dict["metrics"]:
        cfg = m.get("config", {})
        if not cfg.get("type", "").endswith(":ValueDrift") or cfg.get("column") not in types:
            continue
        method = _display_name(str(cfg.get("method")), types[cfg["column"]])
        out[cfg["column"]] = {
            "type": types[cfg["column"]], "method": method, "threshold": cfg.get("threshold"),
            "score": float(m["value"]), "drifted": bool(failed.get(m["id"], False)),
            "score_kind": "p_value" if "p_value" in method else "distance"}
    return out


def drifted_columns_count(snapshot_dict: dict) -> tuple[int, float]:
    """Evidently's ``DriftedColumnsCount`` (the feature preset's count and share of drifted columns).

    Raises:
        FractureOpsError: the snapshot holds no such metric (an Evidently change).
    """
    for m in snapshot_dict["metrics"]:
        if m.get("config", {}).get("type", "").endswith(":DriftedColumnsCount"):
            return int(m["value"]["count"]), float(m["value"]["share"])
    raise FractureOpsError("drift: Evidently returned no DriftedColumnsCount")


def _feature_preset(numeric: list[str], categorical: list[str], settings: DriftSettings):
    from evidently.presets import DataDriftPreset

    return DataDriftPreset(
        columns=numeric + categorical, drift_share=settings.drift_share_threshold,
        num_method=settings.num_stattest, cat_method=settings.cat_stattest,
        threshold=settings.stattest_threshold,
        per_column_method=dict(settings.per_column_stattest) or None,
        per_column_threshold=dict(settings.per_column_threshold) or None)


def _prediction_metrics(prob_cols, decision_cols, settings) -> list:
    from evidently.metrics import ValueDrift

    out = []
    for col in prob_cols + decision_cols:
        method, threshold = _column_test(settings, col, col in decision_cols)
        out.append(ValueDrift(column=col, method=method, threshold=threshold))
    return out


def decide(features: dict, predictions: dict, share: float, settings: DriftSettings) -> tuple:
    """Flag drift: the share of drifted feature columns reaches the threshold, or a critical
    column (name or glob pattern over features and predictions) drifted.

    Returns:
        ``(drift_detected, reasons)``.
    """
    reasons = []
    if share >= settings.drift_share_threshold:
        reasons.append(f"share of drifted feature columns {share:.2f} >= "
                       f"{settings.drift_share_threshold:.2f}")
    for col, res in {**features, **predictions}.items():
        if res["drifted"] and any(fnmatch.fnmatchcase(col, p) for p in settings.critical_features):
            reasons.append(f"critical column {col} drifted ({res['method']} {res['score']:.3g}, "
                           f"threshold {res['threshold']})")
    return bool(reasons), reasons


def analyse_drift(reference: pd.DataFrame, window: pd.DataFrame,
                  settings: DriftSettings) -> DriftOutcome:
    """Data, prediction and (where labels exist) quality drift of ``window`` vs ``reference``.

    Args:
        reference: the model version's reference table (the contract's columns, labels filled).
        window: the prediction-log rows of the window, already limited to that model version.
        settings: tests, thresholds and the flagging rule.

    Returns:
        A :class:`DriftOutcome` with the per-column results, the flag and the Evidently snapshots.

    Raises:
        BadInputError: an empty table, or no feature column the two tables share.
        ConfigError: an unknown statistical test.
    """
    if reference.empty or window.empty:
        raise BadInputError("drift: the reference and the window both need rows")
    check_stattests(settings)
    numeric, categorical, notes = feature_columns(reference, window)
    if not numeric and not categorical:
        raise BadInputError("drift: the window and the reference share no feature column")
    prob_cols, decision_cols = prediction_columns(reference, window)
    num_all, cat_all = numeric + prob_cols, categorical + decision_cols
    types = {**{c: "num" for c in num_all}, **{c: "cat" for c in cat_all}}
    metrics = [_feature_preset(numeric, categorical, settings),
               *_prediction_metrics(prob_cols, decision_cols, settings)]
    snap = _run_report(metrics, _prepared(window, num_all, cat_all),
                       _prepared(reference, num_all, cat_all), num_all, cat_all, include_tests=True)
    report = snap.dict()
    results = column_results(report, types)
    features = {c: results[c] for c in numeric + categorical}
    predictions = {c: results[c] for c in prob_cols + decision_cols}
    n_drifted, share = drifted_columns_count(report)
    flag, reasons = decide(features, predictions, share, settings)
    rates = {c[len(DECISION_PREFIX):]: {
        "window": float(pd.to_numeric(window[c], errors="coerce").mean()),
        "reference": float(pd.to_numeric(reference[c], errors="coerce").mean())}
        for c in decision_cols}
    performance, perf_snap = quality_section(reference, window, prob_cols, settings)
    return DriftOutcome(features=features, predictions=predictions, drift_share=share,
                        n_drifted=n_drifted, decision_rate=rates, performance=performance,
                        drift_detected=flag, reasons=reasons, notes=notes,
                        snapshots=[s for s in (snap, perf_snap) if s is not None])


def has_label(df: pd.DataFrame) -> pd.Series:
    """Rows whose ground truth has arrived (a non-empty ``label``)."""
    if "label" not in df.columns:
        return pd.Series(False, index=df.index)
    text = df["label"].astype("string")
    return text.notna() & (text.str.strip() != "")


def classification_quality(target: np.ndarray, decision: np.ndarray, prob: np.ndarray) -> dict:
    """Threshold and ranking metrics of one class (scikit-learn); AUROC None with one class."""
    from sklearn import metrics as skm

    target, decision = np.asarray(target, int), np.asarray(decision, int)
    both = len(np.unique(target)) == 2
    return {
        "n": int(len(target)), "positives": int(target.sum()),
        "accuracy": float(skm.accuracy_score(target, decision)),
        "precision": float(skm.precision_score(target, decision, zero_division=0)),
        "recall": float(skm.recall_score(target, decision, zero_division=0)),
        "specificity": float(skm.recall_score(target, decision, pos_label=0, zero_division=0)),
        "f1": float(skm.f1_score(target, decision, zero_division=0)),
        "auroc": float(skm.roc_auc_score(target, prob)) if both else None,
    }


def _labelled(df: pd.DataFrame, cls: str) -> pd.DataFrame:
    rows = df[has_label(df)]
    return pd.DataFrame({
        TARGET: (rows["label"].astype(str).str.strip() == cls).astype(int).to_numpy(),
        f"{DECISION_PREFIX}{cls}": pd.to_numeric(rows[f"{DECISION_PREFIX}{cls}"], errors="coerce").fillna(0)
        .astype(int).to_numpy(),
        f"{PROB_PREFIX}{cls}": pd.to_numeric(rows[f"{PROB_PREFIX}{cls}"], errors="coerce").to_numpy(dtype=float)})


def quality_section(reference: pd.DataFrame, window: pd.DataFrame, prob_cols: list[str],
                    settings: DriftSettings) -> tuple[dict, Any]:
    """Model quality on the window's labelled rows vs the reference (one-vs-rest for one class).

    Returns:
        ``(section, snapshot)``: ``section["status"]`` is ``"ok"`` or ``"skipped"`` with a
        ``note``; the Evidently snapshot (classification metrics and label drift) or None.
    """
    classes = [c[len(PROB_PREFIX):] for c in prob_cols]
    cls = settings.positive_class or (classes[0] if classes else None)
    n_labelled = int(has_label(window).sum())
    skip = {"status": "skipped", "class": cls, "window_labelled_rows": n_labelled}
    if cls is None or cls not in classes or f"{DECISION_PREFIX}{cls}" not in window.columns:
        return {**skip, "note": f"no prob_/decision_ columns for class {cls!r}"}, None
    if n_labelled == 0:
        return {**skip, "note": "no labels have arrived for this window yet"}, None
    ref, cur = _labelled(reference, cls), _labelled(window, cls)
    if ref.empty:
        return {**skip, "note": "the reference table holds no labels"}, None
    win_q = classification_quality(cur[TARGET], cur[f"{DECISION_PREFIX}{cls}"], cur[f"{PROB_PREFIX}{cls}"])
    ref_q = classification_quality(ref[TARGET], ref[f"{DECISION_PREFIX}{cls}"], ref[f"{PROB_PREFIX}{cls}"])
    delta = {k: (win_q[k] - ref_q[k]) for k in ("accuracy", "precision", "recall", "specificity",
                                                  "f1", "auroc")
             if win_q[k] is not None and ref_q[k] is not None}
    section = {"status": "ok", "class": cls, "window_labelled_rows": n_labelled,
               "window": win_q, "reference": ref_q, "delta": delta}
    if win_q["auroc"] is None:
        section["note"] = "AUROC left out: the labelled window rows hold one class only"
    section["label_drift"], snap = _quality_report(ref, cur, cls, settings,
                                                   with_auroc=win_q["auroc"] is not None
                                                   and ref_q["auroc"] is not None)
    return section, snap


def _quality_report(ref: pd.DataFrame, cur: pd.DataFrame, cls: str, settings: DriftSettings,
                    with_auroc: bool) -> tuple[dict, Any]:
    """Evidently's classification panels (deployed decisions, not a 0.5 cut) and label drift."""
    from evidently import BinaryClassification
    from evidently.metrics import Accuracy, F1Score, Precision, Recall, RocAuc, ValueDrift

    decision, prob = f"decision_{cls}", f"prob_{cls}"
    # two definitions: decision metrics must use the model's tuned decisions; Evidently would
    # threshold probabilities at 0.5 if handed the probabilities
    tasks = [BinaryClassification(name="decision", target=TARGET, prediction_labels=decision,
                                  pos_label=1),
             BinaryClassification(name="proba", target=TARGET, prediction_probas=prob, pos_label=1)]
    method, threshold = _column_test(settings, TARGET, True)
    metrics = [Accuracy(classification_name="decision"), Precision(classification_name="decision"),
               Recall(classification_name="decision"),
               F1Score(classification_name="decision", conf_matrix=False),
               *([RocAuc(classification_name="proba")] if with_auroc else []),
               ValueDrift(column=TARGET, method=method, threshold=threshold)]
    snap = _run_report(metrics, cur, ref, [prob], [TARGET, decision], include_tests=True,
                       classification=tasks)
    label = column_results(snap.dict(), {TARGET: "cat"})[TARGET]
    label["positive_share"] = {"window": float(cur[TARGET].mean()), "reference": float(ref[TARGET].mean())}
    return label, snap
