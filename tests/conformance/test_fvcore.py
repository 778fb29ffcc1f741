"""fvcore ``update_bn_stats`` (its population estimator) vs ``bnref.PreciseBN("population")``."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
precise_bn = pytest.importorskip("fvcore.nn.precise_bn")

import bnref  # noqa: E402
from tests.conformance._lib import check_precise  # noqa: E402
from tests.conformance._torch_models import collect_bn_inputs, loader, small_net  # noqa: E402

pytestmark = pytest.mark.frameworks


def _version():
    from importlib.metadata import version

    return version("fvcore")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_bn_stats_is_population(matrix, dtype):
    net = small_net(dtype)
    batches = loader(dtype)
    bns, precise = collect_bn_inputs(net, batches)
    momenta = [bn.momentum for bn in bns]
    net.train()
    precise_bn.update_bn_stats(net, batches, num_iters=len(batches))
    assert [bn.momentum for bn in bns] == momenta  # restored
    for i, (bn, p) in enumerate(zip(bns, precise, strict=True)):
        check_precise(matrix, "fvcore", "nn.update_bn_stats", _version(), dtype,
                      bn.running_mean.numpy(), bn.running_var.numpy(), p,
                      variant="vs PreciseBN('population'), batches 8,8,8,3", name=f"BN {i}: ")
    # Not the mean-of-variances estimate: batch sizes differ and batch means vary.
    mov = precise[0].with_estimator("mean_of_variances")
    assert not np.allclose(bns[0].running_var.numpy(), mov.var, rtol=1e-3)


def test_no_bessel_on_population_estimate():
    """fvcore's estimate is the biased pooled variance: not ``PreciseBN(bessel=True)``."""
    net = small_net(np.float64)
    batches = loader(np.float64)
    bns, precise = collect_bn_inputs(net, batches)
    net.train()
    precise_bn.update_bn_stats(net, batches, num_iters=len(batches))
    last = bns[-1]  # BatchNorm1d after Linear: 27 values per channel, Bessel factor 27/26
    biased = precise[-1]
    unbiased = biased.with_estimator("population", bessel=True)
    np.testing.assert_allclose(last.running_var.numpy(), biased.var, rtol=1e-12)
    assert not np.allclose(last.running_var.numpy(), unbiased.var, rtol=1e-3)


def test_mean_of_variances_estimator_class():
    """fvcore's older estimator (``_MeanOfBatchVarianceEstimator``) is bnref's mean_of_variances."""
    rng = np.random.default_rng(0)
    ref = bnref.PreciseBN("mean_of_variances")
    est = None
    for n in (5, 9, 3):
        x = rng.standard_normal((n, 4)) * 2 + rng.standard_normal(4)
        m = bnref.Moments.from_array(x, axis=1)
        ref.update(m)
        t_mean, t_var = torch.tensor(m.mean), torch.tensor(m.var(ddof=1))
        est = est or precise_bn._MeanOfBatchVarianceEstimator(t_mean, t_var)
        est.update(t_mean, t_var, n)
    np.testing.assert_allclose(est.pop_mean.numpy(), ref.mean, rtol=1e-13)
    np.testing.assert_allclose(est.pop_var.numpy(), ref.var, rtol=1e-13)
