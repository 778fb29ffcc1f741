"""A NumPy MLP with BatchNorm between layers, trained with bnref's own forward and backward.

Architecture (``sizes = (d, h1, ..., hk, classes)``)::

    x -> [Linear(no bias) -> BatchNorm -> ReLU] * k -> Linear(with bias) -> logits

The hidden Linear layers have no bias: BN subtracts the mean right after, so a bias there is
redundant. Training-mode BN is :func:`bnref.batch_norm_train`, its gradient
:func:`bnref.batch_norm_train_backward`; inference uses :func:`bnref.batch_norm_eval` with a
set of statistics that is kept *apart from* the weights, so the same weights can be evaluated
with EMA statistics in several framework conventions and with Precise BN statistics:

* :class:`EMATracker` — running statistics updated after every training step with one
  :class:`bnref.conventions.Convention` (PyTorch: momentum 0.1, unbiased; Flax/Keras: 0.99,
  biased). Tracking does not change training: the forward pass normalizes with batch
  statistics whatever the running statistics are, so one run feeds every tracker.
* :func:`precise_stats` — :class:`bnref.PreciseBN` over a pass of fixed weights in training
  mode (every BN normalizes with its batch statistics, as in training).

Everything is float32 except inside bnref, which computes in float64 and rounds once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

import bnref
from bnref.conventions import Convention

__all__ = [
    "EPS",
    "Stats",
    "init_params",
    "num_bn",
    "forward_train",
    "backward",
    "forward_eval",
    "predict",
    "accuracy",
    "EMATracker",
    "precise_stats",
    "TrainConfig",
    "train",
    "sgd_epochs",
    "softmax_xent",
    "batches",
    "one_blas_thread",
    "lr_at",
    "sgd_step",
]

#: BatchNorm epsilon used in training, inference and the ONNX export.
EPS = 1e-5

#: Statistics of every BN layer: one ``(mean, var)`` pair per layer, float32.
Stats = list[tuple[np.ndarray, np.ndarray]]
Params = dict[str, np.ndarray]


def init_params(sizes: Sequence[int], seed: int) -> Params:
    """He-normal weights, BN scale 1 and bias 0, final bias 0 (float32).

    Keys: ``W{i}``, ``gamma{i}``, ``beta{i}`` for hidden layer ``i``; ``W{k}``, ``b{k}`` for the
    output layer ``k``.
    """
    if len(sizes) < 3:
        raise ValueError(f"sizes needs input, >= 1 hidden and output sizes, got {tuple(sizes)}")
    rng = np.random.default_rng(seed)
    p: Params = {}
    k = len(sizes) - 2
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        p[f"W{i}"] = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if i < k:
            p[f"gamma{i}"] = np.ones(fan_out, np.float32)
            p[f"beta{i}"] = np.zeros(fan_out, np.float32)
    p[f"b{k}"] = np.zeros(sizes[-1], np.float32)
    return p


def num_bn(params: Params) -> int:
    """Number of BatchNorm layers (= hidden layers)."""
    return sum(1 for name in params if name.startswith("gamma"))


@dataclass
class _Cache:
    inputs: list[np.ndarray] = field(default_factory=list)  # input of every Linear
    bn: list = field(default_factory=list)  # bnref.BatchNormCache per BN
    pre_relu: list[np.ndarray] = field(default_factory=list)  # BN outputs


def forward_train(params: Params, x: np.ndarray) -> tuple[np.ndarray, _Cache, list[bnref.Moments]]:
    """Training-mode forward: every BN normalizes with this batch's statistics.

    Returns ``(logits, cache, moments)``; ``moments[i]`` is BN ``i``'s batch statistics, what
    EMA trackers and Precise BN consume.
    """
    cache = _Cache()
    h = x
    k = num_bn(params)
    for i in range(k):
        cache.inputs.append(h)
        z = h @ params[f"W{i}"]
        y, bc = bnref.batch_norm_train(z, params[f"gamma{i}"], params[f"beta{i}"], eps=EPS, axis=1)
        cache.bn.append(bc)
        cache.pre_relu.append(y)
        h = np.maximum(y, 0.0)
    cache.inputs.append(h)
    logits = h @ params[f"W{k}"] + params[f"b{k}"]
    return logits, cache, [bc.moments for bc in cache.bn]


def backward(params: Params, cache: _Cache, dlogits: np.ndarray) -> Params:
    """Gradients of every parameter, given the gradient of the loss w.r.t. the logits."""
    k = num_bn(params)
    g: Params = {}
    g[f"W{k}"] = cache.inputs[k].T @ dlogits
    g[f"b{k}"] = dlogits.sum(axis=0)
    dh = dlogits @ params[f"W{k}"].T
    for i in reversed(range(k)):
        dy = dh * (cache.pre_relu[i] > 0)
        dz, g[f"gamma{i}"], g[f"beta{i}"] = bnref.batch_norm_train_backward(dy, cache.bn[i])
        g[f"W{i}"] = cache.inputs[i].T @ dz
        if i > 0:
            dh = dz @ params[f"W{i}"].T
    return g


def forward_eval(params: Params, stats: Stats, x: np.ndarray) -> np.ndarray:
    """Inference-mode forward: BN ``i`` uses the fixed ``stats[i] = (mean, var)``."""
    k = num_bn(params)
    if len(stats) != k:
        raise ValueError(f"stats must hold {k} (mean, var) pairs, got {len(stats)}")
    h = x
    for i in range(k):
        mean, var = stats[i]
        z = h @ params[f"W{i}"]
        y = bnref.batch_norm_eval(z, params[f"gamma{i}"], params[f"beta{i}"], mean, var, eps=EPS)
        h = np.maximum(y, 0.0)
    return h @ params[f"W{k}"] + params[f"b{k}"]


def predict(params: Params, stats: Stats, x: np.ndarray) -> np.ndarray:
    """Predicted class of every row of ``x``."""
    return forward_eval(params, stats, x).argmax(axis=1)


def accuracy(params: Params, stats: Stats, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` classified as ``y`` with the given statistics."""
    return float((predict(params, stats, x) == y).mean())


def softmax_xent(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy of ``logits`` against labels ``y`` and its gradient w.r.t. the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    p[np.arange(n), y] -= 1.0
    return loss, p / n


# -- statistics --------------------------------------------------------------------------------


class EMATracker:
    """Running BN statistics in one framework's convention, updated once per training step.

    Starts where every framework starts (mean 0, variance 1) and applies
    ``convention.update`` (``new = (1 - w) * old + w * batch`` in that framework's meaning of
    momentum and Bessel correction) with the batch statistics of each step.
    """

    def __init__(self, convention: Convention, widths: Sequence[int], momentum: float | None = None):
        self.convention = convention
        self.momentum = momentum
        self.stats: Stats = [(np.zeros(c, np.float32), np.ones(c, np.float32)) for c in widths]
        self.updates = 0

    def update(self, moments: Sequence[bnref.Moments]) -> None:
        """Apply one EMA step to every BN layer."""
        self.stats = [
            self.convention.update(m, v, bm, momentum=self.momentum)
            for (m, v), bm in zip(self.stats, moments, strict=True)
        ]
        self.updates += 1

    def snapshot(self) -> Stats:
        """A copy of the current statistics."""
        return [(m.copy(), v.copy()) for m, v in self.stats]


def batches(n: int, batch_size: int, rng: np.random.Generator | None, drop_last: bool = True):
    """Index arrays of consecutive batches of a (shuffled when ``rng`` is given) order."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        yield order[s : s + batch_size]


def precise_stats(
    params: Params,
    x: np.ndarray,
    batch_size: int,
    estimator: str = "population",
    rng: np.random.Generator | None = None,
    num_samples: int | None = None,
) -> Stats:
    """Precise BN: run the fixed weights in training mode over ``x`` and aggregate.

    Batches of ``batch_size`` are taken in stored order (shuffled when ``rng`` is given); with
    ``num_samples`` only the first ``num_samples`` of that order are used. A final partial batch
    is dropped, as ``bnref-onnx`` does by default. Both estimators are collected; ``estimator``
    picks which one is returned (``"both"`` returns a dict of both).
    """
    n = len(x) if num_samples is None else min(int(num_samples), len(x))
    order = rng.permutation(len(x))[:n] if rng is not None else np.arange(n)
    if n < batch_size:
        raise ValueError(f"need at least one batch of {batch_size} samples, got {n}")
    aggs = [bnref.PreciseBN("population") for _ in range(num_bn(params))]
    with one_blas_thread():
        for idx in batches(n, batch_size, None):
            _, _, moments = forward_train(params, x[order[idx]])
            for agg, m in zip(aggs, moments, strict=True):
                agg.update(m)

    def as_stats(est: str) -> Stats:
        out = []
        for a in aggs:
            r = a.with_estimator(est)
            out.append((r.mean.astype(np.float32), r.var.astype(np.float32)))
        return out

    if estimator == "both":
        return {e: as_stats(e) for e in bnref.ESTIMATORS}
    return as_stats(estimator)


# -- training ----------------------------------------------------------------------------------


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit BLAS to one thread while training.

    The products here are tiny, and two competing OpenBLAS threads make them up to ~15x slower
    on a 2-core machine. Uses threadpoolctl (a scikit-learn dependency) when it is installed;
    otherwise relies on ``demo/__init__.py``.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters.

    ``lr`` follows a cosine schedule to ``lr * final_lr_factor`` over ``epochs`` unless
    ``schedule="constant"``; SGD with (heavy-ball) momentum and L2 weight decay on
    the Linear weights only.
    """

    sizes: tuple[int, ...] = (784, 256, 128, 10)
    batch_size: int = 32
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    final_lr_factor: float = 0.0
    seed: int = 0


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate at ``step`` of ``total``."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        f = cfg.final_lr_factor
        return cfg.lr * (f + (1.0 - f) * 0.5 * (1.0 + np.cos(np.pi * step / total)))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; expected 'cosine' or 'constant'")


EpochCallback = Callable[[int, Params, dict[str, EMATracker]], None]


def train(
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    conventions: dict[str, Convention] | None = None,
    on_epoch: EpochCallback | None = None,
    params: Params | None = None,
    trackers: dict[str, EMATracker] | None = None,
    stream: int = 1,
) -> tuple[Params, dict[str, EMATracker]]:
    """Train with mini-batch SGD + momentum; track EMA statistics in every given convention.

    ``on_epoch(epoch, params, trackers)`` is called after every epoch (1-based) with the live
    objects (copy what you keep). Pass ``params``/``trackers`` to continue an earlier run, with
    another ``stream`` so that it sees a new data order. Initialization follows ``cfg.seed``,
    the data order ``(cfg.seed, stream)``.
    """
    if conventions is None:
        conventions = {"pytorch": bnref.conventions.PYTORCH}
    rng = np.random.default_rng([cfg.seed, stream])
    if params is None:
        params = init_params(cfg.sizes, cfg.seed)
    params = copy.deepcopy(params)
    widths = cfg.sizes[1:-1]
    if trackers is None:
        trackers = {name: EMATracker(c, widths) for name, c in conventions.items()}
    sgd_epochs(x, y, cfg, params, trackers, rng, on_epoch)
    return params, trackers


def sgd_epochs(x: np.ndarray, y: np.ndarray, cfg, params: Params, trackers: dict[str, EMATracker],
               rng: np.random.Generator, on_epoch: EpochCallback | None = None,
               forward: Callable = forward_train, grad: Callable = backward) -> None:  # fmt: skip
    """Train ``params`` in place: ``cfg.epochs`` epochs of SGD + momentum (:func:`sgd_step`, :func:`lr_at`).

    ``forward(params, xb) -> (logits, cache, moments)``, ``grad(params, cache, dlogits)``: this MLP's
    by default (:mod:`demo.convnet` passes its own); every tracker gets each step's BN moments.
    """
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    total = len(x) // cfg.batch_size * cfg.epochs
    step = 0
    with one_blas_thread():
        for epoch in range(1, cfg.epochs + 1):
            for idx in batches(len(x), cfg.batch_size, rng):
                logits, cache, moments = forward(params, x[idx])
                grads = grad(params, cache, softmax_xent(logits, y[idx])[1])
                sgd_step(params, grads, velocity, np.float32(lr_at(cfg, step, total)), cfg)
                for t in trackers.values():
                    t.update(moments)
                step += 1
            if on_epoch is not None:
                on_epoch(epoch, params, trackers)


def sgd_step(params: Params, grads: Params, velocity: Params, lr: np.float32, cfg) -> None:
    """One in-place SGD step with heavy-ball momentum; L2 decay on the weights ``W*`` only."""
    for k, g in grads.items():
        if k.startswith("W"):
            g = g + np.float32(cfg.weight_decay) * params[k]
        v = velocity[k]
        v *= np.float32(cfg.momentum)
        v += g
        params[k] -= lr * v
