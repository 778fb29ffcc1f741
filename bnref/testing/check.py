"""The harness: compare a BatchNorm implementation with bnref on one case or under hypothesis.

``check_case`` runs each part of the implementation given (training forward with the running
statistics' update, inference forward, training backward) on one ``BNCase``, computes bnref's
answer in float64, and asserts every quantity within its tolerance (``tolerances``: natural
scales and ``k``); call it from your own ``@given(case=bn_cases(...))`` test. ``check_batch_norm``
does that over cases drawn by hypothesis, with the current profile's settings and database.
"""

from __future__ import annotations

import base64
import binascii
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnref._validation import channel_shape, normalize_axis, reduce_axes
from bnref.backward import batch_norm_train_backward
from bnref.conventions import Convention
from bnref.forward import BatchNormCache, batch_norm_eval, batch_norm_train
from bnref.testing.strategies import BNCase, bn_cases, require_hypothesis
from bnref.testing.tolerances import Mismatch, Tolerance, assert_within, output_scale

try:  # hypothesis is a test dependency, not a runtime one.
    from hypothesis import given, settings

    from bnref.testing.database import KeyedDatabase
except ImportError:  # pragma: no cover - exercised only without hypothesis installed
    given = settings = KeyedDatabase = None

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


@dataclass(frozen=True)
class _Reference:
    """bnref's training-mode answer for a case, in float64, and what the scales need."""

    ax: int  # the channel axis, non-negative
    y: np.ndarray
    cache: BatchNormCache
    x_hat: np.ndarray
    scale64: np.ndarray
    bias64: np.ndarray

    @classmethod
    def of(cls, case: BNCase, eps: float) -> _Reference:
        ax = normalize_axis(case.axis, case.x.ndim)
        y, cache = batch_norm_train(case.x.astype(np.float64), case.scale, case.bias, eps=eps, axis=ax)
        x_hat = (
            case.x.astype(np.float64) - cache.mean.reshape(channel_shape(case.x.ndim, ax, -1))
        ) * cache.inv_std.reshape(channel_shape(case.x.ndim, ax, -1))
        return cls(ax, y, cache, x_hat, case.scale.astype(np.float64), case.bias.astype(np.float64))


def check_case(
    impl: BatchNormImpl,
    convention: Convention,
    case: BNCase,
    tol: Tolerance | None = None,
    momentum: float | None = None,
    eps: float | None = None,
) -> dict[str, float]:
    """Compare ``impl`` with bnref on one case; return the worst error/allowed ratio per quantity.

    Call it from your own ``@given(case=bn_cases(dtype))`` test. ``tol`` defaults to
    ``Tolerance.for_dtype(case.x.dtype)``; ``momentum`` and ``eps`` to the convention's; both
    are passed to ``impl``. Quantities: ``y_train``, ``running_mean``, ``running_var``
    (``impl.train``), ``y_eval`` (``impl.eval``), ``dx``, ``dscale``, ``dbias``
    (``impl.backward``). Raises ``Mismatch`` (an ``AssertionError``) naming the quantity, the
    worst element, the convention, eps, momentum and the case's shape, axis and dtype.
    """
    tol = tol or Tolerance.for_dtype(case.x.dtype)
    eps = convention.effective_eps(eps)
    mom = convention.momentum if momentum is None else momentum
    ref = _Reference.of(case, eps)
    worst: dict[str, float] = {}
    try:
        if impl.train is not None:
            worst.update(_check_train(impl.train, convention, case, ref, tol, eps, mom))
        if impl.eval is not None:
            worst.update(_check_eval(impl.eval, case, ref, tol, eps))
        if impl.backward is not None:
            worst.update(_check_backward(impl.backward, case, ref, tol, eps))
    except Mismatch as e:
        context = f"convention {convention.name}, eps {eps:g}, momentum {mom:g}; {case!r}"
        raise Mismatch(f"{e} [{context}]", e.quantity) from None
    return worst


def _check_train(train: TrainFn, convention: Convention, case: BNCase, ref: _Reference,
                 tol: Tolerance, eps: float, mom: float) -> dict[str, float]:
    """Training forward: y and the running statistics' update, in the convention's meaning."""
    y, rm, rv = train(
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
        ref.cache.moments,
        momentum=mom,
    )
    scale = output_scale(ref.x_hat, ref.scale64, ref.bias64, ref.ax)
    return {
        "y_train": assert_within("y (training mode)", y, ref.y, scale, tol, ref.ax, quantity="y_train"),
        "running_mean": assert_within(
            "running_mean",
            rm,
            rm_ref,
            np.abs(rm_ref) + np.abs(case.running_mean) + np.sqrt(ref.cache.var),
            tol,
        ),
        "running_var": assert_within(
            "running_var", rv, rv_ref, np.abs(rv_ref) + np.abs(case.running_var), tol
        ),
    }


def _check_eval(evaluate: EvalFn, case: BNCase, ref: _Reference, tol: Tolerance,
                eps: float) -> dict[str, float]:
    """Inference forward with the case's running statistics."""
    ax = ref.ax
    y = evaluate(
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
        ref.scale64,
        ref.bias64,
        case.running_mean,
        case.running_var,
        eps=eps,
        axis=ax,
    )
    shp = channel_shape(case.x.ndim, ax, -1)
    xh = (case.x.astype(np.float64) - case.running_mean.astype(np.float64).reshape(shp)) / np.sqrt(
        case.running_var.astype(np.float64).reshape(shp) + eps
    )
    scale = output_scale(xh, ref.scale64, ref.bias64, ax)
    return {"y_eval": assert_within("y (inference mode)", y, y_ev, scale, tol, ax, quantity="y_eval")}


def _check_backward(backward: BackwardFn, case: BNCase, ref: _Reference, tol: Tolerance,
                    eps: float) -> dict[str, float]:
    """Training backward: dx, dscale, dbias."""
    ax = ref.ax
    dx, ds, db = backward(case.x, case.scale, case.bias, case.dy, eps=eps, axis=case.axis)
    dx_ref, ds_ref, db_ref = batch_norm_train_backward(case.dy.astype(np.float64), ref.cache)
    axes = reduce_axes(case.x.ndim, ax)
    dy64 = case.dy.astype(np.float64)
    shp = channel_shape(case.x.ndim, ax, -1)
    rms = np.sqrt(np.mean(dy64 * dy64, axis=axes, keepdims=True))
    dx_scale = (np.abs(ref.scale64) * ref.cache.inv_std).reshape(shp) * (
        np.abs(dy64) + rms * (1.0 + np.abs(ref.x_hat))
    )
    return {
        "dx": assert_within("dx", dx, dx_ref, dx_scale, tol, ax),
        "dscale": assert_within(
            "dscale", ds, ds_ref, np.sum(np.abs(dy64 * ref.x_hat), axis=axes) + 1.0, tol
        ),
        "dbias": assert_within("dbias", db, db_ref, np.sum(np.abs(dy64), axis=axes) + 1.0, tol),
    }


def check_batch_norm(
    impl: BatchNormImpl,
    convention: Convention,
    dtype=np.float32,
    *,
    momentum: float | None = None,
    eps: float | None = None,
    max_examples: int | None = None,
    tolerance: Tolerance | None = None,
    cases=None,
    reproduce: str | None = None,
) -> None:
    """Run hypothesis over ``cases`` (default ``bn_cases(dtype)``) and compare ``impl`` with bnref.

    Raises ``Mismatch`` (an ``AssertionError``) on the first (shrunk) counterexample, with the
    quantity, the worst element and the case in the message and hypothesis's report.

    Settings come from the current hypothesis profile (``settings.default``: whatever your
    ``settings.load_profile`` chose), with ``deadline=None`` (a first call may compile) and
    ``max_examples`` only where given here. Failures are saved to the profile's example
    database (``database=None`` there: nothing saved), apart per implementation, convention,
    dtype, momentum, eps and cases (``database_key``), and replayed first on the next run.
    To draw cases in your own ``@given`` test instead, use ``bn_cases`` and ``check_case``.

    A failure carries one reproduction, as a note on the exception: ``add
    reproduce='bnref-case:...' to this check_batch_norm call``. That string is the falsifying
    case itself (every array, exactly), so the same call with it checks that one case, without
    hypothesis, its database or its version (hypothesis's own ``@reproduce_failure`` line is
    not printed: it would replay an inner function, not your test).

    For jit-compiled implementations (JAX/Flax), every new shape recompiles: pass
    ``cases=bn_cases(dtype, shape_axis=st.sampled_from([((8, 4, 3, 3), -1), ...]))`` to draw
    from a few fixed shapes.
    """
    tol = tolerance or Tolerance.for_dtype(dtype)
    if reproduce is not None:
        check_case(impl, convention, decode_case(reproduce), tol, momentum, eps)
        return
    require_hypothesis()
    strategy = cases if cases is not None else bn_cases(dtype)
    # One failure, one reproduction: ours (below), not a @reproduce_failure of the inner test.
    overrides = {"deadline": None, "print_blob": False, "report_multiple_bugs": False}
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    if settings.default.database is not None:  # the profile's database, one space per check
        key = database_key(impl, convention, dtype, momentum, eps, strategy)
        overrides["database"] = KeyedDatabase(settings.default.database, key.encode() + b"\0")

    failing: list[BNCase] = []

    @settings(settings.default, **overrides)
    @given(case=strategy)
    def bnref_check_batch_norm(case):
        try:
            check_case(impl, convention, case, tol, momentum, eps)
        except Exception:
            failing.append(case)  # hypothesis runs the shrunk example last
            raise

    try:
        bnref_check_batch_norm()
    except Exception as exc:
        if failing:
            exc.add_note(f"Reproduce this failure: add reproduce={encode_case(failing[-1])!r} "
                         "to this check_batch_norm call.")
        raise


_CASE_PREFIX = "bnref-case:"
_CASE_ARRAYS = ("x", "scale", "bias", "running_mean", "running_var", "dy")


def encode_case(case: BNCase) -> str:
    """``case`` as a string :func:`decode_case` turns back into the same arrays, bit for bit."""
    buf = io.BytesIO()
    np.savez(buf, axis=np.int64(case.axis), **{k: getattr(case, k) for k in _CASE_ARRAYS})
    return _CASE_PREFIX + base64.b64encode(zlib.compress(buf.getvalue(), 9)).decode("ascii")


def decode_case(text: str) -> BNCase:
    """The case :func:`encode_case` wrote into ``text``; ``ValueError`` if it is not one."""
    if not isinstance(text, str) or not text.startswith(_CASE_PREFIX):
        raise ValueError(f"reproduce must be a string starting with {_CASE_PREFIX!r}, as a "
                         "failure of check_batch_norm prints it")
    try:
        raw = zlib.decompress(base64.b64decode(text[len(_CASE_PREFIX):], validate=True))
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _CASE_ARRAYS}
            axis = int(npz["axis"])
    except (ValueError, KeyError, OSError, zlib.error, binascii.Error) as exc:
        raise ValueError(f"reproduce is not a case check_batch_norm printed: {exc}") from None
    return BNCase(axis=axis, **arrays)


def database_key(impl: BatchNormImpl, convention: Convention, dtype, momentum=None, eps=None,
                 cases=None) -> str:
    """What tells ``check_batch_norm``'s saved examples apart: stable across processes.

    The prefix of its ``database.KeyedDatabase``: the implementation's function names, the
    convention, dtype, momentum, eps and the strategy's repr (left out where it holds a memory
    address).
    """

    def name(f) -> str:
        if f is None:
            return "-"
        return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}"

    drawn = repr(cases) if cases is not None else "-"
    parts = [convention.name, np.dtype(dtype).name, repr(momentum), repr(eps),
             "?" if " at 0x" in drawn else drawn]
    return "|".join(parts + [name(f) for f in (impl.train, impl.eval, impl.backward)])
