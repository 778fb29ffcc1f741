"""Ghost BN and per-domain BN: defined by normalizing pieces separately."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnref


@given(
    seed=st.integers(0, 2**32 - 1),
    vbs=st.sampled_from([1, 2, 3, 4]),
    ghosts=st.integers(1, 4),
    axis=st.sampled_from([1, -1]),
)
def test_ghost_equals_pieces_normalized_separately(seed, vbs, ghosts, axis):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((vbs * ghosts, 3, 4)).astype(np.float32) * 2 + 1
    s, b, dy = (
        rng.standard_normal(x.shape[axis]),
        rng.standard_normal(x.shape[axis]),
        rng.standard_normal(x.shape),
    )
    y, cache = bnref.ghost_batch_norm_train(x, s, b, vbs, axis=axis)
    dx, ds, db = bnref.grouped_batch_norm_backward(dy, cache)
    ds_sum, db_sum = 0, 0
    for g in range(ghosts):
        sl = slice(g * vbs, (g + 1) * vbs)
        yg, cg = bnref.batch_norm_train(x[sl], s, b, axis=axis)
        np.testing.assert_array_equal(y[sl], yg)
        dxg, dsg, dbg = bnref.batch_norm_train_backward(dy[sl], cg)
        np.testing.assert_array_equal(dx[sl], dxg)
        ds_sum, db_sum = ds_sum + dsg.astype(np.float64), db_sum + dbg.astype(np.float64)
    np.testing.assert_allclose(ds, ds_sum, rtol=1e-6)
    np.testing.assert_allclose(db, db_sum, rtol=1e-6)
    assert len(cache.moments) == ghosts


def test_ghost_differs_from_full_batch():
    x = np.random.default_rng(0).standard_normal((8, 2)) + np.repeat([[0.0], [3.0]], 4, axis=0)
    full, _ = bnref.batch_norm_train(x, None, None)
    ghost, _ = bnref.ghost_batch_norm_train(x, None, None, 4)
    assert not np.allclose(full, ghost)


def test_ghost_requires_divisible_batch():
    with pytest.raises(ValueError, match="divide the batch size 6"):
        bnref.ghost_batch_norm_train(np.ones((6, 2)), None, None, 4)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(4, 24))
def test_domain_bn_and_domain_precise_bn(seed, n):
    rng = np.random.default_rng(seed)
    domains = rng.integers(0, 3, n)
    domains[:3] = [0, 1, 2]  # every domain present, with at least one sample...
    domains = np.concatenate([domains, [0, 1, 2]])  # ...and two
    x = rng.standard_normal((len(domains), 3, 2)) + domains[:, None, None] * 5.0
    s, b = rng.standard_normal(3), rng.standard_normal(3)
    y, cache = bnref.domain_batch_norm_train(x, domains, s, b)
    agg = bnref.DomainPreciseBN()
    agg.update_grouped(cache)
    agg.update_grouped(cache)
    for d in range(3):
        idx = domains == d
        yd, cd = bnref.batch_norm_train(x[idx], s, b)
        np.testing.assert_array_equal(y[idx], yd)
        one = bnref.PreciseBN()
        one.update(cd.moments)
        one.update(cd.moments)
        np.testing.assert_array_equal(agg[d].mean, one.mean)
        np.testing.assert_array_equal(agg[d].var, one.var)
    merged = agg.merge(agg)
    assert merged[0].num_batches == 4


def test_domain_labels_shape_checked():
    with pytest.raises(ValueError, match=r"domains must have shape \(4,\)"):
        bnref.domain_batch_norm_train(np.ones((4, 2)), [0, 1], None, None)
    with pytest.raises(KeyError, match="no statistics for domain 'x'"):
        bnref.DomainPreciseBN()["x"]
