"""Framework conventions: EMA closed forms, momentum meanings, Bessel correction, cumulative average."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnref
from bnref import conventions as cv
from tests.reference import to_rows


def _batches(seed, k, c=3, n=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        m = int(rng.integers(2, 9)) if n is None else n
        out.append(rng.standard_normal((m, c)) * rng.uniform(0.5, 3, c) + rng.uniform(-2, 2, c))
    return out


@pytest.mark.parametrize("conv", cv.ALL, ids=lambda c: c.name)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 12), momentum=st.floats(0.0, 1.0))
def test_ema_closed_form_after_k_updates(conv, seed, k, momentum):
    batches = _batches(seed, k)
    r0m, r0v = np.zeros(3), np.ones(3)
    rm, rv = r0m, r0v
    for b in batches:
        rm, rv = conv.update(rm, rv, bnref.Moments.from_array(b), momentum=momentum)
    # Closed form, written independently: weight w on the batch, (1-w)^(k-i) decay.
    w = momentum if conv.name in ("pytorch", "tf_fused") else 1 - momentum
    ddof = 1 if conv.name in ("pytorch", "tf_fused") else 0
    exp_m = (1 - w) ** k * r0m + sum(
        w * (1 - w) ** (k - 1 - i) * b.mean(0) for i, b in enumerate(batches)
    )
    exp_v = (1 - w) ** k * r0v + sum(
        w * (1 - w) ** (k - 1 - i) * b.var(0, ddof=ddof) for i, b in enumerate(batches)
    )
    np.testing.assert_allclose(rm, exp_m, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(rv, exp_v, rtol=1e-12, atol=1e-13)


def test_momentum_meanings_agree_where_frameworks_do():
    # PyTorch momentum 0.1 == ONNX/Keras momentum 0.9 on the mean; the variance then differs
    # exactly by PyTorch's Bessel factor n/(n-1).
    x = _batches(0, 1, n=5)[0]
    m = bnref.Moments.from_array(x)
    rm0, rv0 = np.zeros(3), np.zeros(3)
    pm, pv = cv.PYTORCH.update(rm0, rv0, m, momentum=0.1)
    om, ov = cv.ONNX.update(rm0, rv0, m, momentum=0.9)
    np.testing.assert_allclose(pm, om, rtol=1e-15)
    np.testing.assert_allclose(pv, ov * 5 / 4, rtol=1e-14)
    np.testing.assert_allclose(pv, 0.1 * x.var(0, ddof=1), rtol=1e-14)
    np.testing.assert_allclose(cv.KERAS.update(rm0, rv0, m)[1], 0.01 * x.var(0), rtol=1e-14)


def test_defaults_are_the_documented_ones():
    assert (cv.PYTORCH.momentum, cv.PYTORCH.eps, cv.PYTORCH.channel_axis) == (0.1, 1e-5, 1)
    assert (cv.KERAS.momentum, cv.KERAS.eps, cv.KERAS.channel_axis) == (0.99, 1e-3, -1)
    assert (cv.FLAX.momentum, cv.FLAX.eps, cv.FLAX.channel_axis) == (0.99, 1e-5, -1)
    assert (cv.ONNX.momentum, cv.ONNX.eps, cv.ONNX.channel_axis) == (0.9, 1e-5, 1)
    assert cv.PYTORCH.unbiased_running_var and not cv.KERAS.unbiased_running_var
    assert cv.FLAX.fast_variance and not cv.PYTORCH.fast_variance
    for c in cv.ALL:
        assert c.source, c.name
        assert cv.by_name(c.name.upper()) is c


def test_tf_fused_floors_eps():
    assert cv.TF_FUSED.effective_eps(1e-8) == 1.001e-5
    assert cv.TF_FUSED.effective_eps(1e-3) == 1e-3
    assert cv.PYTORCH.effective_eps(1e-8) == 1e-8


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 10), start=st.integers(0, 5))
def test_cumulative_average_is_equal_weight_per_batch(seed, k, start):
    batches = _batches(seed, k)
    rm, rv, nbt = np.full(3, 7.0), np.full(3, 9.0), 0
    for b in batches:
        rm, rv, nbt = cv.PYTORCH.update_cumulative(rm, rv, bnref.Moments.from_array(b), nbt)
    assert nbt == k
    np.testing.assert_allclose(rm, np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, np.mean([b.var(0, ddof=1) for b in batches], axis=0), rtol=1e-12)
    # ...and equals PreciseBN's mean_of_variances estimator (what update_bn computes).
    p = bnref.PreciseBN("mean_of_variances")
    for b in batches:
        p.update(bnref.Moments.from_array(b))
    np.testing.assert_allclose(rm, p.mean, rtol=1e-12)
    np.testing.assert_allclose(rv, p.var, rtol=1e-12)


def test_update_keeps_running_dtype():
    m = bnref.Moments.from_array(np.random.default_rng(0).standard_normal((4, 2)))
    rm, rv = cv.PYTORCH.update(np.zeros(2, np.float32), np.ones(2, np.float32), m)
    assert rm.dtype == rv.dtype == np.float32


def test_train_step_uses_framework_defaults():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)  # channels-last for Keras
    y, cache, rm, rv = cv.KERAS.train_step(x, None, None, np.zeros(3), np.ones(3))
    assert cache.axis == 3 and cache.eps == 1e-3
    rows = to_rows(x, 3)
    np.testing.assert_allclose(rv, 0.99 + 0.01 * rows.var(0), rtol=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m: cv.PYTORCH.update(np.zeros(3), np.ones(3), m, momentum=1.5),
            r"momentum must be in \[0, 1\]",
        ),
        (
            lambda m: cv.PYTORCH.update(np.zeros(2), np.ones(3), m),
            r"running_mean must have shape \(3,\)",
        ),
        (
            lambda m: cv.PYTORCH.update_cumulative(np.zeros(3), np.ones(3), m, -1),
            "num_batches_tracked",
        ),
        (lambda m: cv.by_name("caffe2"), "unknown convention"),
    ],
)
def test_bad_input_names_the_problem(call, match):
    m = bnref.Moments.from_array(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(ValueError, match=match):
        call(m)
