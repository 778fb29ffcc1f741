"""BatchNorm forward pass, training mode and inference mode, for any rank and channel axis.

Training mode normalizes with the batch's own statistics (biased variance, eps inside the
square root, as every framework does)::

    mean_c = mean(x[..., c, ...]);  var_c = mean((x - mean_c)**2)
    y = (x - mean_c) / sqrt(var_c + eps) * scale_c + bias_c

Inference mode uses given (running or precise) ``mean``/``var`` in the same formula.

dtype contract: float16/float32/float64 inputs are computed in float64 and rounded once to
the input dtype, so the result is the float64 answer correctly rounded (up to the float64
error, which is far below one ulp of float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnref._kernels import normalize_affine, train_forward
from bnref._validation import (
    check_array,
    check_channel_vector,
    check_eps,
    check_nonneg_variance,
    normalize_axis,
    values_per_channel,
)
from bnref.moments import Moments


@dataclass(frozen=True, eq=False)
class BatchNormCache:
    """What ``batch_norm_train_backward`` needs from the forward pass.

    ``x`` is the forward input itself (not a copy): do not modify it before the backward pass.
    """

    x: np.ndarray
    axis: int
    eps: float
    scale: np.ndarray  # float64, ones when the forward had no scale
    moments: Moments  # the batch's statistics
    inv_std: np.ndarray  # 1 / sqrt(var_biased + eps), float64
    mean_residual: np.ndarray | None = None  # exact batch mean ~= mean + mean_residual

    @property
    def mean(self) -> np.ndarray:
        """Per-channel batch mean used for normalization."""
        return self.moments.mean

    @property
    def var(self) -> np.ndarray:
        """Per-channel biased batch variance used for normalization."""
        return self.moments.var(ddof=0)


def _prepare(x, scale, bias, eps, axis):
    x = check_array(x)
    axis = normalize_axis(axis, x.ndim)
    channels = x.shape[axis]
    scale64 = check_channel_vector(scale, "scale", channels, allow_none=True, fill=1.0)
    bias64 = check_channel_vector(bias, "bias", channels, allow_none=True, fill=0.0)
    return x, axis, scale64, bias64, check_eps(eps)


def batch_norm_train(
    x: np.ndarray,
    scale: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, BatchNormCache]:
    """Training-mode BatchNorm: normalize with this batch's mean and biased variance.

    Args:
        x: input of rank >= 2; axis 0 is the batch, ``axis`` the channels.
        scale: per-channel gamma (``None``: 1, i.e. ``affine=False``).
        bias: per-channel beta (``None``: 0).
        eps: added to the variance inside the square root.
        axis: channel axis (1 for NCHW, -1 for NHWC); negative values count from the end.

    Returns:
        ``(y, cache)``: ``y`` in ``x.dtype``; ``cache.moments`` holds the batch's statistics,
        which is what running-statistic updates and Precise BN consume.
    """
    x, axis, scale64, bias64, eps = _prepare(x, scale, bias, eps, axis)
    count = values_per_channel(x, axis)
    y, mean, mean_lo, m2, inv_std = train_forward(x, axis, scale64, bias64, eps)
    moments = Moments(count, mean, m2)
    cache = BatchNormCache(
        x=x, axis=axis, eps=eps, scale=scale64, moments=moments, inv_std=inv_std,
        mean_residual=mean_lo,
    )
    return y.astype(x.dtype, copy=False), cache


def batch_norm_eval(
    x: np.ndarray,
    scale: np.ndarray | None,
    bias: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = 1e-5,
    axis: int = 1,
) -> np.ndarray:
    """Inference-mode BatchNorm: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    ``mean`` and ``var`` are the stored (running or precise) statistics; ``var`` must be >= 0.
    """
    x, axis, scale64, bias64, eps = _prepare(x, scale, bias, eps, axis)
    channels = x.shape[axis]
    mean64 = check_channel_vector(mean, "mean", channels)
    var64 = check_channel_vector(var, "var", channels)
    check_nonneg_variance(var64)
    inv_std = 1.0 / np.sqrt(var64 + eps)
    return normalize_affine(x, axis, mean64, inv_std, scale64, bias64).astype(x.dtype, copy=False)
