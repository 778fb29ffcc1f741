"""Validation of the options that several steps share, each in this one place.

``collect`` and ``apply_stats`` (and so ``recalibrate`` and the CLI) take an estimator and a
prior strength; each is checked here, once per call, and a bad value raises
:class:`~onnx_tools.errors.OptionError` (a ``ValueError``) with the same message everywhere.
The set of estimators is :data:`bnref.ESTIMATORS`.
"""

from __future__ import annotations

import math

import bnref
from onnx_tools.errors import OptionError


def check_estimator(estimator: str) -> str:
    """Return ``estimator`` if it is one of :data:`bnref.ESTIMATORS`, else raise."""
    if estimator not in bnref.ESTIMATORS:
        raise OptionError(f"unknown estimator {estimator!r}; expected {', '.join(bnref.ESTIMATORS)}")
    return estimator


def check_prior_strength(prior_strength: float | None) -> float | None:
    """Return the prior strength ``N0`` (None: no prior) if it is a finite number >= 0."""
    if prior_strength is None:
        return None
    try:
        value = float(prior_strength)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise OptionError(f"prior strength must be a finite number >= 0, got {prior_strength!r}")
    return value
