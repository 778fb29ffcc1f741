"""The arithmetic of porting BatchNorm parameters between frameworks (``conventions.convert``).

Inference-mode BN is ``y = (x - mean) / sqrt(var + eps) * scale + bias`` in every framework
(eps inside the square root everywhere), so two parameter sets give the same outputs exactly
when ``mean`` and ``bias`` agree and ``scale / sqrt(var + eps)`` agrees per channel. Porting
from eps ``e_s`` to eps ``e_t`` therefore changes one of two things per channel:

* the variance, where that keeps it >= 0: ``var_t = var_s + (e_s - e_t)``, ``scale_t = scale_s``;
* otherwise the scale: ``var_t = var_s``, ``scale_t = scale_s * sqrt((var_s + e_t) / (var_s + e_s))``.

A round trip is exact in inference outputs, not in parameters: a channel absorbed into the
scale on the way out comes back with ``var + (e_t - e_s)`` and the original ``scale / sqrt``.

The momentum is a weight: ``w`` on the batch statistic (PyTorch, raw TF fused
``exponential_avg_factor``) or on the running one (Keras, Flax, ONNX, MXNet, Paddle), so
converting is ``m`` or ``1 - m`` of the same ``w``. The running statistics' update cannot be
made identical across a Bessel difference (it needs the batch size), and training-mode
outputs differ whenever the eps differs (they normalize with the batch's variance, which no
parameter absorbs): both are documented in docs/porting.md, neither is attempted here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bnref._validation import check_eps


class Converted(NamedTuple):
    """Parameters in the target framework's convention (each array ``(C,)``, input dtype)."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float  # the eps to give the target framework (already its effective value)
    momentum: float  # in the target framework's own meaning


def _vector(v: object, name: str, channels: int | None) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric (C,) array, got dtype {a.dtype}")
    if a.ndim != 1 or (channels is not None and a.shape[0] != channels):
        want = "(C,)" if channels is None else f"({channels},) like scale"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    return a


def check_parameters(scale, bias, mean, var) -> tuple[np.ndarray, ...]:
    """The four per-channel vectors as new arrays of one length C, or a one-line error naming the bad one.

    Floating arrays keep their dtype, integer ones become float64. ``var`` must be >= 0 (NaN
    passes through, as in every framework's inference).
    """
    scale = _vector(scale, "scale", None)
    c = scale.shape[0]
    bias, mean, var = (_vector(v, n, c) for v, n in ((bias, "bias"), (mean, "mean"), (var, "var")))
    scale, bias, mean, var = (np.array(a, dtype=_out_dtype(a)) for a in (scale, bias, mean, var))
    neg = np.flatnonzero(var < 0)
    if neg.size:
        raise ValueError(f"var must be >= 0, got {float(var[neg[0]])!r} at channel {int(neg[0])}")
    return scale, bias, mean, var


def _out_dtype(a: np.ndarray) -> np.dtype:
    return a.dtype if a.dtype.kind == "f" else np.dtype(np.float64)


def absorb_eps(
    scale: np.ndarray, var: np.ndarray, source_eps: float, target_eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale_t, var_t)`` with ``scale_t / sqrt(var_t + e_t) == scale / sqrt(var + e_s)`` per channel.

    The eps difference goes into the variance where ``var + e_s - e_t >= 0``, else into the
    scale (variance kept): see the module docstring. Computed in float64, returned in the
    inputs' dtypes. A channel with ``var + e_s == 0`` has no finite output under the source and
    is refused, as is a non-finite or negative eps.
    """
    e_s, e_t = check_eps(source_eps), check_eps(target_eps)
    s64, v64 = scale.astype(np.float64), var.astype(np.float64)
    if e_s == 0.0:
        zero = np.flatnonzero(v64 == 0.0)
        if zero.size:
            raise ValueError(
                f"channel {int(zero[0])} has var = 0 and source eps = 0: its inference output "
                "divides by zero, so no target parameters reproduce it"
            )
    shifted = v64 + (e_s - e_t)
    into_var = shifted >= 0.0  # NaN var: False, and stays NaN in the scale below
    var_t = np.where(into_var, shifted, v64)
    # eps difference absorbed into the scale: sqrt of a ratio, exact to a few ulp
    ratio = np.sqrt(np.where(into_var, 1.0, (v64 + e_t) / (v64 + e_s)))
    scale_t = s64 * ratio
    return scale_t.astype(_out_dtype(scale)), var_t.astype(_out_dtype(var))


def convert_momentum(batch_weight: float, target_weights: str) -> float:
    """The momentum that means weight ``w = batch_weight`` on the batch, in another framework.

    ``target_weights`` says what that framework's momentum weighs: ``"batch"`` (``m = w``) or
    ``"running"`` (``m = 1 - w``).
    """
    if target_weights == "batch":
        m = float(batch_weight)
    elif target_weights == "running":
        m = 1.0 - float(batch_weight)
    else:
        raise ValueError(f"momentum_weights must be 'batch' or 'running', got {target_weights!r}")
    # 15 significant digits: ONNX's 0.9 becomes PyTorch's 0.1, not 0.09999999999999998
    return float(f"{m:.15g}")
