"""Argument checks shared by the oracle's public functions.

Every check raises ``ValueError``/``TypeError`` naming the argument and what was expected,
never ``assert`` (which disappears under ``python -O``).
"""

from __future__ import annotations

import numpy as np

#: Input dtypes the oracle accepts; computation always happens in float64.
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _extra_float_dtypes() -> tuple[np.dtype, ...]:
    try:  # bfloat16 is optional: it comes with ml_dtypes when that is installed.
        import ml_dtypes
    except ImportError:
        return ()
    return (np.dtype(ml_dtypes.bfloat16),)


def check_array(x: object, name: str = "x") -> np.ndarray:
    """Return ``x`` as a floating array of rank >= 2, or raise naming the problem."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype not in FLOAT_DTYPES and x.dtype not in _extra_float_dtypes():
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32, float64, bfloat16), got dtype {x.dtype}"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have rank >= 2 (batch and channel axes), got shape {x.shape}"
        )
    return x


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Map a possibly negative channel ``axis`` into ``range(ndim)``; axis 0 is the batch."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}")
    return int(axis) % ndim


def values_per_channel(x: np.ndarray, axis: int) -> int:
    """Values per channel of ``x`` (everything but the channel ``axis``); refuses none."""
    count = x.size // x.shape[axis] if x.shape[axis] else 0
    if count == 0:
        raise ValueError(f"x has no values per channel (shape {x.shape}, channel axis {axis})")
    return count


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """All axes but the channel axis: the axes BatchNorm reduces over."""
    return tuple(i for i in range(ndim) if i != axis)


def channel_shape(ndim: int, axis: int, channels: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis`` of a rank-``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = channels
    return tuple(shape)


def check_channel_vector(
    v: object, name: str, channels: int, *, allow_none: bool = False, fill: float = 0.0
) -> np.ndarray:
    """Return a float64 vector of length ``channels``; ``None`` means ``fill`` when allowed."""
    if v is None:
        if allow_none:
            return np.full(channels, fill, dtype=np.float64)
        raise ValueError(f"{name} must be a vector of length {channels}, got None")
    arr = np.asarray(v)
    if arr.dtype.kind not in "fiu" and arr.dtype not in _extra_float_dtypes():  # bfloat16: kind "V"
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) to match the channel axis, got {arr.shape}"
        )
    return arr.astype(np.float64)


def check_eps(eps: float) -> float:
    """``eps`` must be a finite, non-negative number."""
    eps = float(eps)
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def check_nonneg_variance(var: np.ndarray, name: str = "var") -> None:
    """Refuse negative variances (NaN passes through: frameworks propagate it)."""
    if np.any(var < 0):
        bad = int(np.flatnonzero(var < 0)[0])
        raise ValueError(f"{name} must be >= 0, got {var[bad]!r} at channel {bad}")
