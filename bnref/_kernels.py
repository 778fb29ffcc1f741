"""Low-level per-channel kernels: the only place that touches every element of x.

Everything here works on float64 values whatever the input dtype (float16/32 are widened
elementwise, exactly), so the public functions can promise results computed in float64 and
rounded once to the input dtype. The functions take the channel axis already normalized.
"""

from __future__ import annotations

import numpy as np

from bnref._validation import channel_shape, reduce_axes


def _f64(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float64 else x.astype(np.float64)


def channel_moments(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and M2 by the corrected two-pass algorithm, in float64.

    ``mean = sum(x)/n``; ``M2 = sum(d**2) - sum(d)**2/n`` with ``d = x - mean``; the second term
    removes the rounding error of the first pass's mean (Chan, Golub & LeVeque 1983).
    """
    axes = reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis]
    xf = _f64(x)
    mean = np.add.reduce(xf, axis=axes) / n
    d = xf - mean.reshape(channel_shape(x.ndim, axis, mean.shape[0]))
    corr = np.add.reduce(d, axis=axes)
    m2 = np.add.reduce(d * d, axis=axes) - corr * corr / n
    return mean, np.maximum(m2, 0.0)


def normalize_affine(
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
) -> np.ndarray:
    """``y = (x - mean) * inv_std * scale + bias`` in float64 (subtract first: keeps |mean|>>std)."""
    shp = channel_shape(x.ndim, axis, mean.shape[0])
    y = _f64(x) - mean.reshape(shp)
    y *= (inv_std * scale).reshape(shp)
    y += bias.reshape(shp)
    return y


def affine_grad_sums(
    dy: np.ndarray, x: np.ndarray, axis: int, mean: np.ndarray, inv_std: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_hat, sum(dy), sum(dy * x_hat))`` per channel, in float64."""
    axes = reduce_axes(x.ndim, axis)
    shp = channel_shape(x.ndim, axis, mean.shape[0])
    x_hat = (_f64(x) - mean.reshape(shp)) * inv_std.reshape(shp)
    dy64 = _f64(dy)
    return x_hat, np.add.reduce(dy64, axis=axes), np.add.reduce(dy64 * x_hat, axis=axes)


def train_input_grad(
    dy: np.ndarray,
    x_hat: np.ndarray,
    axis: int,
    count: int,
    scale_inv_std: np.ndarray,
    dbias: np.ndarray,
    dscale: np.ndarray,
) -> np.ndarray:
    """``dx = scale * inv_std * (dy - sum(dy)/n - x_hat * sum(dy*x_hat)/n)`` in float64."""
    shp = channel_shape(x_hat.ndim, axis, dbias.shape[0])
    dx = x_hat * (dscale / count).reshape(shp)
    np.subtract(_f64(dy), dx, out=dx)
    dx -= (dbias / count).reshape(shp)
    dx *= scale_inv_std.reshape(shp)
    return dx
