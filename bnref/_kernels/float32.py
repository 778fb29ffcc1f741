"""What the float32 paths share: the split mean and the guards on their per-channel constants.

The float32 paths (the forward one, opt-in, in ``bnref/_kernels/forward.py``; training and
inference dx in ``bnref/_kernels/backward.py``) compute on the data in float32 with
per-channel constants derived in float64. Notation: u = 2**-24 (eps32 = 2u), mu the exact
mean (``mean + mean_lo``), ``mh = float32(mean)``, ``r = mu - mh`` (float64, |r| <= u|mh| up
to eps64 terms, from ``split_mean``).

* ``t = fl32(x - mh)`` is exact when x is within a factor 2 of mh (Sterbenz), which is every
  x once |mean| >> std. Otherwise |x - mh| >= |mh| / 2, so rho = |r| * inv_std <= 2u|x_hat|
  (1 + 3u) and the subtraction's relative error u is an error of at most u (1 + 3u) |x - mu|.
* Rounding constants to float32 moves a line's slope, never its offset: with ``a32 = fl32(k)``,
  the offset is computed in float64 from the *rounded* slope, ``b = bias - a32 * r``, because
  ``k (x - mu) + bias = a32 (x - mh) + b + (k - a32)(x - mu)``; the last term is at most
  u |scale| |x_hat|.

Guards (``f32_safe``; a channel that fails one takes the float64 path; in column mode, the
whole array does): the float32 constants finite, the slopes (``a``, ``k``, ``c1``) in {0} or
[2**-64, 2**64], the offsets (``b``, ``e``) <= 2**64 (no float32 overflow or underflow of
constants; data and results beyond float32's range overflow in both paths alike). NaN constants fail every guard. Each path adds a guard
on rho of its own (its module).
"""

from __future__ import annotations

import numpy as np


def split_mean(mean: np.ndarray, mean_lo: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_hi, r)``: mean_hi = float32(mean), r = (mean + mean_lo) - mean_hi in float64."""
    mh = np.asarray(mean, dtype=np.float64).astype(np.float32)
    r = mean - mh.astype(np.float64)  # exact (Sterbenz)
    if mean_lo is not None:
        r = r + mean_lo
    return mh, r


def f32_safe(v: np.ndarray, zero_small: bool = False) -> np.ndarray:
    """Per-channel constants a float32 path may use: finite, far from float32 over/underflow.

    ``0 <= |v| <= 2**64`` always; ``|v| >= 2**-64`` unless zero (or ``zero_small``: an additive
    constant whose underflow costs at most 2**-150 absolute, far below eps32 * the scale).
    """
    m = np.abs(np.asarray(v, dtype=np.float64))
    ok = m <= 2.0**64  # False for NaN and inf
    if not zero_small:
        ok &= (m == 0) | (m >= 2.0**-64)
    return ok
