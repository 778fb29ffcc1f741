"""BatchNorm backward pass in training and inference mode.

Training mode (the batch statistics depend on x; n values per channel, x_hat the normalized
input)::

    dbias  = sum(dy)
    dscale = sum(dy * x_hat)
    dx     = scale / sqrt(var + eps) * (dy - dbias / n - x_hat * dscale / n)

so per channel ``sum(dx) = 0`` and ``sum(dx * x_hat) = 0``: the gradient is orthogonal to the
directions the normalization removes. (An all-ones ``dy`` makes dx exactly zero, which is why
tests must use random upstream gradients.)

Inference mode (statistics are constants)::

    dx = dy * scale / sqrt(var + eps);  dscale = sum(dy * x_hat);  dbias = sum(dy)

Results are returned in the dtype of ``x``. Per-channel sums (dscale, dbias) are accumulated in
float64 and rounded once. dx for float64 input is computed in float64. For float32 input in
training mode it is the float64 answer rounded once when each channel fits in the kernels'
scratch (channel-major layouts such as NCHW: one pass over x and dy); otherwise float32
arithmetic on per-channel constants derived in float64 (the float32 mean subtracted first),
proved and tested within 2.5 * eps32 of the natural scale ``|gamma| / std * (|dy| + mean|dy|
+ |x_hat| * mean|dy * x_hat|)``, with a per-channel fallback to float64 where that bound would
not hold (the proof: ``bnref/_kernels/backward.py``).
"""

from __future__ import annotations

import numpy as np

from bnref._kernels import eval_backward, train_backward
from bnref._validation import (
    check_array,
    check_channel_vector,
    check_eps,
    check_nonneg_variance,
    normalize_axis,
)
from bnref.forward import BatchNormCache


def _check_dy(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    dy = check_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    return dy


def batch_norm_train_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dscale, dbias)`` of training-mode BatchNorm, given the upstream ``dy``."""
    if not isinstance(cache, BatchNormCache):
        raise TypeError(
            f"cache must be the BatchNormCache from batch_norm_train, got {type(cache).__name__}"
        )
    x = cache.x
    dy = _check_dy(dy, x)
    mean_lo = cache.mean_residual
    dx, dbias, dscale = train_backward(
        dy, x, cache.axis, cache.mean, cache.inv_std, cache.scale, cache.moments.count, mean_lo
    )
    dt = x.dtype
    return dx.astype(dt, copy=False), dscale.astype(dt), dbias.astype(dt)


def batch_norm_eval_backward(
    dy: np.ndarray,
    x: np.ndarray,
    scale: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dscale, dbias)`` of inference-mode BatchNorm (fixed mean/var)."""
    x = check_array(x)
    dy = _check_dy(dy, x)
    axis = normalize_axis(axis, x.ndim)
    channels = x.shape[axis]
    scale64 = check_channel_vector(scale, "scale", channels, allow_none=True, fill=1.0)
    mean64 = check_channel_vector(mean, "mean", channels)
    var64 = check_channel_vector(var, "var", channels)
    check_nonneg_variance(var64)
    inv_std = 1.0 / np.sqrt(var64 + check_eps(eps))
    dx, dbias, dscale = eval_backward(dy, x, axis, mean64, inv_std, scale64)
    dt = x.dtype
    return dx.astype(dt, copy=False), dscale.astype(dt), dbias.astype(dt)
