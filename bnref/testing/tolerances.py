"""Tolerances: how far from bnref an implementation may be, per quantity and dtype.

An implementation that computes in the working dtype makes errors of a few ulp of that dtype
relative to the *natural scale* of each quantity, not of the quantity itself (y near zero
has no meaningful relative error). ``assert_within`` accepts, elementwise,
``|got - want| <= k * eps_dtype * scale`` (plus the smallest normal float64, so that a zero
scale allows exact zeros), with ``k`` by dtype (``Tolerance.for_dtype``):

=========  ======  ===============  ==================================================
dtype      k       k * eps_dtype    why
=========  ======  ===============  ==================================================
float16    8       7.8e-3           frameworks commonly compute float16 BN in float32,
                                    so errors are a few float16 roundings; 64 ulp
                                    (6 %) would let real mistakes through
float32    64      7.6e-6           reductions (mean, variance, the backward's sums) in
                                    float32 add error growing with the count
float64    1e4     2.2e-12          loose in ulps, still far below any convention
                                    mistake (eps placement, Bessel, momentum)
bfloat16   8       6.3e-2           as float16: frameworks compute bfloat16 BN in
                                    float32 and round a few times to 8 significant
                                    bits (measured: docs/conformance.md). At this
                                    bound a Bessel factor (1/(n-1)) or eps placement
                                    is invisible: conventions are checked in float32
other      64                       any other float dtype
=========  ======  ===============  ==================================================

Natural scales (``check_case``), with x_hat and inv_std = 1 / sqrt(var + eps) from bnref's
float64 statistics (the batch's in training mode, the running ones in inference mode):

* y: ``|gamma| * (1 + |x_hat|) + |beta|`` (``output_scale``);
* dx: ``|gamma| * inv_std * (|dy| + rms(dy) * (1 + |x_hat|))``, rms per channel;
* dscale, dbias: ``sum |dy * x_hat| + 1`` and ``sum |dy| + 1`` per channel;
* running mean: ``|new| + |old| + std`` (the batch's std); running variance: ``|new| + |old|``.

The numbers each framework reaches are in docs/conformance.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnref._validation import channel_shape
from bnref.testing.ranges import float_info

#: ``k`` per dtype name (module doc); any other float dtype gets 64.
_DEFAULT_K = {"float16": 8.0, "bfloat16": 8.0, "float32": 64.0, "float64": 1e4}


@dataclass(frozen=True)
class Tolerance:
    """``|got - want| <= k * eps_dtype * natural_scale`` elementwise, per quantity."""

    k: float
    eps: float

    @classmethod
    def for_dtype(cls, dtype: np.dtype, k: float | None = None) -> Tolerance:
        """Default ``k`` (module doc): 8 for float16 and bfloat16, 64 for float32, 1e4 for float64."""
        dtype = np.dtype(dtype)
        default_k = _DEFAULT_K.get(dtype.name, 64.0)  # by name: bfloat16 is ml_dtypes' type
        return cls(k=default_k if k is None else k, eps=2 * float_info(dtype)[2])

    @property
    def bound(self) -> float:
        """The factor ``k * eps`` that multiplies the natural scale."""
        return self.k * self.eps


class Mismatch(AssertionError):
    """An ``AssertionError`` that also says which quantity differs (``.quantity``)."""

    def __init__(self, message: str, quantity: str) -> None:
        super().__init__(message)
        self.quantity = quantity


def assert_within(
    name: str,
    got: np.ndarray,
    want: np.ndarray,
    scale: np.ndarray,
    tol: Tolerance,
    axis: int | None = None,
    *,
    quantity: str | None = None,
) -> float:
    """Assert ``|got - want| <= tol.bound * scale`` elementwise; return the worst ratio.

    Raises :class:`Mismatch` (an ``AssertionError``) whose message names the quantity, the worst
    element's index (and channel), both values and the allowed error, and whose ``quantity``
    is ``quantity`` (default ``name``) for code that tallies failures.
    """
    quantity = quantity or name
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise Mismatch(f"{name}: shape {got.shape}, expected {want.shape}", quantity)
    err = np.abs(got - want)
    allowed = (
        tol.bound * np.broadcast_to(np.asarray(scale, dtype=np.float64), want.shape)
        + np.finfo(np.float64).tiny
    )
    nan_mismatch = np.isnan(got) != np.isnan(want)
    ratio = np.where(np.isnan(want) & np.isnan(got), 0.0, err / allowed)
    ratio = np.where(nan_mismatch, np.inf, ratio)
    worst = float(np.nanmax(ratio)) if ratio.size else 0.0
    if not worst <= 1.0:
        idx = np.unravel_index(int(np.nanargmax(ratio)), ratio.shape)
        where = f"index {tuple(int(i) for i in idx)}"
        if axis is not None and len(idx) > axis:
            where += f" (channel {int(idx[axis])})"
        raise Mismatch(
            f"{name} differs from bnref at {where}: got {float(got[idx])!r}, expected "
            f"{float(want[idx])!r}, |error| {float(err[idx]):.3g} > allowed {float(allowed[idx]):.3g} "
            f"(= {tol.k:g} x eps {tol.eps:.3g} x natural scale)",
            quantity,
        )
    return worst


def output_scale(x_hat: np.ndarray, scale: np.ndarray, bias: np.ndarray, axis: int) -> np.ndarray:
    """Natural scale of y: ``|gamma| * (1 + |x_hat|) + |beta|``."""
    shp = channel_shape(x_hat.ndim, axis, scale.shape[0])
    return np.abs(scale).reshape(shp) * (1.0 + np.abs(x_hat)) + np.abs(bias).reshape(shp)
