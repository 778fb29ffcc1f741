"""Hypothesis strategies: shapes and channel axes, and whole BatchNorm test cases (``BNCase``).

Both are ordinary hypothesis strategies: draw them in your own ``@given`` (your settings, your
profile, your example database) and hand each case to ``check.check_case``. What a case holds is
kept in the range of its dtype by ``ranges`` (float16 especially).

hypothesis is a test dependency, not a runtime one: this module imports without it, and the
strategies raise ``ImportError`` when called without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnref._validation import channel_shape, normalize_axis, reduce_axes
from bnref.testing.ranges import (
    CLIP,
    GAMMA_MAX,
    GAMMA_MIN,
    RUNNING_VAR_MIN,
    check_mean_over_std,
    gradient_rms,
    std_range,
)

try:  # hypothesis is a test dependency, not a runtime one.
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised only without hypothesis installed
    st = None


@dataclass(frozen=True)
class BNCase:
    """One drawn test case: input, affine parameters, running statistics and upstream gradient."""

    x: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    dy: np.ndarray
    axis: int

    def __repr__(self) -> str:
        return f"BNCase(shape={self.x.shape}, axis={self.axis}, dtype={self.x.dtype})"

    def _repr_pretty_(self, printer, cycle) -> None:
        """What hypothesis prints for a falsifying example: the short repr, not every array.

        The example database and ``@reproduce_failure`` hold the exact case.
        """
        printer.text(repr(self))


def require_hypothesis() -> None:
    """Raise ``ImportError`` (with the fix) when hypothesis is not installed."""
    if st is None:
        raise ImportError("bnref.testing strategies need hypothesis: pip install hypothesis")


def shapes_and_axes(min_rank: int = 2, max_rank: int = 5, max_side: int = 6, max_batch: int = 8):
    """Strategy for ``(shape, channel_axis)``: rank 2..5, axis any non-batch axis (negative too).

    Shapes always have >= 2 values per channel, so the unbiased variance exists.
    """
    require_hypothesis()

    @st.composite  # named and parameterized so that its repr says what it draws
    def shapes_and_axes(draw, min_rank, max_rank, max_side, max_batch):
        rank = draw(st.integers(min_rank, max_rank), label="rank")
        shape = [draw(st.integers(1, max_batch), label="batch")]
        shape += draw(st.lists(st.integers(1, max_side), min_size=rank - 1, max_size=rank - 1), label="sides")
        axis = draw(st.integers(1, rank - 1), label="axis")
        if int(np.prod(shape)) // shape[axis] < 2:
            shape[0] = max(shape[0], 2)
        if draw(st.booleans(), label="negative_axis"):
            axis -= rank
        return tuple(shape), axis

    return shapes_and_axes(min_rank, max_rank, max_side, max_batch)


def bn_cases(
    dtype=np.float32,
    shape_axis=None,
    max_abs_mean_over_std: float = 10.0,
    min_log10_std: float = -3.0,
    max_log10_std: float = 3.0,
):
    """Strategy for ``BNCase``, one drawn test case; use it in your own ``@given``.

    Per-channel std drawn log-uniformly in [1e-3, 1e3] (``min_log10_std``, ``max_log10_std``)
    narrowed to ``ranges.std_range(dtype, n, max_abs_mean_over_std)``, where every result (y,
    running statistics under any convention and momentum, dx, dscale, dbias) stays finite and
    normal in ``dtype`` (float16: [1e-3, 89.8] up to 17 values per channel, [0.0104, 88.2] at
    8 * 6**3; float32/float64 and bfloat16 (``ml_dtypes.bfloat16``, whose range is float32's)
    unchanged); mean up to
    ``max_abs_mean_over_std`` stds away from 0 (raise it to probe cancellation); both exact for
    the drawn batch (standardized per channel, before rounding to ``dtype``); random gamma
    (``|gamma|`` in [0.2, 2], signed), beta and running mean (standard normal clipped to
    [-4, 4]), running var in [0.5, 2]; and a random (never all-ones) upstream gradient with rms 1
    per channel. ``ValueError`` for a ``max_abs_mean_over_std`` the dtype cannot hold.
    """
    require_hypothesis()
    dtype = np.dtype(dtype)
    check_mean_over_std(dtype, max_abs_mean_over_std)
    shape_axis = shape_axis if shape_axis is not None else shapes_and_axes()

    @st.composite  # named and parameterized so that its repr says what it draws
    def bn_cases(draw, dtype, shape_axis, max_abs_mean_over_std, min_log10_std, max_log10_std):
        shape, axis = draw(shape_axis, label="shape_axis")
        seed = draw(st.integers(0, 2**32 - 1), label="seed")
        return _case(np.random.default_rng(seed), shape, axis, dtype, max_abs_mean_over_std,
                     min_log10_std, max_log10_std)

    return bn_cases(dtype, shape_axis, max_abs_mean_over_std, min_log10_std, max_log10_std)


def _case(rng, shape, axis, dtype, max_abs_mean_over_std, min_log10_std, max_log10_std) -> BNCase:
    """The ``BNCase`` that ``bn_cases`` draws for this generator, shape and axis."""
    ax = normalize_axis(axis, len(shape))
    c = shape[ax]
    n = int(np.prod(shape)) // c
    cs = channel_shape(len(shape), ax, c)
    lo, hi = std_range(dtype, n, max_abs_mean_over_std, 10.0**min_log10_std, 10.0**max_log10_std)
    std = 10.0 ** rng.uniform(np.log10(lo), np.log10(hi), size=c)
    loc = rng.uniform(-max_abs_mean_over_std, max_abs_mean_over_std, size=c) * std
    # Standardized per channel, so that the batch itself (not only the distribution it is
    # drawn from) has mean loc and std std: a few draws can otherwise have a far smaller
    # spread, and |mean| / std far beyond max_abs_mean_over_std.
    z = rng.standard_normal(shape)
    axes = reduce_axes(len(shape), ax)
    zs = z.std(axis=axes, keepdims=True)  # 0 only for one value per channel: x = loc there
    z = (z - z.mean(axis=axes, keepdims=True)) / np.where(zs > 0, zs, 1)
    x = (z * std.reshape(cs) + loc.reshape(cs)).astype(dtype)
    scale = rng.uniform(GAMMA_MIN, GAMMA_MAX, size=c) * rng.choice([-1.0, 1.0], size=c)
    bias = np.clip(rng.standard_normal(c), -CLIP, CLIP)
    running_mean = np.clip(rng.standard_normal(c), -CLIP, CLIP)
    running_var = rng.uniform(RUNNING_VAR_MIN, 2.0, size=c)
    g = rng.standard_normal(shape)
    rms = np.sqrt(np.mean(g * g, axis=axes, keepdims=True))
    dy = (g * (gradient_rms(dtype, n) / np.where(rms > 0, rms, 1))).astype(dtype)
    return BNCase(
        x=x,
        scale=scale.astype(dtype),
        bias=bias.astype(dtype),
        running_mean=running_mean.astype(dtype),
        running_var=running_var.astype(dtype),
        dy=dy,
        axis=axis,
    )
