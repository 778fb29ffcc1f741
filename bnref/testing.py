"""Test *your* BatchNorm against the oracle: hypothesis strategies, tolerances and a harness.

Typical use, in another project's test suite::

    import bnref.testing as bt
    from bnref.conventions import PYTORCH

    def my_train(x, scale, bias, running_mean, running_var, *, eps, momentum, axis):
        ...  # your BN in training mode
        return y, new_running_mean, new_running_var

    def test_my_bn():
        bt.check_batch_norm(bt.BatchNormImpl(train=my_train), PYTORCH, dtype=np.float32)

``check_batch_norm`` runs hypothesis over shapes, layouts and per-channel scales spanning six
orders of magnitude (so eps placement and the Bessel factor are visible), compares every
quantity with bnref, and on failure raises ``AssertionError`` naming the quantity, the
channel, the worst element, and the falsifying example (hypothesis prints its reproduction).

Tolerances (``Tolerance.for_dtype``): an implementation that computes in the working dtype
makes errors of a few ulp of that dtype relative to the *natural scale* of each quantity,
not of the quantity itself (y near zero has no meaningful relative error). We accept
``|got - want| <= k * eps_dtype * scale`` with ``k`` from the table below; ``scale`` is
``|gamma| * (1 + |x_hat|) + |beta|`` for y, ``|gamma| / std * (|dy| + rms(dy) * (1 + |x_hat|))``
for dx, ``sum |dy * x_hat|`` and ``sum |dy|`` for dscale/dbias, and ``|value|`` for running
statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnref._validation import channel_shape, normalize_axis, reduce_axes
from bnref.backward import batch_norm_train_backward
from bnref.conventions import Convention
from bnref.forward import batch_norm_eval, batch_norm_train

try:  # hypothesis is a test dependency, not a runtime one.
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised only without hypothesis installed
    st = None


# -- tolerances -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """``|got - want| <= k * eps_dtype * natural_scale`` elementwise, per quantity."""

    k: float
    eps: float

    @classmethod
    def for_dtype(cls, dtype: np.dtype, k: float | None = None) -> Tolerance:
        """Default ``k``: 64 for float16/float32 (reductions in the working dtype), 1e4 for float64."""
        dtype = np.dtype(dtype)
        default_k = {np.float16: 8.0, np.float32: 64.0, np.float64: 1e4}.get(dtype.type, 64.0)
        return cls(k=default_k if k is None else k, eps=float(np.finfo(dtype).eps))

    @property
    def bound(self) -> float:
        """The factor ``k * eps`` that multiplies the natural scale."""
        return self.k * self.eps


class Mismatch(AssertionError):
    """An ``AssertionError`` that also says which quantity differs (``.quantity``)."""

    def __init__(self, message: str, quantity: str) -> None:
        super().__init__(message)
        self.quantity = quantity


def assert_within(
    name: str,
    got: np.ndarray,
    want: np.ndarray,
    scale: np.ndarray,
    tol: Tolerance,
    axis: int | None = None,
    *,
    quantity: str | None = None,
) -> float:
    """Assert ``|got - want| <= tol.bound * scale`` elementwise; return the worst ratio.

    Raises :class:`Mismatch` (an ``AssertionError``) whose message names the quantity, the worst
    element's index (and channel), both values and the allowed error, and whose ``quantity``
    is ``quantity`` (default ``name``) for code that tallies failures.
    """
    quantity = quantity or name
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise Mismatch(f"{name}: shape {got.shape}, expected {want.shape}", quantity)
    err = np.abs(got - want)
    allowed = (
        tol.bound * np.broadcast_to(np.asarray(scale, dtype=np.float64), want.shape)
        + np.finfo(np.float64).tiny
    )
    nan_mismatch = np.isnan(got) != np.isnan(want)
    ratio = np.where(np.isnan(want) & np.isnan(got), 0.0, err / allowed)
    ratio = np.where(nan_mismatch, np.inf, ratio)
    worst = float(np.nanmax(ratio)) if ratio.size else 0.0
    if not worst <= 1.0:
        idx = np.unravel_index(int(np.nanargmax(ratio)), ratio.shape)
        where = f"index {tuple(int(i) for i in idx)}"
        if axis is not None and len(idx) > axis:
            where += f" (channel {int(idx[axis])})"
        raise Mismatch(
            f"{name} differs from bnref at {where}: got {float(got[idx])!r}, expected "
            f"{float(want[idx])!r}, |error| {float(err[idx]):.3g} > allowed {float(allowed[idx]):.3g} "
            f"(= {tol.k:g} x eps {tol.eps:.3g} x natural scale)",
            quantity,
        )
    return worst


def output_scale(x_hat: np.ndarray, scale: np.ndarray, bias: np.ndarray, axis: int) -> np.ndarray:
    """Natural scale of y: ``|gamma| * (1 + |x_hat|) + |beta|``."""
    shp = channel_shape(x_hat.ndim, axis, scale.shape[0])
    return np.abs(scale).reshape(shp) * (1.0 + np.abs(x_hat)) + np.abs(bias).reshape(shp)


# -- strategies -----------------------------------------------------------------------------------


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


def _require_hypothesis():
    if st is None:
        raise ImportError("bnref.testing strategies need hypothesis: pip install hypothesis")


def shapes_and_axes(min_rank: int = 2, max_rank: int = 5, max_side: int = 6, max_batch: int = 8):
    """Strategy for ``(shape, channel_axis)``: rank 2..5, axis any non-batch axis (negative too).

    Shapes always have >= 2 values per channel, so the unbiased variance exists.
    """
    _require_hypothesis()

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
    _require_hypothesis()
    dtype = np.dtype(dtype)
    shape_axis = shape_axis if shape_axis is not None else shapes_and_axes()

    @st.composite
    def _draw(draw):
        shape, axis = draw(shape_axis, label="shape_axis")
        seed = draw(st.integers(0, 2**32 - 1), label="seed")
        rng = np.random.default_rng(seed)
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

    return _draw()


# -- harness --------------------------------------------------------------------------------------

TrainFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
EvalFn = Callable[..., np.ndarray]
BackwardFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class BatchNormImpl:
    """A BN implementation under test, as plain callables (any may be ``None``).

    * ``train(x, scale, bias, running_mean, running_var, *, eps, momentum, axis)``
      -> ``(y, new_running_mean, new_running_var)``; momentum in the convention's meaning.
    * ``eval(x, scale, bias, mean, var, *, eps, axis)`` -> ``y``
    * ``backward(x, scale, bias, dy, *, eps, axis)`` -> ``(dx, dscale, dbias)`` of training mode.
    """

    train: TrainFn | None = None
    eval: EvalFn | None = None
    backward: BackwardFn | None = None


def check_case(
    impl: BatchNormImpl,
    convention: Convention,
    case: BNCase,
    tol: Tolerance,
    momentum: float | None = None,
    eps: float | None = None,
) -> dict[str, float]:
    """Compare ``impl`` with bnref on one case; return the worst error/allowed ratio per quantity.

    ``momentum`` and ``eps`` default to the convention's; both are passed to ``impl``.
    """
    eps = convention.effective_eps(eps)
    mom = convention.momentum if momentum is None else momentum
    ax = normalize_axis(case.axis, case.x.ndim)
    worst: dict[str, float] = {}
    y_ref, cache = batch_norm_train(case.x.astype(np.float64), case.scale, case.bias, eps=eps, axis=ax)
    x_hat = (
        case.x.astype(np.float64) - cache.mean.reshape(channel_shape(case.x.ndim, ax, -1))
    ) * cache.inv_std.reshape(channel_shape(case.x.ndim, ax, -1))
    scale64 = case.scale.astype(np.float64)
    bias64 = case.bias.astype(np.float64)
    if impl.train is not None:
        y, rm, rv = impl.train(
            case.x,
            case.scale,
            case.bias,
            case.running_mean.copy(),
            case.running_var.copy(),
            eps=eps,
            momentum=mom,
            axis=case.axis,
        )
        rm_ref, rv_ref = convention.update(
            case.running_mean.astype(np.float64),
            case.running_var.astype(np.float64),
            cache.moments,
            momentum=mom,
        )
        worst["y_train"] = assert_within(
            "y (training mode)",
            y,
            y_ref,
            output_scale(x_hat, scale64, bias64, ax),
            tol,
            ax,
            quantity="y_train",
        )
        worst["running_mean"] = assert_within(
            "running_mean",
            rm,
            rm_ref,
            np.abs(rm_ref) + np.abs(case.running_mean) + np.sqrt(cache.var),
            tol,
        )
        worst["running_var"] = assert_within(
            "running_var", rv, rv_ref, np.abs(rv_ref) + np.abs(case.running_var), tol
        )
    if impl.eval is not None:
        y = impl.eval(
            case.x,
            case.scale,
            case.bias,
            case.running_mean,
            case.running_var,
            eps=eps,
            axis=case.axis,
        )
        y_ev = batch_norm_eval(
            case.x.astype(np.float64),
            scale64,
            bias64,
            case.running_mean,
            case.running_var,
            eps=eps,
            axis=ax,
        )
        shp = channel_shape(case.x.ndim, ax, -1)
        xh = (case.x.astype(np.float64) - case.running_mean.astype(np.float64).reshape(shp)) / np.sqrt(
            case.running_var.astype(np.float64).reshape(shp) + eps
        )
        worst["y_eval"] = assert_within(
            "y (inference mode)", y, y_ev, output_scale(xh, scale64, bias64, ax), tol, ax, quantity="y_eval"
        )
    if impl.backward is not None:
        dx, ds, db = impl.backward(case.x, case.scale, case.bias, case.dy, eps=eps, axis=case.axis)
        dx_ref, ds_ref, db_ref = batch_norm_train_backward(case.dy.astype(np.float64), cache)
        axes = reduce_axes(case.x.ndim, ax)
        dy64 = case.dy.astype(np.float64)
        shp = channel_shape(case.x.ndim, ax, -1)
        rms = np.sqrt(np.mean(dy64 * dy64, axis=axes, keepdims=True))
        dx_scale = (np.abs(scale64) * cache.inv_std).reshape(shp) * (
            np.abs(dy64) + rms * (1.0 + np.abs(x_hat))
        )
        worst["dx"] = assert_within("dx", dx, dx_ref, dx_scale, tol, ax)
        worst["dscale"] = assert_within(
            "dscale", ds, ds_ref, np.sum(np.abs(dy64 * x_hat), axis=axes) + 1.0, tol
        )
        worst["dbias"] = assert_within("dbias", db, db_ref, np.sum(np.abs(dy64), axis=axes) + 1.0, tol)
    return worst


def check_batch_norm(
    impl: BatchNormImpl,
    convention: Convention,
    dtype=np.float32,
    *,
    momentum: float | None = None,
    eps: float | None = None,
    max_examples: int = 50,
    tolerance: Tolerance | None = None,
    cases=None,
) -> None:
    """Run hypothesis over ``cases`` (default ``bn_cases(dtype)``) and compare ``impl`` with bnref.

    Raises ``AssertionError`` on the first (shrunk) counterexample, with the quantity, the worst
    element and the falsifying example in the message and hypothesis's report.

    For jit-compiled implementations (JAX/Flax), every new shape recompiles: pass
    ``cases=bn_cases(dtype, shape_axis=st.sampled_from([((8, 4, 3, 3), -1), ...]))`` to draw
    from a few fixed shapes.
    """
    _require_hypothesis()
    tol = tolerance or Tolerance.for_dtype(dtype)
    strategy = cases if cases is not None else bn_cases(dtype)

    @settings(max_examples=max_examples, deadline=None, print_blob=True, database=None)
    @given(case=strategy)
    def _run(case):
        check_case(impl, convention, case, tol, momentum, eps)

    _run()
