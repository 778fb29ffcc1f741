"""Forward and backward passes: properties against independent float64 computations.

Tolerances: float64 outputs are compared at rtol 1e-12 of the natural scale; float32/float16
outputs must be the float64 answer rounded once, i.e. within 1 ulp of the output's dtype
relative to |gamma| * (1 + |x_hat|) + |beta| (the natural scale, since y near 0 has no
meaningful relative error).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnref
from bnref._validation import channel_shape, normalize_axis, reduce_axes
from bnref.testing import bn_cases, shapes_and_axes
from tests.reference import naive_eval, naive_train

DTYPES = [np.float16, np.float32, np.float64]


def _natural(x_hat, scale, bias, axis):
    shp = channel_shape(x_hat.ndim, axis, len(scale))
    return np.abs(np.asarray(scale, np.float64)).reshape(shp) * (1 + np.abs(x_hat)) + np.abs(
        np.asarray(bias, np.float64)
    ).reshape(shp)


@given(case=st.sampled_from(DTYPES).flatmap(lambda dt: bn_cases(dt)))
def test_train_matches_naive_and_rounds_once(case):
    eps = 1e-5
    y, cache = bnref.batch_norm_train(case.x, case.scale, case.bias, eps=eps, axis=case.axis)
    assert y.dtype == case.x.dtype and y.shape == case.x.shape
    ref, mean, var = naive_train(case.x, case.scale, case.bias, eps, normalize_axis(case.axis, case.x.ndim))
    ax = normalize_axis(case.axis, case.x.ndim)
    x_hat = (ref - case.bias.astype(np.float64).reshape(channel_shape(y.ndim, ax, -1))) / case.scale.astype(
        np.float64
    ).reshape(channel_shape(y.ndim, ax, -1))
    ulp = np.finfo(case.x.dtype).eps if case.x.dtype != np.float64 else 1e-12
    tol = ulp * _natural(x_hat, case.scale, case.bias, ax)
    assert np.all(np.abs(y.astype(np.float64) - ref) <= tol)
    np.testing.assert_allclose(cache.moments.mean, mean, rtol=1e-12, atol=1e-12 * np.sqrt(var).max())
    np.testing.assert_allclose(cache.moments.var(0), var, rtol=1e-11)


@given(case=bn_cases(np.float64), eps=st.sampled_from([0.0, 1e-5, 1e-3, 0.1]))
def test_train_output_statistics(case, eps):
    # Per channel: mean(y) = bias, var(y) = scale^2 * v / (v + eps).
    ax = normalize_axis(case.axis, case.x.ndim)
    y, cache = bnref.batch_norm_train(case.x, case.scale, case.bias, eps=eps, axis=case.axis)
    axes = reduce_axes(y.ndim, ax)
    v = case.x.var(axis=axes)
    std_y = np.abs(case.scale) * np.sqrt(v / (v + eps))
    np.testing.assert_allclose(
        y.mean(axis=axes), case.bias, rtol=0, atol=1e-12 * (np.abs(case.bias) + std_y).max() + 1e-13
    )
    np.testing.assert_allclose(y.var(axis=axes), case.scale**2 * v / (v + eps), rtol=1e-9)


@given(case=bn_cases(np.float64), a=st.floats(1e-3, 1e3), b=st.floats(-1e3, 1e3))
def test_train_invariant_to_shift_and_positive_scale(case, a, b):
    # y(a*x + b; eps * a^2) == y(x; eps): eps must scale with the variance for exact invariance.
    eps = 1e-4
    ax = normalize_axis(case.axis, case.x.ndim)
    shp = channel_shape(case.x.ndim, ax, -1)
    std = case.x.std(axis=reduce_axes(case.x.ndim, ax)).reshape(shp)
    x = case.x / std  # unit-variance channels keep b meaningful against the data
    y1, _ = bnref.batch_norm_train(x, case.scale, case.bias, eps=eps, axis=case.axis)
    y2, _ = bnref.batch_norm_train(a * x + b, case.scale, case.bias, eps=eps * a * a, axis=case.axis)
    np.testing.assert_allclose(y2, y1, rtol=0, atol=1e-9 * (1 + abs(b) / a) * np.abs(case.scale).max())


@given(case=bn_cases(np.float64))
def test_train_equivariant_under_batch_permutation(case):
    perm = np.random.default_rng(0).permutation(case.x.shape[0])
    y, _ = bnref.batch_norm_train(case.x, case.scale, case.bias, axis=case.axis)
    yp, _ = bnref.batch_norm_train(case.x[perm], case.scale, case.bias, axis=case.axis)
    np.testing.assert_allclose(yp, y[perm], rtol=1e-12, atol=1e-12)


@given(case=st.sampled_from(DTYPES).flatmap(lambda dt: bn_cases(dt)))
def test_eval_matches_naive(case):
    eps = 1e-3
    ax = normalize_axis(case.axis, case.x.ndim)
    y = bnref.batch_norm_eval(
        case.x, case.scale, case.bias, case.running_mean, case.running_var, eps=eps, axis=case.axis
    )
    assert y.dtype == case.x.dtype
    ref = naive_eval(case.x, case.scale, case.bias, case.running_mean, case.running_var, eps, ax)
    shp = channel_shape(y.ndim, ax, -1)
    x_hat = (case.x.astype(np.float64) - case.running_mean.astype(np.float64).reshape(shp)) / np.sqrt(
        case.running_var.astype(np.float64).reshape(shp) + eps
    )
    ulp = np.finfo(case.x.dtype).eps if case.x.dtype != np.float64 else 1e-12
    assert np.all(np.abs(y.astype(np.float64) - ref) <= ulp * _natural(x_hat, case.scale, case.bias, ax))


def test_eval_with_batch_statistics_equals_train():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 3, 2)) * 4 + 2
    s, b = rng.standard_normal(5), rng.standard_normal(5)
    y, cache = bnref.batch_norm_train(x, s, b, eps=1e-3)
    y2 = bnref.batch_norm_eval(x, s, b, cache.mean, cache.var, eps=1e-3)
    np.testing.assert_allclose(y2, y, rtol=1e-14, atol=1e-14)


def test_channels_last_equals_transposed_channels_first():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    s, b = rng.standard_normal(3), rng.standard_normal(3)
    y1, _ = bnref.batch_norm_train(x, s, b, axis=1)
    y2, _ = bnref.batch_norm_train(np.moveaxis(x, 1, -1), s, b, axis=-1)
    np.testing.assert_array_equal(np.moveaxis(y2, -1, 1), y1)


def test_each_parameter_changes_the_output():
    # ONNX's own epsilon=1e-2 case was once computed with 1e-5: check every knob matters.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 2)) * 0.05
    s, b = rng.standard_normal(3), rng.standard_normal(3)
    base, _ = bnref.batch_norm_train(x, s, b, eps=1e-5)
    assert not np.allclose(bnref.batch_norm_train(x, s, b, eps=1e-2)[0], base)
    assert not np.allclose(bnref.batch_norm_train(x, s * 2, b)[0], base)
    assert not np.allclose(bnref.batch_norm_train(x, s, b + 1)[0], base)
    ev = bnref.batch_norm_eval(x, s, b, np.zeros(3), np.ones(3), eps=1e-5)
    assert not np.allclose(bnref.batch_norm_eval(x, s, b, np.ones(3), np.ones(3), eps=1e-5), ev)
    assert not np.allclose(bnref.batch_norm_eval(x, s, b, np.zeros(3), 2 * np.ones(3), eps=1e-5), ev)


def test_nan_propagates_like_frameworks():
    x = np.ones((4, 2, 3))
    x[1, 0, 2] = np.nan
    y, _ = bnref.batch_norm_train(x + np.arange(3), None, None)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()


def test_affine_none_means_identity_affine():
    x = np.random.default_rng(0).standard_normal((5, 3))
    y1, _ = bnref.batch_norm_train(x, None, None)
    y2, _ = bnref.batch_norm_train(x, np.ones(3), np.zeros(3))
    np.testing.assert_array_equal(y1, y2)


# -- backward -------------------------------------------------------------------------------------


def _central_diff(f, arr, h):
    g = np.zeros_like(arr)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = arr[i]
        arr[i] = old + h
        fp = f()
        arr[i] = old - h
        fm = f()
        arr[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


small_cases = bn_cases(
    np.float64,
    shape_axis=shapes_and_axes(max_rank=4, max_side=3, max_batch=4),
    min_log10_std=-1,
    max_log10_std=1,
)


@settings(max_examples=25)
@given(case=small_cases)
def test_train_backward_matches_central_differences(case):
    eps = 1e-3
    x, s, b, dy = case.x.copy(), case.scale.copy(), case.bias.copy(), case.dy
    assert not np.allclose(dy, dy.flat[0])  # random upstream gradient, never constant

    def loss():
        return float(np.sum(dy * bnref.batch_norm_train(x, s, b, eps=eps, axis=case.axis)[0]))

    _, cache = bnref.batch_norm_train(x, s, b, eps=eps, axis=case.axis)
    dx, ds, db = bnref.batch_norm_train_backward(dy, cache)
    h = 1e-6
    np.testing.assert_allclose(
        dx,
        _central_diff(loss, x, h * np.abs(x).max()),
        rtol=1e-5,
        atol=1e-6 * np.abs(dx).max() + 1e-9,
    )
    np.testing.assert_allclose(ds, _central_diff(loss, s, h), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, _central_diff(loss, b, h), rtol=1e-6, atol=1e-7)


@settings(max_examples=25)
@given(case=small_cases)
def test_eval_backward_matches_central_differences(case):
    eps = 1e-3
    x, s, b, dy = case.x.copy(), case.scale.copy(), case.bias.copy(), case.dy
    rm, rv = case.running_mean, case.running_var

    def loss():
        return float(np.sum(dy * bnref.batch_norm_eval(x, s, b, rm, rv, eps=eps, axis=case.axis)))

    dx, ds, db = bnref.batch_norm_eval_backward(dy, x, s, rm, rv, eps=eps, axis=case.axis)
    h = 1e-6
    # The loss is linear in x, so the central difference errs only by rounding: each loss is a
    # sum of terms dy * y evaluated to a few eps64 of sum|dy * y|, divided by 2h.
    y = bnref.batch_norm_eval(x, s, b, rm, rv, eps=eps, axis=case.axis)
    rounding = 8 * np.finfo(np.float64).eps * float(np.sum(np.abs(dy * y))) / h
    np.testing.assert_allclose(dx, _central_diff(loss, x, h), rtol=1e-6, atol=1e-8 + rounding)
    np.testing.assert_allclose(ds, _central_diff(loss, s, h), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, _central_diff(loss, b, h), rtol=1e-6, atol=1e-7)


@given(case=st.sampled_from([np.float32, np.float64]).flatmap(lambda dt: bn_cases(dt)))
def test_train_backward_removes_normalized_directions(case):
    # Per channel sum(dx) = 0 and, with eps = 0, sum(dx * x_hat) = 0 (with eps > 0 the second is
    # only (eps / (v + eps)) * gamma * inv_std * sum(dy * x_hat)), relative to the size of the terms.
    ax = normalize_axis(case.axis, case.x.ndim)
    axes = reduce_axes(case.x.ndim, ax)
    _, cache = bnref.batch_norm_train(case.x, case.scale, case.bias, eps=0.0, axis=case.axis)
    dx, _, _ = bnref.batch_norm_train_backward(case.dy, cache)
    shp = channel_shape(case.x.ndim, ax, -1)
    x_hat = (case.x.astype(np.float64) - cache.mean.reshape(shp)) * cache.inv_std.reshape(shp)
    dx64 = dx.astype(np.float64)
    ulp = np.finfo(case.x.dtype).eps
    n = cache.moments.count
    # Natural scale of each term: |gamma| * inv_std * |dy| (dx itself may be exactly zero), times
    # the conditioning 1 + |mean|/std of x - mean, which sets the rounding error of x_hat.
    size = (
        np.abs(case.scale.astype(np.float64))
        * cache.inv_std
        * np.sum(np.abs(case.dy.astype(np.float64)), axis=axes)
        * (1 + np.abs(cache.mean) * cache.inv_std)
    )
    assert np.all(np.abs(dx64.sum(axis=axes)) <= 4 * n * ulp * size)
    assert np.all(np.abs((dx64 * x_hat).sum(axis=axes)) <= 4 * n * ulp * size)


def test_all_ones_upstream_gradient_gives_zero_dx():
    # Why random upstream gradients are required: with dy = 1, dx vanishes identically.
    x = np.random.default_rng(0).standard_normal((8, 3))
    _, cache = bnref.batch_norm_train(x, np.array([1.0, 2.0, 3.0]), None)
    dx, _, _ = bnref.batch_norm_train_backward(np.ones_like(x), cache)
    np.testing.assert_allclose(dx, 0, atol=1e-14)


def test_backward_returns_input_dtype():
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float16)
    _, cache = bnref.batch_norm_train(x, None, None)
    dx, ds, db = bnref.batch_norm_train_backward(x, cache)
    assert dx.dtype == ds.dtype == db.dtype == np.float16


@pytest.mark.parametrize(
    ("call", "match", "exc"),
    [
        (
            lambda: bnref.batch_norm_train(np.ones((2, 3)), np.ones(2), None),
            r"scale must have shape \(3,\)",
            ValueError,
        ),
        (
            lambda: bnref.batch_norm_train(np.ones((2, 3)), None, np.ones(4)),
            r"bias must have shape \(3,\)",
            ValueError,
        ),
        (
            lambda: bnref.batch_norm_train(np.ones((2, 3)), None, None, axis=-3),
            "axis=-3 is out of range",
            ValueError,
        ),
        (lambda: bnref.batch_norm_train(np.ones((2, 3)), None, None, eps=-1), "eps must be", ValueError),
        (lambda: bnref.batch_norm_train(np.ones(3), None, None), "rank >= 2", ValueError),
        (lambda: bnref.batch_norm_train(np.ones((0, 3)), None, None), "no values per channel", ValueError),
        (
            lambda: bnref.batch_norm_train(np.ones((2, 3)), None, None, axis=1.5),
            "axis must be an int",
            TypeError,
        ),
        (
            lambda: bnref.batch_norm_eval(np.ones((2, 3)), None, None, np.zeros(3), -np.ones(3)),
            "var must be >= 0",
            ValueError,
        ),
        (
            lambda: bnref.batch_norm_eval(np.ones((2, 3)), None, None, np.zeros(2), np.ones(3)),
            r"mean must have shape",
            ValueError,
        ),
        (
            lambda: bnref.batch_norm_train_backward(
                np.ones((2, 4)), bnref.batch_norm_train(np.ones((2, 3)), None, None)[1]
            ),
            "dy must have the shape",
            ValueError,
        ),
        (lambda: bnref.batch_norm_train_backward(np.ones((2, 3)), None), "cache must be", TypeError),
    ],
)
def test_bad_input_names_the_problem(call, match, exc):
    with pytest.raises(exc, match=match):
        call()


def test_bfloat16_with_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 3, 4)) * 3 + 5).astype(bf16)
    s, b = rng.standard_normal(3), rng.standard_normal(3)
    y, cache = bnref.batch_norm_train(x, s, b)
    assert y.dtype == bf16
    ref, _, _ = naive_train(x.astype(np.float64), s, b, 1e-5, 1)
    x_hat = (ref - b.reshape(1, 3, 1)) / s.reshape(1, 3, 1)
    # bfloat16 has 8 significant bits: the float64 answer rounded once is within one bf16 eps.
    tol = float(ml_dtypes.finfo(bf16).eps) * _natural(x_hat, s, b, 1)
    assert np.all(np.abs(y.astype(np.float64) - ref) <= tol)
    dx, ds, db = bnref.batch_norm_train_backward(rng.standard_normal(x.shape).astype(bf16), cache)
    assert dx.dtype == ds.dtype == db.dtype == bf16
