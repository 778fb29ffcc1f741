"""What a dtype can hold: the per-channel std for which every result of a drawn case stays in range.

A correct float16 implementation must pass the harness, so no drawn case may push a result
past float16's largest value (65504: a running variance of 1e6 is ``inf``) or into its
subnormals (where rounding is no longer relative, so the tolerance could not hold). The bounds
below are derived, not found by retrying: ``std_range`` narrows the std of each case to them.

What ``bn_cases`` draws, per channel of ``n`` values: std ``s``; mean up to ``M * s`` (``M`` =
``max_abs_mean_over_std``), the batch standardized to exactly that mean and std before rounding
to the dtype; ``|gamma|`` in [0.2, 2]; ``|beta|``, ``|running_mean|`` <= 4 (standard normal,
clipped); ``running_var`` in [0.5, 2]; ``dy`` with per-channel rms exactly ``r = min(1, L / (n (1 +
2u)))`` before rounding.

Notation: ``F`` the dtype's largest finite value, ``T`` its smallest normal, ``u = eps / 2`` its
unit roundoff, ``L = F / 4`` (headroom for the implementation's own rounding), ``q = sqrt(n - 1)``.

Two facts carry everything:

* Samuelson's inequality: any n values lie within ``q`` (biased) standard deviations of their
  mean. So ``|x_hat| <= q`` for every eps >= 0, whatever rounding did to x; and
  ``|dy_i - mean(dy)| <= q * rms(dy)``.
* Rounding x moves each value by at most ``u |x| + u T <= u s (M + q + 1)`` (for ``s >= T``), and
  a std moves by at most the largest move: the std of the rounded batch is within ``s (1 +- d)``,
  ``d = u (M + q + 1)``. Likewise ``rms(dy)`` is within ``r (1 +- 2u)`` (for ``r >= T``).

Bounds (any momentum: a running statistic is a convex combination of the old value and the
batch's, so it is bounded by the larger of the two):

============  ===========================================  =======================================
result        bound (float64, before rounding)             kept <= L by
============  ===========================================  =======================================
x             ``(1 + d) s (M + q)``                        ``s <= L / ((M + q)(1 + d))``
y (train)     ``2 q + 4``                                  ``q <= (L - 4) / 2`` (n only)
running_mean  ``max(4, |x|)``                              the bound on x
running_var   ``max(2, 2 (1 + d)^2 s^2)`` (n/(n-1) <= 2)   ``s <= sqrt(L / 2) / (1 + d)``
y (eval)      ``2 (|x| + 4) / sqrt(0.5) + 4``              ``s <= ((L - 4) / (2 sqrt 2) - 4) /
                                                           ((M + q)(1 + d))``
dx            ``4 q r (1 + 2u) / (s (1 - d))``             ``s >= 4 q r (1 + 2u) / (L (1 - d))``
dscale, dbias ``n r (1 + 2u)`` (Cauchy-Schwarz)            the choice of r
============  ===========================================  =======================================

(dx: ``|gamma| inv_std (|dy_i - mean(dy)| + |x_hat_i| |mean(dy x_hat)|)`` with
``inv_std <= 1 / std`` and ``|mean(dy x_hat)| <= rms(dy)``.) Natural scales (``tolerances``) stay
>= T, so a result's rounding (``<= u |v| + u T``) stays relative: y's >= |gamma|, running_var's
>= |old| >= 0.5, dscale's and dbias's >= 1, running_mean's >= s (kept ``s >= T``), and dx's
``>= 0.2 (1 - u) r (1 - 2u) / sqrt(s^2 (1 + d)^2 + eps)`` >= T for eps <= 1 when
``s <= sqrt((g r / T)^2 - 1) / (1 + d)``, ``g = 0.2 (1 - u)(1 - 2u)``.

For float16 (F = 65504, T = 2**-14, u = 2**-11), M = 10: std in [1e-3, 89.8] for n <= 17 values
per channel, [0.0104, 88.2] for the largest default channel (n = 8 * 6**3 = 1728): running_var sets
the top, dx the bottom. float32, float64 and bfloat16 keep the default [1e-3, 1e3].
"""

from __future__ import annotations

import math

import numpy as np

#: |gamma| <= GAMMA_MAX, |beta| and |running_mean| <= CLIP, running_var >= RUNNING_VAR_MIN.
GAMMA_MIN, GAMMA_MAX, CLIP, RUNNING_VAR_MIN = 0.2, 2.0, 4.0, 0.5


def float_info(dtype) -> tuple[float, float, float]:
    """``(largest finite, smallest normal, unit roundoff)`` of a float dtype (bfloat16 too)."""
    dtype = np.dtype(dtype)
    try:
        fi = np.finfo(dtype)
    except ValueError:  # ml_dtypes types (bfloat16) have their own finfo
        import ml_dtypes

        fi = ml_dtypes.finfo(dtype)
    return float(fi.max), float(fi.smallest_normal), float(fi.eps) / 2


def headroom(dtype) -> float:
    """``L = F / 4``: every drawn result stays below it in magnitude."""
    return float_info(dtype)[0] / 4


def max_rounding_spread(dtype, n: int, max_abs_mean_over_std: float) -> float:
    """``d = u (M + sqrt(n - 1) + 1)``: how far (relative) rounding x can move a channel's std."""
    u = float_info(dtype)[2]
    return u * (max_abs_mean_over_std + math.sqrt(max(n - 1, 1)) + 1)


def check_mean_over_std(dtype, max_abs_mean_over_std: float) -> None:
    """Refuse an ``M`` for which rounding to ``dtype`` destroys even a two-value batch (d > 1/4)."""
    if max_abs_mean_over_std < 0 or max_abs_mean_over_std != max_abs_mean_over_std:
        raise ValueError(f"max_abs_mean_over_std must be >= 0, got {max_abs_mean_over_std}")
    if max_rounding_spread(dtype, 2, max_abs_mean_over_std) > 0.25:
        u = float_info(dtype)[2]
        raise ValueError(
            f"max_abs_mean_over_std={max_abs_mean_over_std:g} is too large for "
            f"{np.dtype(dtype).name}: rounding x to it would move a channel's std by more than a "
            f"quarter (u * (M + 2) > 1/4 needs M <= {0.25 / u - 2:g})"
        )


def gradient_rms(dtype, n: int) -> float:
    """Per-channel rms of dy: 1, or less where n values could sum past the headroom."""
    _, _, u = float_info(dtype)
    return min(1.0, headroom(dtype) / (n * (1 + 2 * u)))


def std_range(dtype, n: int, max_abs_mean_over_std: float = 10.0, lo: float = 1e-3,
              hi: float = 1e3) -> tuple[float, float]:
    """``[lo, hi]`` narrowed to where every result of the case stays finite and normal.

    ``n`` is the number of values per channel; the module docstring derives each bound.
    ``ValueError`` where no std (or no std in ``[lo, hi]``) can keep the case in range.
    """
    _, tiny, u = float_info(dtype)
    L, M = headroom(dtype), float(max_abs_mean_over_std)
    q = math.sqrt(max(n - 1, 1))
    d = max_rounding_spread(dtype, n, M)
    r = gradient_rms(dtype, n)
    g = GAMMA_MIN * (1 - u) * (1 - 2 * u) * r / tiny
    problems = []
    if d > 0.25:
        problems.append(f"rounding moves the std by up to {d:.3g} (> 1/4)")
    if q > (L - CLIP) / GAMMA_MAX:
        problems.append(f"{n} values per channel: y could reach {GAMMA_MAX * q + CLIP:.3g}")
    if g <= 1 or r < tiny:
        problems.append(f"{n} values per channel: dy's rms {r:.3g} underflows dx")
    if problems:
        raise ValueError(f"no std in [{lo:g}, {hi:g}] keeps a {np.dtype(dtype).name} case in "
                         f"range: {'; '.join(problems)}")
    highs = (
        L / ((M + q) * (1 + d)),  # x
        math.sqrt(L / 2) / (1 + d),  # running_var
        ((L - CLIP) * math.sqrt(RUNNING_VAR_MIN) / GAMMA_MAX - CLIP) / ((M + q) * (1 + d)),  # y_eval
        g * math.sqrt(1 - 1 / (g * g)) / (1 + d),  # dx's natural scale >= T, eps <= 1
    )
    lows = (tiny, 2 * GAMMA_MAX * q * r * (1 + 2 * u) / (L * (1 - d)))  # x normal; dx <= L
    new_lo, new_hi = max(lo, *lows), min(hi, *highs)
    if not new_lo <= new_hi:
        raise ValueError(
            f"no std in [{lo:g}, {hi:g}] keeps a {np.dtype(dtype).name} case of {n} values per "
            f"channel in range: only [{max(lows):.3g}, {min(highs):.3g}] does (bnref.testing.ranges)"
        )
    return float(new_lo), float(new_hi)
