"""bnref.testing: the strategies draw what they promise, and the harness catches real mistakes."""

import numpy as np
import pytest
from hypothesis import given

import bnref
import bnref.testing as bt
from bnref._validation import normalize_axis
from bnref.conventions import KERAS, PYTORCH


@given(sa=bt.shapes_and_axes())
def test_shapes_and_axes_are_valid(sa):
    shape, axis = sa
    assert 2 <= len(shape) <= 5
    ax = normalize_axis(axis, len(shape))
    assert ax != 0
    assert np.prod(shape) // shape[ax] >= 2


@given(case=bt.bn_cases(np.float32))
def test_bn_cases_are_well_formed(case):
    assert case.x.dtype == case.dy.dtype == np.float32
    assert case.dy.shape == case.x.shape and not np.all(case.dy == 1)
    c = case.x.shape[normalize_axis(case.axis, case.x.ndim)]
    assert case.scale.shape == case.bias.shape == case.running_var.shape == (c,)
    assert np.all(case.running_var > 0)
    # The bounds bnref.testing.ranges derives from: |gamma| in [0.2, 2], |beta|, |running_mean|
    # <= 4, running_var in [0.5, 2], dy with rms 1 per channel.
    assert np.all((np.abs(case.scale) >= np.float32(0.2)) & (np.abs(case.scale) <= 2))
    assert np.all(np.abs(case.bias) <= 4) and np.all(np.abs(case.running_mean) <= 4)
    assert np.all((case.running_var >= 0.5) & (case.running_var <= 2))
    ax = normalize_axis(case.axis, case.x.ndim)
    red = tuple(i for i in range(case.x.ndim) if i != ax)
    np.testing.assert_allclose(np.sqrt(np.mean(case.dy.astype(np.float64) ** 2, axis=red)), 1, rtol=1e-6)


def _oracle_impl(conv, var_ddof=None, eps_outside=False, momentum_flip=False):
    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        y, cache = bnref.batch_norm_train(x, scale, bias, eps=eps, axis=axis)
        if eps_outside:
            ax = normalize_axis(axis, x.ndim)
            shp = [1] * x.ndim
            shp[ax] = -1
            y = (x - cache.mean.reshape(shp)) / (
                np.sqrt(cache.var).reshape(shp) + eps
            ) * scale.reshape(shp) + bias.reshape(shp)
        w = conv.batch_weight(momentum)
        if momentum_flip:
            w = 1 - w
        v = cache.moments.var(
            ddof=var_ddof if var_ddof is not None else int(conv.unbiased_running_var)
        )
        return y.astype(x.dtype), (1 - w) * rm + w * cache.mean, (1 - w) * rv + w * v

    def backward(x, scale, bias, dy, *, eps, axis):
        _, cache = bnref.batch_norm_train(x, scale, bias, eps=eps, axis=axis)
        return bnref.batch_norm_train_backward(dy, cache)

    def evaluate(x, scale, bias, mean, var, *, eps, axis):
        return bnref.batch_norm_eval(x, scale, bias, mean, var, eps=eps, axis=axis)

    return bt.BatchNormImpl(train=train, eval=evaluate, backward=backward)


@pytest.mark.parametrize("conv", [PYTORCH, KERAS], ids=lambda c: c.name)
def test_correct_implementation_passes(conv):
    bt.check_batch_norm(_oracle_impl(conv), conv, np.float32, max_examples=30)


@pytest.mark.parametrize(
    ("impl", "match"),
    [
        (_oracle_impl(PYTORCH, var_ddof=0), "running_var differs from bnref"),
        (
            _oracle_impl(PYTORCH, eps_outside=True),
            r"y \(training mode\) differs from bnref at index .* \(channel \d+\)",
        ),
        (_oracle_impl(PYTORCH, momentum_flip=True), "running_mean differs from bnref"),
    ],
    ids=["biased_running_var", "eps_outside_sqrt", "momentum_meaning_flipped"],
)
def test_wrong_implementation_fails_with_counterexample(impl, match):
    with pytest.raises(AssertionError, match=match):
        bt.check_batch_norm(impl, PYTORCH, np.float32, max_examples=50)


def test_tolerance_per_dtype():
    assert bt.Tolerance.for_dtype(np.float32).bound == 64 * np.finfo(np.float32).eps
    assert bt.Tolerance.for_dtype(np.float16).eps == np.finfo(np.float16).eps
    with pytest.raises(AssertionError, match=r"q differs from bnref at index \(1,\)"):
        bt.assert_within(
            "q",
            np.array([1.0, 2.0]),
            np.array([1.0, 2.1]),
            np.ones(2),
            bt.Tolerance.for_dtype(np.float32),
        )


def test_eps_override_reaches_the_implementation():
    seen = []
    impl = _oracle_impl(PYTORCH)

    def spy(x, scale, bias, rm, rv, *, eps, momentum, axis):
        seen.append(eps)
        return impl.train(x, scale, bias, rm, rv, eps=eps, momentum=momentum, axis=axis)

    bt.check_batch_norm(bt.BatchNormImpl(train=spy), PYTORCH, np.float32, eps=1e-2, max_examples=5)
    assert set(seen) == {1e-2}
