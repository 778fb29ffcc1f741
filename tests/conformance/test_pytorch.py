"""PyTorch vs bnref: F.batch_norm, nn.BatchNorm1d/2d/3d, momentum None, swa_utils.update_bn."""

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnref  # noqa: E402
from bnref.conventions import PYTORCH  # noqa: E402
from bnref.testing import Tolerance  # noqa: E402
from tests.conformance import adapters  # noqa: E402
from tests.conformance._lib import (  # noqa: E402
    batches,
    check_precise,
    check_updates,
    compare,
    make_case,
    shape_with_channels,
    with_eps,
)
from tests.conformance._torch_models import collect_bn_inputs, loader, small_net  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
pytestmark = pytest.mark.frameworks
V = torch.__version__.split("+")[0]

# (rank, channel axis, eps, momentum): default layout, channels-last, non-default eps/momentum
CONFIGS = [
    (2, 1, None, None),
    (3, 1, None, None),
    (4, 1, None, None),
    (5, 1, None, None),
    (4, -1, None, None),
    (4, 1, 1e-2, 0.3),
    (3, 1, 1e-8, 1.0),
]


def _id(c):
    return f"rank{c[0]}-axis{c[1]}-eps{c[2]}-mom{c[3]}"


def test_defaults_match_convention():
    bn = torch.nn.BatchNorm2d(3)
    assert bn.momentum == PYTORCH.momentum
    assert bn.eps == PYTORCH.eps
    import inspect

    sig = inspect.signature(torch.nn.functional.batch_norm)
    assert sig.parameters["momentum"].default == PYTORCH.momentum
    assert sig.parameters["eps"].default == PYTORCH.eps


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_functional(matrix, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=rank)
    conv = with_eps(PYTORCH, eps)
    variant = _id(cfg)
    compare(matrix, "PyTorch", "F.batch_norm", V, adapters.torch_functional(), conv, case,
            momentum=mom, variant=variant)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[1] == 1], ids=_id)
def test_module(matrix, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=10 + rank)
    compare(matrix, "PyTorch", "nn.BatchNorm1d/2d/3d", V, adapters.torch_module(),
            with_eps(PYTORCH, eps), case, momentum=mom, variant=_id(cfg))


def _module_steps(rank, dtype, momentum, k=5):
    shape = shape_with_channels(rank, 1)
    xs = batches(shape, 1, dtype, k, seed=rank)
    m = adapters.torch_module_for(rank, shape[1], dtype, eps=1e-5, momentum=momentum).train()

    def step(x):
        with torch.no_grad():
            m(torch.from_numpy(x))
        return m.running_mean.numpy().copy(), m.running_var.numpy().copy()

    return m, xs, step


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("rank", [2, 4, 5])
def test_module_several_updates(matrix, rank, momentum, dtype):
    m, xs, step = _module_steps(rank, dtype, momentum)

    def ref(rm, rv, mo):
        return PYTORCH.update(rm, rv, mo, momentum=momentum)

    check_updates(matrix, "PyTorch", "nn.BatchNorm1d/2d/3d", V, step, ref, xs,
                  np.zeros(xs[0].shape[1]), np.ones(xs[0].shape[1]), axis=1,
                  variant=f"{len(xs)} updates, momentum={momentum}")
    assert int(m.num_batches_tracked) == len(xs)


@pytest.mark.parametrize("rank", [2, 4])
def test_module_momentum_none_is_cumulative(matrix, rank):
    m, xs, step = _module_steps(rank, np.float32, None)
    state = {"k": 0}

    def ref(rm, rv, mo):
        rm, rv, state["k"] = PYTORCH.update_cumulative(rm, rv, mo, state["k"])
        return rm, rv

    check_updates(matrix, "PyTorch", "nn.BatchNorm1d/2d/3d", V, step, ref, xs,
                  np.zeros(xs[0].shape[1]), np.ones(xs[0].shape[1]), axis=1,
                  variant="momentum=None (update_cumulative)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_swa_update_bn_is_mean_of_variances(matrix, dtype):
    from torch.optim.swa_utils import update_bn

    net = small_net(dtype)
    batches_ = loader(dtype)
    bns, precise = collect_bn_inputs(net, batches_)
    update_bn(batches_, net)
    for i, (bn, p) in enumerate(zip(bns, precise, strict=True)):
        ref = p.with_estimator("mean_of_variances")
        check_precise(matrix, "PyTorch", "swa_utils.update_bn", V, dtype,
                      bn.running_mean.numpy(), bn.running_var.numpy(), ref,
                      variant="vs PreciseBN('mean_of_variances'), batches 8,8,8,3",
                      name=f"BN {i}: ")
    # ... and it is not the population estimator here (the batches differ).
    pop = precise[0]
    assert not np.allclose(bns[0].running_var.numpy(), pop.var, rtol=1e-3)


def test_eps_zero_refused_in_training():
    """PyTorch 2.13 refuses eps <= 0 in training mode (bnref accepts eps = 0)."""
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.nn.functional.batch_norm(x, None, None, training=True, eps=0.0)


# -- bnref.testing on real code -------------------------------------------------------------------


def test_harness_accepts_pytorch():
    """PyTorch's BN handed to the harness as if it were a user's implementation: it passes."""
    from bnref.testing import check_batch_norm

    check_batch_norm(adapters.torch_functional(), PYTORCH, np.float32, max_examples=30)
    check_batch_norm(adapters.torch_module(), PYTORCH, np.float32, max_examples=15,
                     momentum=0.3)
    check_batch_norm(adapters.torch_functional(), PYTORCH, np.float64, max_examples=15)


def _biased_running_var_impl():
    """PyTorch BN with a common porting bug: the running variance gets the *biased* batch var."""
    good = adapters.torch_functional()

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        y, m, _ = good.train(x, scale, bias, rm, rv, eps=eps, momentum=momentum, axis=axis)
        xs = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
        v = (1 - momentum) * rv.astype(np.float64) + momentum * xs.var(axis=0)
        return y, m, v.astype(x.dtype)

    return bnref.testing.BatchNormImpl(train=train)


def _eps_outside_sqrt_impl():
    """Training-mode BN with eps added to the std instead of the variance."""

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        ax = axis % x.ndim
        red = tuple(i for i in range(x.ndim) if i != ax)
        t = torch.from_numpy(x)
        mean = t.mean(red, keepdim=True)
        var = t.var(red, keepdim=True, unbiased=False)
        shp = [1] * x.ndim
        shp[ax] = -1
        y = (t - mean) / (var.sqrt() + eps) * torch.from_numpy(scale).reshape(shp) \
            + torch.from_numpy(bias).reshape(shp)
        n = x.size // x.shape[ax]
        new_m = (1 - momentum) * rm + momentum * mean.reshape(-1).numpy()
        new_v = (1 - momentum) * rv + momentum * var.reshape(-1).numpy() * n / (n - 1)
        return y.numpy(), new_m.astype(x.dtype), new_v.astype(x.dtype)

    return bnref.testing.BatchNormImpl(train=train)


def test_harness_rejects_biased_running_var():
    from bnref.testing import check_batch_norm

    with pytest.raises(AssertionError, match=r"running_var differs from bnref at index \(\d+,\)"):
        check_batch_norm(_biased_running_var_impl(), PYTORCH, np.float32, max_examples=30)


def test_harness_rejects_eps_outside_sqrt():
    from bnref.testing import check_batch_norm

    with pytest.raises(
        AssertionError, match=r"y \(training mode\) differs from bnref at index .* \(channel \d+\)"
    ):
        check_batch_norm(_eps_outside_sqrt_impl(), PYTORCH, np.float32, max_examples=30)


def test_harness_tolerance_is_tight_enough():
    """The eps bug is caught on a plain case, with an error far above the bound."""
    case = make_case((6, 3), 1, np.float32, seed=1, log10_std=(-3.0, -2.0))
    with pytest.raises(AssertionError, match="y \\(training mode\\)") as e:
        bnref.testing.check_case(_eps_outside_sqrt_impl(), PYTORCH, case, Tolerance.for_dtype(np.float32))
    assert "allowed" in str(e.value)
