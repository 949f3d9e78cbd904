"""Post-hoc probability calibration: temperature scaling and isotonic regression.

Both are fitted on the validation split only and stored as plain JSON (no pickles), so the MLflow
pyfunc model can apply them with numpy alone.

- Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", ICML): divide
  logits by ``T > 0`` chosen to minimise the validation negative log-likelihood. ``T`` is searched
  as ``log T`` in ``[-5, 5]`` with ``scipy.optimize.minimize_scalar`` (bounded), so it stays
  positive.
  Multiclass: one shared ``T`` for the softmax (as Guo et al.). Binary/multilabel: each class is an
  independent sigmoid, so by default each class gets its own ``T`` (``shared_temperature=True``
  fits one ``T`` for all classes on the summed binary cross-entropy).
- Isotonic regression (Zadrozny & Elkan 2002): scikit-learn ``IsotonicRegression`` per class on
  the uncalibrated probability (sigmoid per class; softmax one-vs-rest for multiclass), with
  ``out_of_bounds="clip"``. Its fitted step function is stored as ``X_thresholds_`` and
  ``y_thresholds_`` and applied with ``np.interp``, which clips outside the range and interpolates
  linearly inside, exactly as scikit-learn's ``predict``. Multiclass rows are renormalised to sum
  to one (a row whose calibrated values are all zero falls back to the uncalibrated softmax).
- ``none``: plain sigmoid/softmax.
"""

from __future__ import annotations

import logging

from typing import Literal

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from fracture_ops.errors import BadInputError
from fracture_ops.model.outputs import TASKS, probabilities

Method = Literal["none", "temperature", "isotonic"]
METHODS = ("none", "temperature", "isotonic")
_LOG_T_BOUNDS = (-5.0, 5.0)


log = logging.getLogger(__name__)

def nll(y: np.ndarray, logit_values: np.ndarray, task: str, temperature=1.0) -> float:
    """Mean negative log-likelihood of labels under ``logits / T``.

    Args:
        y: ``(n, C)`` 0/1 labels.
        logit_values: ``(n, C)`` logits.
        task: multiclass uses softmax cross-entropy; binary/multilabel the mean binary
            cross-entropy over classes.
        temperature: a scalar or a ``(C,)`` vector (sigmoid tasks).

    Returns:
        The mean NLL per image.
    """
    z = np.asarray(logit_values, dtype=np.float64) / np.asarray(temperature, dtype=np.float64)
    if task == "multiclass":
        return float(-np.mean(np.sum(y * log_softmax(z, axis=1), axis=1)))
    # log(1 + e^z) - y z, computed stably.
    return float(np.mean(np.sum(np.logaddexp(0.0, z) - y * z, axis=1)))


def fit_temperature(y: np.ndarray, logit_values: np.ndarray, task: str) -> float:
    """The temperature that minimises the NLL of ``logits / T`` (searched on ``log T``)."""
    res = minimize_scalar(
        lambda s: nll(y, logit_values, task, np.exp(s)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(res.x))


class Calibrator:
    """Map logits to calibrated probabilities; fitted on validation data, stored as JSON.

    Args:
        method: ``none``, ``temperature`` or ``isotonic``.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        shared_temperature: sigmoid tasks only: one temperature for all classes.
    """

    def __init__(self, method: Method, task: str, shared_temperature: bool = False):
        if method not in METHODS:
            raise BadInputError(f"calibration method must be one of {METHODS}, got {method!r}")
        if task not in TASKS:
            raise BadInputError(f"task must be one of {TASKS}, got {task!r}")
        self.method, self.task, self.shared_temperature = method, task, shared_temperature
        self.temperature: list[float] | None = None
        self.isotonic: list[dict[str, list[float]]] | None = None
        self.fitted = method == "none"
        self.fallback_classes: list[int] = []

    def fit(self, logit_values: np.ndarray, y: np.ndarray) -> Calibrator:
        """Fit on validation logits ``(n, C)`` and labels ``(n, C)``; returns ``self``.

        Raises:
            BadInputError: no rows, or shapes that disagree.
        """
        z, y = np.asarray(logit_values, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if z.ndim != 2 or z.shape != y.shape or len(z) == 0:
            raise BadInputError(
                f"calibration needs matching non-empty (n, C) arrays, got {z.shape} and {y.shape}"
            )
        # a class whose validation labels are all 0 or all 1 cannot be calibrated: fitting would
        # collapse its probabilities to a constant; keep it uncalibrated and say so
        self.fallback_classes = [k for k in range(y.shape[1]) if y[:, k].min() == y[:, k].max()]
        if self.fallback_classes:
            log.warning("calibration: class column(s) %s have a single label in validation; "
                        "left uncalibrated", self.fallback_classes)
        if self.method == "temperature":
            self.temperature = self._fit_temperatures(z, y)
        elif self.method == "isotonic":
            self.isotonic = self._fit_isotonic(z, y)
        self.fitted = True
        return self

    def _fit_temperatures(self, z: np.ndarray, y: np.ndarray) -> list[float]:
        if self.task == "multiclass" or self.shared_temperature:
            if len(self.fallback_classes) == z.shape[1]:
                return [1.0] * (1 if self.task == "multiclass" else z.shape[1])
            return [fit_temperature(y, z, self.task)] * (
                1 if self.task == "multiclass" else z.shape[1]
            )
        return [1.0 if k in self.fallback_classes else fit_temperature(y[:, [k]], z[:, [k]], self.task)
                for k in range(z.shape[1])]

    def _fit_isotonic(self, z: np.ndarray, y: np.ndarray) -> list[dict[str, list[float]]]:
        from sklearn.isotonic import IsotonicRegression

        p = probabilities(z, self.task)
        steps = []
        for k in range(p.shape[1]):
            if k in self.fallback_classes:  # identity map
                steps.append({"x": [0.0, 1.0], "y": [0.0, 1.0]})
                continue
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
                p[:, k], y[:, k]
            )
            steps.append({"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()})
        return steps

    def transform(self, logit_values: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``(n, C)`` of logits ``(n, C)``.

        Raises:
            BadInputError: the calibrator was not fitted.
        """
        if not self.fitted:
            raise BadInputError("calibrator is not fitted")
        z = np.asarray(logit_values, dtype=np.float64)
        if self.method == "temperature":
            scale = (
                self.temperature[0] if self.task == "multiclass" else np.asarray(self.temperature)
            )
            return probabilities(z / scale, self.task)
        p = probabilities(z, self.task)
        if self.method == "none":
            return p
        out = np.column_stack(
            [np.interp(p[:, k], s["x"], s["y"]) for k, s in enumerate(self.isotonic)]
        )
        if self.task == "multiclass":
            total = out.sum(axis=1, keepdims=True)
            out = np.where(total > 0, out / np.where(total > 0, total, 1.0), p)
        return out

    def to_dict(self) -> dict:
        """A JSON-serialisable description (method, task and fitted parameters)."""
        return {
            "method": self.method,
            "task": self.task,
            "shared_temperature": self.shared_temperature,
            "temperature": self.temperature,
            "isotonic": self.isotonic,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibrator:
        """Rebuild a fitted calibrator from :meth:`to_dict` output.

        Raises:
            BadInputError: the description lacks the fitted parameters of its method.
        """
        cal = cls(
            data.get("method", "none"),
            data.get("task", ""),
            bool(data.get("shared_temperature", False)),
        )
        cal.temperature, cal.isotonic = data.get("temperature"), data.get("isotonic")
        needed = {"temperature": cal.temperature, "isotonic": cal.isotonic}.get(cal.method, True)
        if not needed:
            raise BadInputError(f"calibration of method {cal.method!r} lacks its parameters")
        cal.fitted = True
        return cal
