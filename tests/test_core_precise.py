"""Precise BatchNorm aggregation: both estimators, merge, persistence, refusals."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnref


def _partition(x, sizes):
    out, i = [], 0
    for s in sizes:
        if i + s > len(x):
            break
        out.append(x[i : i + s])
        i += s
    return out


@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(2, 40), min_size=1, max_size=20))
def test_population_equals_pooled_statistics_for_any_partition(seed, sizes):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sum(sizes), 4)) * [1, 10, 0.1, 1] + [0, 100, -3, 1e4]
    p = bnref.PreciseBN("population")
    for b in _partition(x, sizes):
        p.update(bnref.Moments.from_array(b))
    np.testing.assert_allclose(p.mean, x.mean(0), rtol=1e-13, atol=1e-13 * x.std(0).max())
    np.testing.assert_allclose(p.var, x.var(0), rtol=1e-11)
    assert p.count == len(x) and p.num_batches == len(sizes)
    pb = p.with_estimator("population", bessel=True)
    np.testing.assert_allclose(pb.var, x.var(0, ddof=1), rtol=1e-11)


@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(2, 40), min_size=1, max_size=20))
def test_mean_of_variances_is_equal_weight_per_batch(seed, sizes):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sum(sizes), 3)) + [0, 5, -5]
    parts = _partition(x, sizes)
    p = bnref.PreciseBN("mean_of_variances")
    for b in parts:
        p.update(bnref.Moments.from_array(b))
    np.testing.assert_allclose(p.mean, np.mean([b.mean(0) for b in parts], axis=0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(
        p.var, np.mean([b.var(0, ddof=1) for b in parts], axis=0), rtol=1e-12
    )


def test_estimators_differ_for_correlated_values_as_documented():
    # "Images": each sample has its own per-channel offset shared by all its pixels, so batch
    # means vary more than var/m; mean_of_variances misses that between-batch term.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 2, 8, 8)) + 3.0 * rng.standard_normal((512, 2, 1, 1))
    pop, mov = bnref.PreciseBN("population"), bnref.PreciseBN("mean_of_variances")
    for b in np.split(x, 64):  # batches of 8 images
        m = bnref.Moments.from_array(b)
        pop.update(m)
        mov.update(m)
    truth = x.transpose(1, 0, 2, 3).reshape(2, -1).var(1)
    np.testing.assert_allclose(pop.var, truth, rtol=1e-12)
    assert np.all(mov.var < 0.95 * truth)
    np.testing.assert_allclose(pop.mean, mov.mean, rtol=1e-12)  # equal batch sizes: same mean


@given(
    seed=st.integers(0, 2**32 - 1), k=st.integers(2, 30), shards=st.integers(1, 5), data=st.data()
)
def test_shards_merge_in_any_order_to_the_unsharded_result(seed, k, shards, data):
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((int(rng.integers(2, 12)), 3)) * 2 + 1 for _ in range(k)]
    whole = bnref.PreciseBN()
    parts = [bnref.PreciseBN() for _ in range(shards)]
    for i, b in enumerate(batches):
        whole.update(bnref.Moments.from_array(b))
        parts[i % shards].update(bnref.Moments.from_array(b))
    order = data.draw(st.permutations(range(shards)), label="order")
    merged = parts[order[0]]
    for j in order[1:]:
        merged = merged.merge(parts[j])
    for est in bnref.ESTIMATORS:
        a, b = merged.with_estimator(est), whole.with_estimator(est)
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(a.var, b.var, rtol=1e-12)
    assert merged.count == whole.count and merged.num_batches == whole.num_batches


def test_merge_with_empty_and_state_round_trip():
    p = bnref.PreciseBN("mean_of_variances")
    p.update_from_array(np.random.default_rng(0).standard_normal((6, 2)))
    p.update_from_array(np.random.default_rng(1).standard_normal((4, 2)))
    assert np.array_equal(p.merge(bnref.PreciseBN()).var, p.var)
    assert np.array_equal(bnref.PreciseBN().merge(p).with_estimator("mean_of_variances").var, p.var)
    r = bnref.PreciseBN.from_state_dict(p.state_dict(), estimator="mean_of_variances")
    assert np.array_equal(r.mean, p.mean) and np.array_equal(r.var, p.var) and r.count == p.count


def test_refuses_bad_batches_without_poisoning():
    p = bnref.PreciseBN()
    p.update_from_array(np.arange(6.0).reshape(3, 2))
    before = p.state_dict()
    bad = np.arange(6.0).reshape(3, 2)
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"batch 1 has non-finite statistics \(channel 1"):
        p.update_from_array(bad)
    with pytest.raises(ValueError, match="at least 2"):
        p.update_from_array(np.ones((1, 2)))
    with pytest.raises(ValueError, match="batch 1 has 3 channels, earlier batches had 2"):
        p.update_from_array(np.ones((3, 3)))
    for k, v in p.state_dict().items():
        assert np.array_equal(v, before[k])


@pytest.mark.parametrize(
    ("call", "match", "exc"),
    [
        (lambda: bnref.PreciseBN("ema"), "unknown estimator 'ema'", ValueError),
        (lambda: bnref.PreciseBN().mean, "no batches yet", ValueError),
        (lambda: bnref.PreciseBN().update(np.ones(3)), "must be bnref.Moments", TypeError),
        (lambda: bnref.PreciseBN.from_state_dict({}), "missing", ValueError),
        (lambda: bnref.blend_prior(0, 1, 0, 1, 10, -1), "prior_strength", ValueError),
    ],
)
def test_bad_input_names_the_problem(call, match, exc):
    with pytest.raises(exc, match=match):
        call()


def test_blend_prior_weights():
    m, v = bnref.blend_prior(
        np.array([0.0]), np.array([1.0]), np.array([10.0]), np.array([5.0]), n=30, prior_strength=10
    )
    np.testing.assert_allclose(m, [7.5])
    np.testing.assert_allclose(v, [0.25 * 1 + 0.75 * 5])
    m0, v0 = bnref.blend_prior([1.0], [2.0], [3.0], [4.0], n=5, prior_strength=0)
    np.testing.assert_array_equal(m0, [3.0])
    np.testing.assert_array_equal(v0, [4.0])


def _collected(estimator="population"):
    p = bnref.PreciseBN(estimator)
    p.update_from_array(np.random.default_rng(0).standard_normal((6, 2)))
    return p


@pytest.mark.parametrize(
    "call",
    [
        lambda: bnref.PreciseBN("mean_of_variances", bessel=True),
        lambda: bnref.PreciseBN(estimator="mean_of_variances", bessel=1),
        lambda: _collected().with_estimator("mean_of_variances", True),
        lambda: _collected("mean_of_variances").with_estimator("mean_of_variances", bessel=True),
        lambda: bnref.PreciseBN.from_state_dict(
            _collected().state_dict(), estimator="mean_of_variances", bessel=True
        ),
        lambda: bnref.DomainPreciseBN("mean_of_variances", bessel=True),
    ],
    ids=["constructor", "constructor_truthy", "with_estimator", "with_estimator_same",
         "from_state_dict", "domain_precise_bn"],
)
def test_bessel_with_mean_of_variances_is_refused_not_ignored(call):
    """mean_of_variances already averages unbiased batch variances: bessel=True would be ignored."""
    with pytest.raises(
        ValueError,
        match=r"Bessel's correction applies only to the population estimator.*"
        r"mean_of_variances already averages unbiased batch variances",
    ):
        call()


def test_bessel_false_with_mean_of_variances_and_bessel_with_population_still_work():
    p = _collected()
    pb = p.with_estimator("population", True)
    assert pb.bessel and np.allclose(pb.var, p.var * 6 / 5)
    mov = pb.with_estimator("mean_of_variances")  # the default bessel=False: no error
    assert not mov.bessel and mov.merge(mov).estimator == "mean_of_variances"
    r = bnref.PreciseBN.from_state_dict(pb.state_dict(), estimator="mean_of_variances", bessel=False)
    assert np.array_equal(r.var, mov.var)
