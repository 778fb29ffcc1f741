"""The accuracy contract of the fast (blocked, threaded) kernels (docs/guarantees.md: Numerical contract).

References are computed here, independently of bnref: per channel in extended precision
(np.longdouble where it is the 80-bit x87 format, else exactly rounded sums with math.fsum),
as a plain two-pass computation over the whole channel.

Contract checked:
* statistics: mean within 1e-12 * (|mean| + std), M2 within 1e-12 * M2, also for
  |mean| >> std, for any block size and thread count;
* float32 input: |out - out64| <= 4 * eps32 * natural_scale for y, dx, dscale, dbias; the tests
  check the tighter bounds bnref/_kernels/forward.py and backward.py prove (y: the float64
  answer rounded once, 0.5 eps32 + 2**-9 eps32 — or 2 eps32 on the opt-in float32 forward
  path; training dx, a float32 path: 2.5 eps32; inference dx: 1 eps32; sums: 1 eps32; all
  times 1 + 2**-18 for second-order terms),
  including |mean| / std up to ~1e9 (where the float32 path hands channels to float64) and the
  worst case for the float32 path (|mean - float32(mean)| ~ std);
* float64 input: a few ulp (8 * eps64 * natural_scale, observed <= 3.7; sums: 2 * log2(n) * eps64).
"""

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import bnref
from bnref import runtime

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
EXTENDED = float(np.finfo(np.longdouble).eps) < 1e-18
FACTOR64 = 8.0  # "a few ulp": observed <= 3.7 eps64 over thousands of examples


# -- independent references -----------------------------------------------------------------------


def _columns(x, axis):
    """(n, C) array: every value of a channel in one column (a copy, any layout)."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    return x.reshape(-1, x.shape[-1])


def ref_stats(x, axis):
    """Per-channel compensated two-pass in extended precision: (mean_hi, mean_lo, M2).

    ``mean_hi + mean_lo`` is the mean to well below eps64 * std even when |mean| >> std (the
    extended-precision mean alone carries a representation error of eps_ld * |mean|).
    """
    cols = _columns(x, axis)
    n = cols.shape[0]
    if EXTENDED:
        c = cols.astype(np.longdouble)
        hi = c.sum(axis=0) / n
        d = c - hi  # exact: Sterbenz, or far below eps64 relative
        lo = d.sum(axis=0) / n
        m2 = (d * d).sum(axis=0) - d.sum(axis=0) ** 2 / n
        return hi, lo, m2
    cols = cols.T.astype(np.float64)
    hi = np.array([math.fsum(col) / n for col in cols])
    lo = np.array([math.fsum(col - m) / n for col, m in zip(cols, hi, strict=True)])
    m2 = np.array([math.fsum((col - m - r) ** 2) for col, m, r in zip(cols, hi, lo, strict=True)])
    return hi, lo, m2


def _centered(x, axis):
    """(x - mean) per column, compensated, in the reference precision; and the count."""
    lp = np.longdouble if EXTENDED else np.float64
    hi, lo, m2 = ref_stats(x, axis)
    return (_columns(x, axis).astype(lp) - hi) - lo, hi + lo, m2


def ref_train(x, dy, scale, bias, eps, axis):
    """Forward and backward of training-mode BN from the formulas, in extended precision."""
    lp = np.longdouble if EXTENDED else np.float64
    d, _, m2 = _centered(x, axis)
    n = d.shape[0]
    g = _columns(dy, axis).astype(lp)
    inv_std = 1 / np.sqrt(m2 / n + lp(eps))
    xh = d * inv_std
    gamma, beta = np.asarray(scale, lp), np.asarray(bias, lp)
    y = xh * gamma + beta
    dbias = g.sum(axis=0)
    dscale = (g * xh).sum(axis=0)
    k = gamma * inv_std
    dx = k * (g - dbias / n - xh * dscale / n)
    scales = {
        "y": np.abs(gamma) * (1 + np.abs(xh)) + np.abs(beta),
        # Sums of magnitudes, not |dbias|, |dscale|: those two may cancel to ~0.
        "dx": np.abs(k) * (np.abs(g) + np.abs(g).sum(axis=0) / n + np.abs(xh) * np.abs(g * xh).sum(axis=0) / n),
        "dscale": np.abs(g * xh).sum(axis=0),
        "dbias": np.abs(g).sum(axis=0),
    }
    return {"y": y, "dx": dx, "dscale": dscale, "dbias": dbias}, scales, n


def ref_eval(x, dy, scale, bias, mean, var, eps, axis):
    lp = np.longdouble if EXTENDED else np.float64
    c = _columns(x, axis).astype(lp)
    g = _columns(dy, axis).astype(lp)
    inv_std = 1 / np.sqrt(np.asarray(var, lp) + lp(eps))
    xh = (c - np.asarray(mean, lp)) * inv_std
    gamma, beta = np.asarray(scale, lp), np.asarray(bias, lp)
    k = gamma * inv_std
    out = {"y": xh * gamma + beta, "dx": g * k, "dscale": (g * xh).sum(axis=0), "dbias": g.sum(axis=0)}
    scales = {
        "y": np.abs(gamma) * (1 + np.abs(xh)) + np.abs(beta),
        "dx": np.abs(k) * np.abs(g),
        "dscale": np.abs(g * xh).sum(axis=0),
        "dbias": np.abs(g).sum(axis=0),
    }
    return out, scales


def check(name, got, want, scale, factor):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    err = np.abs(got - want)
    bound = factor * scale
    worst = float(np.max(err / np.where(bound > 0, bound, 1))) if err.size else 0.0
    assert np.all(err <= bound), f"{name}: worst error {worst:.3g} x the bound {factor:.3g} * scale"


CONTRACT32 = 4 * EPS32  # the numerical contract (docs/guarantees.md) for float32 input
SECOND_ORDER = 1 + 2.0**-18  # slack for the O(eps32**2) terms the proofs drop
#: Bounds proved in bnref/_kernels/forward.py and backward.py for float32 input, in units of eps32:
#: y is the float64 answer rounded once (0.5 + 2**-10 for the fused x*a + b' form), or, with
#: the opt-in float32 forward path, within 2 eps32.
PROVED32 = {"y": 0.5 + 2.0**-9, "y_float32_path": 2.0, "dx": 2.5, "eval_dx": 1.0,
            "dscale": 1.0, "dbias": 1.0}


def bounds_for(dtype, n, mode="train", float32_forward=False):
    """Per-output factors (times the natural scale) the kernels achieve for this dtype."""
    if dtype == np.float32:
        f = {k: v * EPS32 * SECOND_ORDER for k, v in PROVED32.items()}
        assert max(f.values()) <= CONTRACT32
        if mode == "eval":
            f["dx"] = f["eval_dx"]
        if float32_forward:
            f["y"] = f["y_float32_path"]
        return f
    elem, red = FACTOR64 * EPS64, 2 * max(1.0, math.log2(n)) * EPS64
    return {"y": elem, "dx": elem, "dscale": red, "dbias": red}


def check_all(got, want, scales, bounds, axis):
    for name in ("y", "dx"):
        check(name, _columns(got[name], axis), want[name], scales[name], bounds[name])
    for name in ("dscale", "dbias"):
        check(name, got[name], want[name], scales[name], bounds[name])


# -- strategies -----------------------------------------------------------------------------------


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5), label="ndim")
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim), label="shape"))
    axis = draw(st.integers(-ndim, ndim - 1).filter(lambda a: a % ndim != 0), label="axis")
    assume(math.prod(shape) // shape[axis] >= 2)
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    # |loc| / spread up to ~1e9: beyond ~1e7 the float32 paths hand channels to float64.
    loc = draw(st.sampled_from([0.0, 1.0, -3e3, 1e4, 2.5e5, 3e6, -1e7]), label="loc")
    spread = draw(st.sampled_from([1.0, 1e-2, 30.0]), label="spread")
    layout = draw(st.sampled_from(["c", "channels_last", "sliced"]), label="layout")
    block = draw(st.sampled_from([1, 5, 64, None]), label="block_elems")
    threads = draw(st.sampled_from([1, 2]), label="threads")
    fast = draw(st.booleans(), label="float32_forward")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    C = shape[axis]
    ch_loc = loc * (1 + 0.1 * rng.standard_normal(C))  # per-channel offsets around loc
    x = rng.standard_normal(shape) * spread
    x += ch_loc.reshape([C if i == axis % ndim else 1 for i in range(ndim)])
    x = x.astype(dtype)
    if layout == "channels_last":  # same values, channel axis innermost in memory
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, axis, -1)), -1, axis)
    elif layout == "sliced":  # not a permutation of a contiguous array
        big = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
        big[..., ::2] = x
        x = big[..., ::2]
    dy = rng.standard_normal(shape).astype(dtype)
    scale = (rng.standard_normal(C) * 2).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    return x, dy, scale, bias, axis, (block, threads, fast)


# -- statistics -----------------------------------------------------------------------------------


@given(cases())
def test_statistics_within_1e_12_of_extended_two_pass(case):
    x, _, _, _, axis, (block, threads, _) = case
    with runtime.tuning(block_elems=block, threads=threads, parallel_min=0):
        m = bnref.Moments.from_array(x, axis)
    _, mean, m2 = _centered(x, axis)
    n = m.count
    std = np.sqrt(np.asarray(m2 / n, np.float64))
    mean64 = np.asarray(mean, np.float64)
    check("mean", m.mean, mean64, np.abs(mean64) + std, 1e-12)
    floor = n * (4 * EPS64 * np.abs(mean64)) ** 2  # constant data: M2 = 0 up to this
    check("M2", m.m2, m2, np.asarray(m2, np.float64) + floor, 1e-12)
    check("var", m.var(0), m2 / n, np.asarray(m2 / n, np.float64) + floor / n, 1e-12)


def test_statistics_far_from_zero_exact():
    # |mean| >> std: 1e4 + N(0, 1) in float32; E[x^2] - E[x]^2 would lose everything here.
    rng = np.random.default_rng(1)
    x = (1e4 + rng.standard_normal((64, 3, 28, 28))).astype(np.float32)
    for block in (37, None):
        with runtime.tuning(block_elems=block):
            m = bnref.Moments.from_array(x, 1)
        _, mean, m2 = _centered(x, 1)
        check("mean", m.mean, mean, np.abs(np.asarray(mean, float)), 1e-12)
        check("M2", m.m2, m2, np.asarray(m2, float), 1e-12)


# -- outputs --------------------------------------------------------------------------------------


@given(cases())
def test_train_forward_backward_bounds(case):
    x, dy, scale, bias, axis, (block, threads, fast) = case
    with runtime.tuning(block_elems=block, threads=threads, parallel_min=0, float32_forward=fast):
        y, cache = bnref.batch_norm_train(x, scale, bias, eps=1e-5, axis=axis)
        dx, dscale, dbias = bnref.batch_norm_train_backward(dy, cache)
    assert y.dtype == dx.dtype == dscale.dtype == x.dtype
    want, scales, n = ref_train(x, dy, scale, bias, 1e-5, axis)
    got = {"y": y, "dx": dx, "dscale": dscale, "dbias": dbias}
    check_all(got, want, scales, bounds_for(x.dtype, n, float32_forward=fast), axis)


@given(cases())
def test_eval_forward_backward_bounds(case):
    x, dy, scale, bias, axis, (block, threads, fast) = case
    C = x.shape[axis]
    rng = np.random.default_rng(C)
    mean = _columns(x, axis).astype(np.float64).mean(axis=0) + rng.standard_normal(C)
    var = rng.uniform(0.1, 4.0, C) * np.asarray(_columns(x, axis), np.float64).std(axis=0) ** 2
    with runtime.tuning(block_elems=block, threads=threads, parallel_min=0, float32_forward=fast):
        y = bnref.batch_norm_eval(x, scale, bias, mean, var, eps=1e-5, axis=axis)
        dx, dscale, dbias = bnref.batch_norm_eval_backward(dy, x, scale, mean, var, 1e-5, axis)
    want, scales = ref_eval(x, dy, scale, bias, mean, var, 1e-5, axis)
    got = {"y": y, "dx": dx, "dscale": dscale, "dbias": dbias}
    n = _columns(x, axis).shape[0]
    check_all(got, want, scales, bounds_for(x.dtype, n, "eval", float32_forward=fast), axis)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), [((64, 8, 28, 28), 1), ((64, 28, 28, 8), -1)])
def test_contract_on_real_shapes_far_from_zero(shape, axis, dtype):
    # Realistic sizes (several blocks, both layouts) with mean 1e4, std 1.
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    scale, bias = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    y, cache = bnref.batch_norm_train(x, scale, bias, axis=axis)
    dx, dscale, dbias = bnref.batch_norm_train_backward(dy, cache)
    want, scales, n = ref_train(x, dy, scale, bias, 1e-5, axis)
    got = {"y": y, "dx": dx, "dscale": dscale, "dbias": dbias}
    check_all(got, want, scales, bounds_for(np.dtype(dtype), n), axis)


@pytest.mark.parametrize("p", [0.5, 0.4, 0.25, 0.1, 0.01])
@pytest.mark.parametrize("axis", [1, -1])
def test_float32_path_worst_case_mean_between_two_floats(p, axis):
    # Every value is 1e4 or its float32 successor (fraction p): |mean - float32(mean)| / std
    # = sqrt(p / (1 - p)) <= 1, the largest rounding of the mean the float32 forward path
    # accepts (x - float32(mean) is exact here: Sterbenz). Inference mode at the same mean.
    rng = np.random.default_rng(int(p * 100) + axis)
    lo = np.float32(1e4)
    hi = np.nextafter(lo, np.float32(np.inf))
    shape = (16, 3, 10, 10) if axis == 1 else (16, 10, 10, 3)
    x = np.where(rng.random(shape) < p, hi, lo).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    scale = (rng.standard_normal(C) * 2).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    for eps, fast in ((0.0, False), (0.0, True), (1e-12, True)):
        with runtime.tuning(float32_forward=fast):
            y, cache = bnref.batch_norm_train(x, scale, bias, eps=eps, axis=axis)
            dx, dscale, dbias = bnref.batch_norm_train_backward(dy, cache)
            mean, var = cache.mean, cache.var
            ye = bnref.batch_norm_eval(x, scale, bias, mean, var, eps, axis)
            dxe, dse, dbe = bnref.batch_norm_eval_backward(dy, x, scale, mean, var, eps, axis)
        want, scales, n = ref_train(x, dy, scale, bias, eps, axis)
        got = {"y": y, "dx": dx, "dscale": dscale, "dbias": dbias}
        check_all(got, want, scales, bounds_for(np.float32, n, float32_forward=fast), axis)
        want, scales = ref_eval(x, dy, scale, bias, mean, var, eps, axis)
        got = {"y": ye, "dx": dxe, "dscale": dse, "dbias": dbe}
        check_all(got, want, scales, bounds_for(np.float32, n, "eval", float32_forward=fast), axis)


# -- determinism and NaN --------------------------------------------------------------------------


def test_results_independent_of_thread_count():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 5, 9, 11)).astype(np.float32) + 100
    dy = rng.standard_normal(x.shape).astype(np.float32)
    outs = []
    for threads in (1, 2, 3):
        with runtime.tuning(block_elems=50, threads=threads, parallel_min=0):
            y, cache = bnref.batch_norm_train(x, None, None)
            outs.append((y, *bnref.batch_norm_train_backward(dy, cache), cache.mean, cache.var))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("axis", [1, -1])
def test_nan_propagates_to_its_channel_only(axis):
    x = np.random.default_rng(4).standard_normal((8, 4, 6, 5))
    x[3, 2, 1, 0] = np.nan
    ch = 2 if axis == 1 else 0
    with runtime.tuning(block_elems=16):
        y, cache = bnref.batch_norm_train(x, None, None, axis=axis)
    yc = np.moveaxis(y, axis, -1)
    bad = np.zeros(x.shape[axis], bool)
    bad[ch] = True
    assert np.isnan(cache.mean[ch]) and np.all(np.isfinite(cache.mean[~bad]))
    assert np.all(np.isnan(yc[..., ch])) and np.all(np.isfinite(yc[..., ~bad]))


# -- large ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_statistics_exact_at_1e8_values_per_channel():
    # N*H*W = 1e8 per channel, float32, mean 1e4, std 1 (both layouts of the reduction).
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, 1, 1000, 1000), dtype=np.float32)
    x += np.float32(1e4)
    n = x.size
    # Reference: extended-precision two-pass, chunk by chunk.
    lp = np.longdouble if EXTENDED else np.float64
    flat = x.reshape(100, -1)
    total = sum((row.astype(lp).sum() for row in flat), lp(0))
    mean = total / n
    m2 = sum((((row.astype(lp) - mean) ** 2).sum() for row in flat), lp(0))
    for view, axis in ((x, 1), (x.reshape(-1, 1), 1)):  # row mode; column mode (N, 1)
        m = bnref.Moments.from_array(view, axis)
        assert abs(m.mean[0] - float(mean)) <= 1e-12 * float(abs(mean))
        assert abs(m.m2[0] - float(m2)) <= 1e-12 * float(m2)
    # Outputs on a sample of the elements: y within the float32 contract.
    y, cache = bnref.batch_norm_train(x, np.array([2.0]), np.array([0.5]))
    idx = rng.integers(0, n, 100_000)
    xs = x.reshape(-1)[idx].astype(lp)
    inv_std = 1 / np.sqrt(m2 / n + lp(1e-5))
    xh = (xs - mean) * inv_std
    want = xh * 2 + lp(0.5)
    check("y", y.reshape(-1)[idx], want, 2 * (1 + np.abs(xh)) + 0.5, bounds_for(np.float32, n)["y"])
