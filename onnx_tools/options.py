"""Validation of the options that several steps share, each in this one place.

``collect`` and ``apply_stats`` (and so ``recalibrate`` and the CLI) take an estimator and a
prior strength; each is checked here, once per call, and a bad value raises
:class:`~onnx_tools.errors.OptionError` (a ``ValueError``) with the same message everywhere.
The set of estimators is :data:`bnref.ESTIMATORS`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

import bnref
from onnx_tools.errors import OptionError, OptionTypeError

#: The ``provider`` values every function taking one accepts (see :mod:`onnx_tools.session`).
PROVIDERS = ("auto", "cuda", "cpu")


def check_estimator(estimator: str, bessel: bool | None = None) -> str:
    """Return ``estimator`` if it is one of :data:`bnref.ESTIMATORS` and fits ``bessel``.

    Bessel's correction belongs to the population estimator only: ``mean_of_variances``
    already averages unbiased batch variances, so ``bessel=True`` with it is refused rather
    than silently ignored.
    """
    if estimator not in bnref.ESTIMATORS:
        raise OptionError(f"unknown estimator {estimator!r}; expected {', '.join(bnref.ESTIMATORS)}")
    if bessel and estimator != "population":
        raise OptionError(
            f"bessel applies only to the population estimator; {estimator} already averages "
            "unbiased batch variances"
        )
    return estimator


def check_keywords(function: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse keyword arguments ``function`` does not take, naming it (and the closest match)."""
    allowed = list(allowed)
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionTypeError(f"{function}() got an unexpected keyword argument {name!r}{hint}")


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
