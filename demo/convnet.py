"""A small NumPy conv net with BatchNorm, trained with bnref's own forward and backward.

Architecture (``widths = (8, 16, 16, 32, 32)``, strides :data:`STRIDES`)::

    image[N, 28, 28, 1] -> [Conv 3x3 (pad 1, stride s_i, no bias) -> BatchNorm -> ReLU] * k
                        -> global average pool -> Linear (with bias) -> logits[N, 10]

Feature maps are NHWC inside (BN over ``axis=-1``); the ONNX export (:mod:`demo.conv_export`)
is NCHW. A convolution is an im2col matrix product: the columns of a 3x3 window are ordered
(input channel, row, column), so the weight ``W`` of shape ``(C_in * 9, C_out)`` is the ONNX
weight ``W.T.reshape(C_out, C_in, 3, 3)``.

A network may carry a convolution bias ``c{i}`` (absent in training, where BN follows): that is
how a *folded* network (:func:`fold`) and its *unfolded* twin are run with the same code.
Training mode returns each BN's :class:`bnref.Moments`, which Precise BN
(:func:`precise_aggregators`) and the EMA trackers of :mod:`demo.model` consume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import bnref
from demo.model import (
    EPS,
    EMATracker,
    EpochCallback,
    Params,
    Stats,
    batches,
    num_bn,
    one_blas_thread,
    sgd_epochs,
)

__all__ = [
    "WIDTHS",
    "STRIDES",
    "SIDE",
    "init_params",
    "as_images",
    "forward_train",
    "backward",
    "forward_eval",
    "accuracy",
    "precise_aggregators",
    "precise_stats",
    "fold",
    "ConvConfig",
    "train",
]

WIDTHS = (8, 16, 16, 32, 32)
#: Stride of conv ``i``: 28x28 -> 28 -> 14 -> 14 -> 7 -> 7.
STRIDES = (1, 2, 1, 2, 1)
SIDE = 28
K = 3  # kernel side; padding 1


def init_params(seed: int, widths: Sequence[int] = WIDTHS, classes: int = 10, c_in: int = 1) -> Params:
    """He-normal conv and output weights, BN scale 1 and bias 0 (float32); keys as in the MLP."""
    if not 1 <= len(widths) <= len(STRIDES):
        raise ValueError(f"widths needs 1..{len(STRIDES)} conv layers, got {tuple(widths)}")
    rng = np.random.default_rng(seed)
    p: Params = {}
    for i, c_out in enumerate(widths):
        fan_in = c_in * K * K
        p[f"W{i}"] = (rng.standard_normal((fan_in, c_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        p[f"gamma{i}"] = np.ones(c_out, np.float32)
        p[f"beta{i}"] = np.zeros(c_out, np.float32)
        c_in = c_out
    k = len(widths)
    p[f"W{k}"] = (rng.standard_normal((c_in, classes)) * np.sqrt(1.0 / c_in)).astype(np.float32)
    p[f"b{k}"] = np.zeros(classes, np.float32)
    return p


def as_images(x: np.ndarray) -> np.ndarray:
    """Flattened ``(n, 784)`` digits (as :mod:`demo.data` holds them) -> NHWC ``(n, 28, 28, 1)``."""
    x = np.asarray(x, np.float32)
    return x if x.ndim == 4 else x.reshape(len(x), SIDE, SIDE, 1)


# -- convolution as a matrix product -------------------------------------------------------------


def im2col(h: np.ndarray, stride: int) -> np.ndarray:
    """3x3 windows (padding 1) of NHWC ``h``: ``(N, Ho, Wo, C * 9)``, columns ordered (C, row, col)."""
    hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    win = sliding_window_view(hp, (K, K), axis=(1, 2))[:, ::stride, ::stride]  # N, Ho, Wo, C, 3, 3
    n, ho, wo = win.shape[:3]
    return win.reshape(n, ho, wo, -1)


def col2im(dcols: np.ndarray, shape: tuple[int, ...], stride: int) -> np.ndarray:
    """The adjoint of :func:`im2col`: scatter-add window gradients back to an NHWC ``shape``."""
    n, h, w, c = shape
    ho, wo = dcols.shape[1:3]
    d = dcols.reshape(n, ho, wo, c, K, K)
    dp = np.zeros((n, h + 2, w + 2, c), dcols.dtype)
    for i in range(K):
        for j in range(K):
            dp[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :] += d[..., i, j]
    return dp[:, 1:-1, 1:-1, :]


def _conv(params: Params, i: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cols = im2col(h, STRIDES[i])
    z = cols @ params[f"W{i}"]
    if f"c{i}" in params:  # folded / unfolded networks carry a conv bias
        z = z + params[f"c{i}"]
    return z, cols


# -- forward and backward ------------------------------------------------------------------------


@dataclass
class _Cache:
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # conv input shapes
    cols: list[np.ndarray] = field(default_factory=list)  # im2col of every conv input
    bn: list = field(default_factory=list)  # bnref.BatchNormCache per BN
    relu_mask: list[np.ndarray] = field(default_factory=list)
    pooled: np.ndarray | None = None
    last_shape: tuple[int, ...] = ()


def forward_train(
    params: Params, x: np.ndarray, eps: float = EPS
) -> tuple[np.ndarray, _Cache, list[bnref.Moments]]:
    """Training-mode forward: every BN normalizes with this batch's statistics (NHWC, axis -1).

    Returns ``(logits, cache, moments)``; ``moments[i]`` is BN ``i``'s batch statistics.
    """
    cache = _Cache()
    h = as_images(x)
    k = num_bn(params)
    for i in range(k):
        cache.shapes.append(h.shape)
        z, cols = _conv(params, i, h)
        cache.cols.append(cols)
        y, bc = bnref.batch_norm_train(z, params[f"gamma{i}"], params[f"beta{i}"], eps=eps, axis=-1)
        cache.bn.append(bc)
        mask = y > 0
        cache.relu_mask.append(mask)
        h = y * mask
    cache.last_shape = h.shape
    cache.pooled = h.mean(axis=(1, 2))
    logits = cache.pooled @ params[f"W{k}"] + params[f"b{k}"]
    return logits, cache, [bc.moments for bc in cache.bn]


def backward(params: Params, cache: _Cache, dlogits: np.ndarray) -> Params:
    """Gradients of every parameter, given the gradient of the loss w.r.t. the logits."""
    k = num_bn(params)
    g: Params = {f"W{k}": cache.pooled.T @ dlogits, f"b{k}": dlogits.sum(axis=0)}
    n, hh, ww, c = cache.last_shape
    dh = np.broadcast_to((dlogits @ params[f"W{k}"].T)[:, None, None, :] / np.float32(hh * ww), cache.last_shape)
    for i in reversed(range(k)):
        dy = dh * cache.relu_mask[i]
        dz, g[f"gamma{i}"], g[f"beta{i}"] = bnref.batch_norm_train_backward(dy, cache.bn[i])
        cols = cache.cols[i]
        dz2 = dz.reshape(-1, dz.shape[-1])
        g[f"W{i}"] = cols.reshape(-1, cols.shape[-1]).T @ dz2
        if i > 0:
            dcols = (dz2 @ params[f"W{i}"].T).reshape(cols.shape)
            dh = col2im(dcols, cache.shapes[i], STRIDES[i])
    return g


def forward_eval(
    params: Params, stats: Stats | None, x: np.ndarray, eps: float = EPS, conv_outputs: list | None = None
) -> np.ndarray:
    """Inference-mode logits: BN ``i`` uses ``stats[i] = (mean, var)``; ``stats=None``: no BN at all.

    ``stats=None`` runs a folded network (:func:`fold`): convolutions with bias, then ReLU.
    ``conv_outputs``, when given, receives every convolution's output (a BN's input), NHWC.
    """
    k = sum(1 for name in params if name.startswith("W")) - 1
    if stats is not None and len(stats) != k:
        raise ValueError(f"stats must hold {k} (mean, var) pairs, got {len(stats)}")
    h = as_images(x)
    for i in range(k):
        z, _ = _conv(params, i, h)
        if conv_outputs is not None:
            conv_outputs.append(z)
        if stats is not None:
            mean, var = stats[i]
            z = bnref.batch_norm_eval(z, params[f"gamma{i}"], params[f"beta{i}"], mean, var, eps=eps, axis=-1)
        h = np.maximum(z, 0.0)
    return h.mean(axis=(1, 2)) @ params[f"W{k}"] + params[f"b{k}"]


def accuracy(params: Params, stats: Stats | None, x: np.ndarray, y: np.ndarray, chunk: int = 500) -> float:
    """Fraction of ``x`` classified as ``y`` (evaluated in chunks of ``chunk`` images)."""
    with one_blas_thread():
        pred = np.concatenate(
            [forward_eval(params, stats, x[s : s + chunk]).argmax(1) for s in range(0, len(x), chunk)]
        )
    return float((pred == y).mean())


# -- Precise BN and folding ----------------------------------------------------------------------


def precise_aggregators(
    params: Params,
    x: np.ndarray,
    batch_size: int,
    eps: float = EPS,
    layers: int | None = None,
) -> list[bnref.PreciseBN]:
    """Precise BN: one :class:`bnref.PreciseBN` per BN over a training-mode pass in stored order.

    Whole batches of ``batch_size`` only (a final partial batch is dropped, as ``bnref-onnx``
    does). The aggregators hold both estimators (``with_estimator``). With ``layers``, only the
    first ``layers`` BNs are aggregated (:func:`demo.conv_unfold.unfold_stats`).
    """
    if len(x) < batch_size:
        raise ValueError(f"need at least one batch of {batch_size} samples, got {len(x)}")
    k = num_bn(params) if layers is None else layers
    aggs = [bnref.PreciseBN("population") for _ in range(k)]
    with one_blas_thread():
        for idx in batches(len(x), batch_size, None):
            _, _, moments = forward_train(params, x[idx], eps)
            for agg, m in zip(aggs, moments[:k], strict=True):
                agg.update(m)
    return aggs


def precise_stats(
    params: Params, x: np.ndarray, batch_size: int, estimator: str = "population", eps: float = EPS
) -> Stats:
    """:func:`precise_aggregators` reported with ``estimator``, as float32 ``(mean, var)`` pairs."""
    out = []
    for a in precise_aggregators(params, x, batch_size, eps):
        r = a.with_estimator(estimator)
        out.append((r.mean.astype(np.float32), r.var.astype(np.float32)))
    return out


def fold(params: Params, stats: Stats, eps: float = EPS) -> Params:
    """Fold every BN into its convolution, as exporters do: a network without BN.

    Per output channel, with ``a = gamma / sqrt(var + eps)``: ``W' = W * a`` and
    ``c' = (0 - mean) * a + beta`` (the convolutions had no bias). Computed in float64, stored
    float32. The result has no ``gamma``/``beta``: run it with ``forward_eval(folded, None, x)``.
    """
    k = num_bn(params)
    out: Params = {f"W{k}": params[f"W{k}"].copy(), f"b{k}": params[f"b{k}"].copy()}
    for i in range(k):
        mean, var = (np.asarray(s, np.float64) for s in stats[i])
        a = params[f"gamma{i}"].astype(np.float64) / np.sqrt(var + eps)
        out[f"W{i}"] = (params[f"W{i}"] * a).astype(np.float32)
        out[f"c{i}"] = (params[f"beta{i}"] - mean * a).astype(np.float32)
    return out


# -- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvConfig:
    """Training hyper-parameters of the conv net (SGD + momentum, cosine schedule, as the MLP's)."""

    widths: tuple[int, ...] = WIDTHS
    batch_size: int = 32
    epochs: int = 4
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    final_lr_factor: float = 0.0
    seed: int = 0


def train(
    x: np.ndarray,
    y: np.ndarray,
    cfg: ConvConfig,
    trackers: dict[str, EMATracker] | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[Params, dict[str, EMATracker]]:
    """Train from ``init_params(cfg.seed)``; data order from ``(cfg.seed, 1)``.

    ``trackers`` (default: PyTorch's convention) get the batch statistics of every step;
    ``on_epoch(epoch, params, trackers)`` is called after every epoch (1-based) with the live
    objects (copy what you keep).
    """
    rng = np.random.default_rng([cfg.seed, 1])
    params = init_params(cfg.seed, cfg.widths)
    if trackers is None:
        trackers = {"pytorch": EMATracker(bnref.conventions.PYTORCH, cfg.widths)}
    sgd_epochs(x, y, cfg, params, trackers, rng, on_epoch, forward_train, backward)
    return params, trackers
