"""bnref.testing as another project uses it: every dtype under every convention, and from inside
the user's own hypothesis tests (their settings, their profile, their example database).

The implementation under test here is what a user would write: plain NumPy BN in the working
precision (float32 for float16 inputs, as frameworks compute half-precision BN), rounded to the
input dtype; independent of bnref's kernels. Its deliberately wrong variants must still fail.
"""

import ast
import re

import numpy as np
import pytest
from hypothesis import given, reproduce_failure, settings
from hypothesis.database import InMemoryExampleDatabase

import bnref.testing as bt
from bnref.conventions import ALL, KERAS, PYTORCH, TF_FUSED

DTYPES = [np.float16, np.float32, np.float64]
F16 = np.finfo(np.float16)


def _layout(x, axis):
    ax = axis % x.ndim
    return ax, tuple(i for i in range(x.ndim) if i != ax), [-1 if i == ax else 1 for i in range(x.ndim)]


def _user_bn(conv, *, biased_running_var=False, eps_outside_sqrt=False, momentum_flipped=False,
             seen=None):
    """A straightforward BN in the working precision, with optional classic mistakes."""

    def work(a, dt):
        return a.astype(np.float32 if dt == np.float16 else dt)

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        if seen is not None:
            seen.append(x.copy())
        dt = x.dtype
        ax, red, shp = _layout(x, axis)
        xw = work(x, dt)
        mean = xw.mean(red, keepdims=True)
        var = ((xw - mean) ** 2).mean(red, keepdims=True)
        denom = np.sqrt(var) + eps if eps_outside_sqrt else np.sqrt(var + eps)
        y = (xw - mean) / denom * work(scale, dt).reshape(shp) + work(bias, dt).reshape(shp)
        n = x.size // x.shape[ax]
        bessel = n / (n - 1) if conv.unbiased_running_var and not biased_running_var else 1.0
        w = conv.batch_weight(momentum)
        w = 1.0 - w if momentum_flipped else w
        new_m = (1 - w) * work(rm, dt) + w * mean.reshape(-1)
        new_v = (1 - w) * work(rv, dt) + w * var.reshape(-1) * bessel
        return y.astype(dt), new_m.astype(dt), new_v.astype(dt)

    def evaluate(x, scale, bias, mean, var, *, eps, axis):
        dt = x.dtype
        _, _, shp = _layout(x, axis)
        x_hat = (work(x, dt) - work(mean, dt).reshape(shp)) / np.sqrt(work(var, dt).reshape(shp) + eps)
        return (x_hat * work(scale, dt).reshape(shp) + work(bias, dt).reshape(shp)).astype(dt)

    def backward(x, scale, bias, dy, *, eps, axis):
        dt = x.dtype
        _, red, shp = _layout(x, axis)
        xw, dyw = work(x, dt), work(dy, dt)
        mean = xw.mean(red, keepdims=True)
        inv_std = 1 / np.sqrt(((xw - mean) ** 2).mean(red, keepdims=True) + eps)
        x_hat = (xw - mean) * inv_std
        dscale, dbias = (dyw * x_hat).sum(red), dyw.sum(red)
        dx = work(scale, dt).reshape(shp) * inv_std * (
            dyw - dyw.mean(red, keepdims=True) - x_hat * (dyw * x_hat).mean(red, keepdims=True)
        )
        return dx.astype(dt), dscale.astype(dt), dbias.astype(dt)

    return bt.BatchNormImpl(train=train, eval=evaluate, backward=backward)


# -- item 1: every dtype under every convention --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("conv", ALL, ids=lambda c: c.name)
def test_correct_implementation_passes_every_convention_in_every_dtype(conv, dtype):
    bt.check_batch_norm(_user_bn(conv), conv, dtype, max_examples=20)


def test_correct_float16_implementation_passes_many_cases():
    """The case PyTorch float16 used to fail on: running_var overflowed float16 to inf."""
    bt.check_batch_norm(_user_bn(PYTORCH), PYTORCH, np.float16, max_examples=150)
    bt.check_batch_norm(_user_bn(TF_FUSED), TF_FUSED, np.float16, max_examples=60)


@pytest.mark.parametrize(
    ("conv", "bug", "match"),
    [
        (PYTORCH, "biased_running_var", r"running_var differs from bnref at index \(\d+,\)"),
        (TF_FUSED, "biased_running_var", r"running_var differs from bnref"),
        (PYTORCH, "eps_outside_sqrt", r"y \(training mode\) differs from bnref at index .* \(channel"),
        (KERAS, "eps_outside_sqrt", r"y \(training mode\) differs from bnref"),
        (KERAS, "momentum_flipped", r"running_mean differs from bnref"),
    ],
    ids=["pytorch-biased_running_var", "tf_fused-biased_running_var", "pytorch-eps_outside_sqrt",
         "keras-eps_outside_sqrt", "keras-momentum_flipped"],
)
def test_wrong_float16_implementation_still_fails(conv, bug, match):
    with pytest.raises(bt.Mismatch, match=match):
        bt.check_batch_norm(_user_bn(conv, **{bug: True}), conv, np.float16, max_examples=100)


def _results(case, eps):
    """Every result of bnref for the case in float64, with the natural scale of dx."""
    import bnref

    x, ax = case.x.astype(np.float64), case.axis % case.x.ndim
    _, red, shp = _layout(x, case.axis)
    y, cache = bnref.batch_norm_train(x, case.scale, case.bias, eps=eps, axis=ax)
    dx, ds, db = bnref.batch_norm_train_backward(case.dy.astype(np.float64), cache)
    y_eval = bnref.batch_norm_eval(x, case.scale.astype(np.float64), case.bias.astype(np.float64),
                                   case.running_mean, case.running_var, eps=eps, axis=ax)
    m = cache.moments
    dy = case.dy.astype(np.float64)
    x_hat = (x - cache.mean.reshape(shp)) * cache.inv_std.reshape(shp)
    rms = np.sqrt(np.mean(dy * dy, axis=red, keepdims=True))
    dx_scale = (np.abs(case.scale.astype(np.float64)) * cache.inv_std).reshape(shp) * (
        np.abs(dy) + rms * (1 + np.abs(x_hat)))
    # Running statistics are convex combinations of old and batch values for any momentum.
    big = [x, y, y_eval, dx, ds, db, m.mean, m.var(ddof=1), m.var(ddof=0)]
    return big, dx_scale


@settings(max_examples=150)
@given(case=bt.bn_cases(np.float16))
def test_float16_cases_keep_every_result_finite_and_normal(case):
    """The derived bounds (bnref.testing.ranges) hold for every drawn case: each result of bnref
    (every convention, any momentum, eps in [0, 1]) is <= max/4 in magnitude, and the natural
    scale of dx, the only one that can shrink, stays above float16's smallest normal."""
    for eps in (0.0, 1e-5, 1e-3, 1.0):
        big, dx_scale = _results(case, eps)
        for a in big:
            assert np.all(np.isfinite(a)) and np.max(np.abs(a)) <= F16.max / 4
        if eps <= 1e-3:
            assert dx_scale.min() >= F16.tiny
    assert np.all(np.abs(case.running_mean.astype(np.float64)) <= 4)
    assert np.all(case.running_var.astype(np.float64) >= 0.5)


def test_std_range_per_dtype():
    # float32/float64 keep the documented default [1e-3, 1e3] for the default shapes.
    for dt in (np.float32, np.float64):
        assert bt.std_range(dt, 1728, 10.0) == (1e-3, 1e3)
    lo, hi = bt.std_range(np.float16, 2, 10.0)
    assert lo == 1e-3 and 88 < hi < 90  # running_var: 2 * hi**2 <= max/4
    lo, hi = bt.std_range(np.float16, 1728, 10.0)  # the largest default channel (8 * 6**3)
    assert 0.0103 < lo < 0.0106 and 87 < hi < 89  # lo: dx <= 4 * sqrt(n - 1) / std <= max/4
    with pytest.raises(ValueError, match="too large for float16"):
        bt.bn_cases(np.float16, max_abs_mean_over_std=1000.0)
    with pytest.raises(ValueError, match="no std in"):
        bt.std_range(np.float16, 8, 10.0, lo=1e3, hi=1e4)


# -- item 2: from the user's own hypothesis test ----------------------------------------------------


_USER_DB = InMemoryExampleDatabase()
_SEEN: list[np.ndarray] = []
_FLIPPED = _user_bn(PYTORCH, momentum_flipped=True, seen=_SEEN)


def _body(case):
    bt.check_case(_FLIPPED, PYTORCH, case)


@settings(max_examples=5, database=_USER_DB, print_blob=True)
@given(case=bt.bn_cases(np.float32))
def users_bn_property(case):
    """A user's own property test: their settings, their example database."""
    _body(case)


def _notes(exc):
    return "\n".join(getattr(exc, "__notes__", []))


def test_users_given_test_finds_saves_and_replays_a_mismatch():
    _USER_DB.data.clear()
    _SEEN.clear()
    with pytest.raises(bt.Mismatch, match="running_mean differs from bnref") as first:
        users_bn_property()
    assert first.value.quantity == "running_mean"
    assert re.search(r"\[convention pytorch, eps 1e-05, momentum 0\.1; BNCase\(shape=", str(first.value))
    assert re.search(r"(Falsifying example|Failing test case): users_bn_property\(\s*"
                     r"case=BNCase\(shape=\(\d+, [\d, ]*\), axis=-?\d, dtype=float32\)", _notes(first.value))
    assert any(_USER_DB.data.values()), "the falsifying example is saved in the user's database"
    falsifying = _SEEN[-1]
    _SEEN.clear()
    with pytest.raises(bt.Mismatch):
        users_bn_property()
    assert np.array_equal(_SEEN[0], falsifying), "the second run starts with the saved example"
    # The printed @reproduce_failure reproduces it too.
    blob = re.search(r"@reproduce_failure\((.*?)\)", _notes(first.value))
    assert blob, _notes(first.value)
    version, data = ast.literal_eval(f"({blob.group(1)})")
    _SEEN.clear()
    with pytest.raises(bt.Mismatch):
        reproduce_failure(version, data)(given(case=bt.bn_cases(np.float32))(_body))()
    assert np.array_equal(_SEEN[0], falsifying)


@settings(max_examples=10)
@given(case=bt.bn_cases(np.float16))
def test_check_case_defaults_its_tolerance_to_the_case_dtype(case):
    worst = bt.check_case(_user_bn(PYTORCH), PYTORCH, case)
    assert set(worst) == {"y_train", "running_mean", "running_var", "y_eval", "dx", "dscale", "dbias"}
    assert max(worst.values()) <= 1.0


def test_check_batch_norm_honors_the_loaded_profile_and_its_database():
    db = InMemoryExampleDatabase()
    previous = settings.get_current_profile_name()
    settings.register_profile("bnref-user-test", parent=settings.get_profile(previous),
                              max_examples=7, database=db)
    settings.load_profile("bnref-user-test")
    try:
        seen: list[np.ndarray] = []
        bt.check_batch_norm(_user_bn(PYTORCH, seen=seen), PYTORCH, np.float32)
        assert 0 < len(seen) <= 7, "max_examples comes from the user's profile"
        seen.clear()
        wrong = _user_bn(PYTORCH, momentum_flipped=True, seen=seen)
        with pytest.raises(bt.Mismatch):
            bt.check_batch_norm(wrong, PYTORCH, np.float32)
        assert any(db.data.values()), "the failure is saved in the profile's database"
        falsifying = seen[-1]
        seen.clear()
        with pytest.raises(bt.Mismatch):
            bt.check_batch_norm(wrong, PYTORCH, np.float32)
        assert np.array_equal(seen[0], falsifying), "and replayed first on the next run"
    finally:
        settings.load_profile(previous)
