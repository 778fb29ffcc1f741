"""bnref.testing with bfloat16 (ml_dtypes): the strategies keep every result in range, a correct
bfloat16 BatchNorm passes under every convention, and planted bugs still fail at bfloat16's bound.

The implementation under test is what frameworks do with bfloat16 (measured in
docs/conformance.md: PyTorch, Keras, TensorFlow): compute in float32, round the results once.
"""

import numpy as np
import pytest
from hypothesis import given, settings

import bnref
import bnref.testing as bt
from bnref.conventions import ALL, KERAS, PYTORCH

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
BF16_MAX = float(ml_dtypes.finfo(BF16).max)


def _layout(x, axis):
    ax = axis % x.ndim
    return ax, tuple(i for i in range(x.ndim) if i != ax), [-1 if i == ax else 1 for i in range(x.ndim)]


def _bf16_bn(conv, bug=None):
    """BN in float32 from bfloat16 inputs, rounded to bfloat16; ``bug`` plants one mistake."""

    def moments(x, red):
        if bug == "fast_variance_in_bf16":  # E[x^2] - E[x]^2 with bfloat16 intermediates
            m = x.astype(BF16).mean(red, keepdims=True, dtype=BF16).astype(np.float32)
            sq = (x.astype(BF16) ** 2).mean(red, keepdims=True, dtype=BF16).astype(np.float32)
            return m, np.maximum(sq - m * m, 0)
        m = x.mean(red, keepdims=True)
        return m, ((x - m) ** 2).mean(red, keepdims=True)

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        ax, red, shp = _layout(x, axis)
        xw = x.astype(np.float32)
        mean, var = moments(xw, red)
        denom = np.sqrt(var) + eps if bug == "eps_outside_sqrt" else np.sqrt(var + eps)
        y = (xw - mean) / denom * scale.astype(np.float32).reshape(shp) + bias.astype(np.float32).reshape(shp)
        n = x.size // x.shape[ax]
        w = conv.batch_weight(momentum)
        bv = var.reshape(-1) * (n / (n - 1) if conv.unbiased_running_var else 1.0)
        new_m = (1 - w) * rm.astype(np.float32) + w * mean.reshape(-1)
        new_v = (1 - w) * rv.astype(np.float32) + w * bv
        return y.astype(BF16), new_m.astype(BF16), new_v.astype(BF16)

    def evaluate(x, scale, bias, mean, var, *, eps, axis):
        _, _, shp = _layout(x, axis)
        f = np.float32
        x_hat = (x.astype(f) - mean.astype(f).reshape(shp)) / np.sqrt(var.astype(f).reshape(shp) + eps)
        return (x_hat * scale.astype(f).reshape(shp) + bias.astype(f).reshape(shp)).astype(BF16)

    def backward(x, scale, bias, dy, *, eps, axis):
        _, red, shp = _layout(x, axis)
        xw, dyw = x.astype(np.float32), dy.astype(np.float32)
        mean, var = moments(xw, red)
        inv_std = 1 / np.sqrt(var + eps)
        x_hat = (xw - mean) * inv_std
        dx = scale.astype(np.float32).reshape(shp) * inv_std * (
            dyw - dyw.mean(red, keepdims=True) - x_hat * (dyw * x_hat).mean(red, keepdims=True))
        return dx.astype(BF16), (dyw * x_hat).sum(red).astype(BF16), dyw.sum(red).astype(BF16)

    return bt.BatchNormImpl(train=train, eval=evaluate, backward=backward)


def test_bfloat16_tolerance_is_derived_like_float16s():
    tol = bt.Tolerance.for_dtype(BF16)
    assert tol.eps == 2.0**-7 and tol.k == bt.Tolerance.for_dtype(np.float16).k == 8
    assert tol.bound == pytest.approx(0.0625)


@pytest.mark.parametrize("conv", ALL, ids=lambda c: c.name)
def test_correct_bfloat16_implementation_passes_every_convention(conv):
    bt.check_batch_norm(_bf16_bn(conv), conv, BF16, max_examples=25)


@pytest.mark.parametrize(("conv", "bug", "match"), [
    (PYTORCH, "eps_outside_sqrt", r"y \(training mode\) differs from bnref"),
    (KERAS, "fast_variance_in_bf16", r"differs from bnref"),
])
def test_wrong_bfloat16_implementation_still_fails(conv, bug, match):
    with pytest.raises(bt.Mismatch, match=match):
        bt.check_batch_norm(_bf16_bn(conv, bug), conv, BF16, max_examples=100)


@settings(max_examples=100)
@given(case=bt.bn_cases(BF16))
def test_bfloat16_cases_keep_every_result_finite(case):
    """Every result of bnref for a drawn bfloat16 case, any eps in [0, 1], rounds to a finite
    bfloat16 value at most max/4 (the derivation in bnref.testing.ranges), and the batch kept
    a non-zero spread after rounding to bfloat16 (d < 1/4 there)."""
    x = case.x.astype(np.float64)
    ax = case.axis % x.ndim
    for eps in (0.0, 1e-5, 1.0):
        y, cache = bnref.batch_norm_train(x, case.scale, case.bias, eps=eps, axis=ax)
        dx, ds, db = bnref.batch_norm_train_backward(case.dy.astype(np.float64), cache)
        for a in (y, dx, ds, db, cache.moments.var(ddof=1)):
            assert np.all(np.isfinite(a.astype(BF16).astype(np.float64)))
            assert np.max(np.abs(a)) <= BF16_MAX / 4
    assert np.all(cache.moments.var(ddof=0) > 0)
