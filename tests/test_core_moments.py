"""Moments: exact per-channel statistics and their merge."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnref
from bnref.testing import shapes_and_axes
from tests.reference import exact_mean_m2, to_rows


@given(
    shape_axis=shapes_and_axes(),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_from_array_matches_numpy_float64(shape_axis, seed, dtype):
    shape, axis = shape_axis
    x = (np.random.default_rng(seed).standard_normal(shape) * 3 + 1).astype(dtype)
    m = bnref.Moments.from_array(x, axis=axis)
    rows = to_rows(x, axis)
    assert m.count == rows.shape[0]
    np.testing.assert_allclose(m.mean, rows.mean(0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(m.var(0), rows.var(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m.var(1), rows.var(0, ddof=1), rtol=1e-12, atol=1e-15)
    assert m.mean.dtype == np.float64


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e8, -3e12])
def test_large_mean_small_std_is_exact(offset):
    # |mean| >> std: E[x^2] - E[x]^2 would lose every digit here; two-pass must not.
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal((100, 2))).astype(np.float64)
    m = bnref.Moments.from_array(x, axis=1)
    for c in range(2):
        mean, m2 = exact_mean_m2(x[:, c])
        # Bound on the natural scale of a sum of n values: a few ulp of |mean| + std.
        assert abs(m.mean[c] - mean) <= 8 * np.finfo(float).eps * (abs(mean) + np.sqrt(m2 / len(x)))
        np.testing.assert_allclose(m.m2[c], m2, rtol=1e-12)


def test_fast_variance_formula_would_fail_here():
    # Guard that the test above is meaningful: the naive formula is far off at offset 1e8.
    x = 1e8 + np.random.default_rng(0).standard_normal(1000)
    naive = np.mean(x * x) - np.mean(x) ** 2
    assert abs(naive - x.var()) / x.var() > 1e-3


def _split(x, cuts):
    return [x[a:b] for a, b in zip([0, *cuts], [*cuts, len(x)], strict=True) if b > a]


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 200), data=st.data())
def test_merge_is_partition_invariant(seed, n, data):
    x = np.random.default_rng(seed).standard_normal((n, 3)) * [1, 100, 1e-3] + [0, 1e4, -5]
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=min(10, n - 1)), label="cuts"))
    parts = [bnref.Moments.from_array(p, axis=1) for p in _split(x, cuts)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    whole = bnref.Moments.from_array(x, axis=1)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-11)


@given(seed=st.integers(0, 2**32 - 1))
def test_merge_commutative_bitwise_and_associative(seed):
    rng = np.random.default_rng(seed)
    a, b, c = (
        bnref.Moments.from_array(rng.standard_normal((rng.integers(2, 30), 4)) + 7.0, axis=1)
        for _ in range(3)
    )
    ab, ba = a.merge(b), b.merge(a)
    assert ab.count == ba.count
    assert np.array_equal(ab.mean, ba.mean) and np.array_equal(ab.m2, ba.m2)
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    np.testing.assert_allclose(left.mean, right.mean, rtol=1e-14)
    np.testing.assert_allclose(left.m2, right.m2, rtol=1e-13)


def test_thousands_of_shards_stay_exact():
    rng = np.random.default_rng(1)
    x = 1e3 + rng.standard_normal((20_000, 2))
    shards = [bnref.Moments.from_array(s, axis=1) for s in np.array_split(x, 5_000)]
    seq = shards[0]
    for s in shards[1:]:
        seq = seq.merge(s)
    tree = bnref.Moments.merge_all(shards)
    for c in range(2):
        mean, m2 = exact_mean_m2(x[:, c])
        for got in (seq, tree):
            np.testing.assert_allclose(got.mean[c], mean, rtol=1e-14)
            np.testing.assert_allclose(got.m2[c], m2, rtol=1e-11)


def test_empty_is_merge_identity():
    m = bnref.Moments.from_array(np.arange(12.0).reshape(4, 3))
    e = bnref.Moments.empty(3)
    assert e.merge(m) is m and m.merge(e) is m


def test_from_mean_var_round_trip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4))
    m = bnref.Moments.from_array(x)
    for ddof in (0, 1):
        r = bnref.Moments.from_mean_var(m.mean, m.var(ddof), m.count, ddof=ddof)
        np.testing.assert_allclose(r.m2, m.m2, rtol=1e-14)
        np.testing.assert_allclose(r.mean, m.mean, rtol=0)


def test_arrays_are_read_only():
    m = bnref.Moments.from_array(np.ones((2, 3)))
    with pytest.raises(ValueError, match="read-only"):
        m.mean[0] = 1.0


@pytest.mark.parametrize(
    ("call", "match", "exc"),
    [
        (lambda: bnref.Moments.from_array(np.ones(3)), "rank >= 2", ValueError),
        (lambda: bnref.Moments.from_array(np.ones((0, 3))), "no values per channel", ValueError),
        (lambda: bnref.Moments.from_array(np.ones((2, 3)), axis=2), "axis=2 is out of range", ValueError),
        (lambda: bnref.Moments.from_array(np.ones((2, 3), dtype=np.int32)), "floating-point", TypeError),
        (lambda: bnref.Moments.from_mean_var([0.0], [-1.0], 5), "var must be >= 0", ValueError),
        (lambda: bnref.Moments.from_mean_var([0.0, 1.0], [1.0], 5), "same shape", ValueError),
        (lambda: bnref.Moments.from_mean_var([0.0], [1.0], 1, ddof=1), "count must be > ddof", ValueError),
        (lambda: bnref.Moments.from_array(np.ones((1, 3))).var(1), "one value per channel", ValueError),
        (lambda: bnref.Moments.empty(2).merge(bnref.Moments.empty(3)), "2 and 3 channels", ValueError),
    ],
)
def test_bad_input_names_the_problem(call, match, exc):
    with pytest.raises(exc, match=match):
        call()
