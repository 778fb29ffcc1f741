"""Hypothesis strategies: shapes and channel axes, and whole BatchNorm test cases (``BNCase``).

hypothesis is a test dependency, not a runtime one: this module imports without it, and the
strategies raise ``ImportError`` when called without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnref._validation import channel_shape, normalize_axis, reduce_axes

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


def require_hypothesis() -> None:
    """Raise ``ImportError`` (with the fix) when hypothesis is not installed."""
    if st is None:
        raise ImportError("bnref.testing strategies need hypothesis: pip install hypothesis")


def shapes_and_axes(min_rank: int = 2, max_rank: int = 5, max_side: int = 6, max_batch: int = 8):
    """Strategy for ``(shape, channel_axis)``: rank 2..5, axis any non-batch axis (negative too).

    Shapes always have >= 2 values per channel, so the unbiased variance exists.
    """
    require_hypothesis()

    @st.composite
    def _draw(draw):
        rank = draw(st.integers(min_rank, max_rank), label="rank")
        shape = [draw(st.integers(1, max_batch), label="batch")]
        shape += draw(st.lists(st.integers(1, max_side), min_size=rank - 1, max_size=rank - 1), label="sides")
        axis = draw(st.integers(1, rank - 1), label="axis")
        if int(np.prod(shape)) // shape[axis] < 2:
            shape[0] = max(shape[0], 2)
        if draw(st.booleans(), label="negative_axis"):
            axis -= rank
        return tuple(shape), axis

    return _draw()


def bn_cases(
    dtype=np.float32,
    shape_axis=None,
    max_abs_mean_over_std: float = 10.0,
    min_log10_std: float = -3.0,
    max_log10_std: float = 3.0,
):
    """Strategy for ``BNCase``, one drawn test case.

    Per-channel std drawn log-uniformly in [1e-3, 1e3], mean up to
    ``max_abs_mean_over_std`` stds away from 0 (raise it to probe cancellation), both exact for
    the drawn batch (standardized per channel, before rounding to ``dtype``), random gamma/beta
    (signed) and running statistics, and a random (never all-ones) upstream gradient.
    """
    require_hypothesis()
    dtype = np.dtype(dtype)
    shape_axis = shape_axis if shape_axis is not None else shapes_and_axes()

    @st.composite
    def _draw(draw):
        shape, axis = draw(shape_axis, label="shape_axis")
        seed = draw(st.integers(0, 2**32 - 1), label="seed")
        return _case(np.random.default_rng(seed), shape, axis, dtype, max_abs_mean_over_std,
                     min_log10_std, max_log10_std)

    return _draw()


def _case(rng, shape, axis, dtype, max_abs_mean_over_std, min_log10_std, max_log10_std) -> BNCase:
    """The ``BNCase`` that ``bn_cases`` draws for this generator, shape and axis."""
    ax = normalize_axis(axis, len(shape))
    c = shape[ax]
    cs = channel_shape(len(shape), ax, c)
    std = 10.0 ** rng.uniform(min_log10_std, max_log10_std, size=c)
    loc = rng.uniform(-max_abs_mean_over_std, max_abs_mean_over_std, size=c) * std
    # Standardized per channel, so that the batch itself (not only the distribution it is
    # drawn from) has mean loc and std std: a few draws can otherwise have a far smaller
    # spread, and |mean| / std far beyond max_abs_mean_over_std.
    z = rng.standard_normal(shape)
    axes = reduce_axes(len(shape), ax)
    zs = z.std(axis=axes, keepdims=True)  # 0 only for one value per channel: x = loc there
    z = (z - z.mean(axis=axes, keepdims=True)) / np.where(zs > 0, zs, 1)
    x = (z * std.reshape(cs) + loc.reshape(cs)).astype(dtype)
    scale = rng.uniform(0.2, 2.0, size=c) * rng.choice([-1.0, 1.0], size=c)
    bias = rng.standard_normal(c)
    running_mean = rng.standard_normal(c)
    running_var = rng.uniform(0.5, 2.0, size=c)
    dy = rng.standard_normal(shape).astype(dtype)
    return BNCase(
        x=x,
        scale=scale.astype(dtype),
        bias=bias.astype(dtype),
        running_mean=running_mean.astype(dtype),
        running_var=running_var.astype(dtype),
        dy=dy,
        axis=axis,
    )
