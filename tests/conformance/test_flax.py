"""Flax linen.BatchNorm and nnx.BatchNorm (use_fast_variance True/False) on JAX CPU vs bnref."""

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")

import bnref  # noqa: E402
from bnref.conventions import FLAX  # noqa: E402
from bnref.testing import Tolerance, bn_cases, check_batch_norm  # noqa: E402
from tests.conformance import adapters  # noqa: E402
from tests.conformance._lib import (  # noqa: E402
    batches,
    check_updates,
    compare,
    make_case,
    shape_with_channels,
    with_eps,
)

pytestmark = pytest.mark.frameworks
V = flax.__version__

# (rank, channel axis, eps, momentum): Flax's default is channels-last
CONFIGS = [
    (2, -1, None, None),
    (4, -1, None, None),
    (3, 1, None, None),
    (5, -1, 1e-2, 0.9),
]


def _id(c):
    return f"rank{c[0]}-axis{c[1]}-eps{c[2]}-mom{c[3]}"


def test_defaults_match_convention():
    import inspect

    from flax import linen as nn
    from flax import nnx

    bn = nn.BatchNorm()
    assert (bn.momentum, bn.epsilon, bn.axis, bn.use_fast_variance) == (
        FLAX.momentum, FLAX.eps, FLAX.channel_axis, FLAX.fast_variance)
    p = inspect.signature(nnx.BatchNorm.__init__).parameters
    assert (p["momentum"].default, p["epsilon"].default, p["axis"].default,
            p["use_fast_variance"].default) == (FLAX.momentum, FLAX.eps, FLAX.channel_axis,
                                                 FLAX.fast_variance)


IMPLS = {
    ("linen", True): lambda: adapters.flax_linen(True),
    ("linen", False): lambda: adapters.flax_linen(False),
    ("nnx", True): lambda: adapters.flax_nnx(True),
    ("nnx", False): lambda: adapters.flax_nnx(False),
}


# float16: one configuration is enough (every configuration is a new XLA compilation)
CFG_DTYPES = [(c, np.float32) for c in CONFIGS] + [(CONFIGS[1], np.float16),
                                                   (CONFIGS[1], np.dtype(ml_dtypes.bfloat16))]


@pytest.mark.parametrize("cfg,dtype", CFG_DTYPES, ids=lambda v: _id(v) if isinstance(v, tuple) else np.dtype(v).name)
@pytest.mark.parametrize("api,fast", list(IMPLS), ids=lambda v: str(v))
def test_batch_norm(matrix, api, fast, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=rank)
    compare(matrix, "Flax", f"{api}.BatchNorm(use_fast_variance={fast})", V, IMPLS[api, fast](),
            with_eps(FLAX, eps), case, momentum=mom, variant=_id(cfg))


@pytest.mark.parametrize("momentum", [0.99, 0.5])
def test_linen_several_updates(matrix, momentum):
    from flax import linen as nn

    shape = shape_with_channels(4, -1)
    xs = batches(shape, -1, np.float32, 5, seed=3)
    mod = nn.BatchNorm(use_running_average=False, momentum=momentum, use_fast_variance=False)
    variables = mod.init(jax.random.PRNGKey(0), xs[0])
    apply = jax.jit(lambda v, x: mod.apply(v, x, mutable=["batch_stats"]))
    state = {"v": variables}

    def step(x):
        _, upd = apply(state["v"], x)
        state["v"] = {"params": state["v"]["params"], **upd}
        bs = upd["batch_stats"]
        return np.asarray(bs["mean"]), np.asarray(bs["var"])

    check_updates(matrix, "Flax", "linen.BatchNorm(use_fast_variance=False)", V, step,
                  lambda rm, rv, mo: FLAX.update(rm, rv, mo, momentum=momentum), xs,
                  np.zeros(3), np.ones(3), axis=-1, variant=f"5 updates, momentum={momentum}")


def test_nnx_several_updates(matrix):
    from flax import nnx

    shape = shape_with_channels(3, -1)
    xs = batches(shape, -1, np.float32, 4, seed=4)
    bn = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    bn.train()

    def step(x):
        bn(x)
        return np.asarray(bn.mean[...]), np.asarray(bn.var[...])

    check_updates(matrix, "Flax", "nnx.BatchNorm(use_fast_variance=True)", V, step,
                  lambda rm, rv, mo: FLAX.update(rm, rv, mo, momentum=0.9), xs,
                  np.zeros(3), np.ones(3), axis=-1, variant="4 updates, momentum=0.9")


def test_fast_variance_error_is_cancellation():
    """use_fast_variance=True computes E[x^2]-E[x]^2 in float32: its variance error grows like
    eps32 * (mean/std)^2, the exact formula's does not. bnref is the exact answer."""
    impl_fast, impl_exact = adapters.flax_linen(True), adapters.flax_linen(False)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 3)) + np.array([0.0, 300.0, 3000.0])).astype(np.float32)
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    want = bnref.Moments.from_array(x.astype(np.float64), axis=1).var()
    errs = {}
    for name, impl in (("fast", impl_fast), ("exact", impl_exact)):
        _, _, rv = impl.train(x, one, zero, zero, zero, eps=1e-5, momentum=0.0, axis=-1)
        errs[name] = np.abs(rv - want) / want
    assert errs["exact"].max() < 1e-5
    assert errs["fast"][0] < 1e-5  # mean 0: no cancellation
    assert errs["fast"][2] > 1e-3  # mean/std = 3000: E[x^2] has lost ~eps32 * 9e6 of var


# -- bnref.testing on real code -------------------------------------------------------------------

#: A few fixed shapes for the harness runs: every new shape is a new XLA compilation.
HARNESS_SHAPES = [((8, 3), -1), ((4, 5, 3), -1), ((2, 3, 4, 2), -1), ((4, 3, 5), 1), ((2, 2, 3), -2)]


def _cases(**kw):
    from hypothesis import strategies as st

    return bn_cases(np.float32, shape_axis=st.sampled_from(HARNESS_SHAPES), **kw)



def test_harness_accepts_flax_exact_variance():
    """Flax's BN handed to the harness as a user's implementation: passes the default value
    strategy (std over six decades, mean up to 10 std) with use_fast_variance=False."""
    check_batch_norm(adapters.flax_linen(False), FLAX, np.float32, max_examples=30,
                     cases=_cases())


def test_harness_accepts_flax_fast_variance_on_well_conditioned_cases():
    """With Flax's default use_fast_variance=True the harness passes when |mean| <= std (the
    cancellation of E[x^2]-E[x]^2 stays within the float32 bound); see the test above for
    why ill-conditioned cases (|mean| >> std) legitimately exceed it."""
    check_batch_norm(adapters.flax_linen(True), FLAX, np.float32, max_examples=30,
                     cases=_cases(max_abs_mean_over_std=1.0))


def test_harness_rejects_flax_fast_variance_when_ill_conditioned():
    """The same implementation fails the harness with |mean| >> std: the harness sees the
    cancellation (and names the quantity)."""
    cases = _cases(max_abs_mean_over_std=1000.0)
    with pytest.raises(AssertionError, match=r"(y \(training mode\)|running_var|dx|dscale) differs"):
        check_batch_norm(adapters.flax_linen(True), FLAX, np.float32, max_examples=40,
                         cases=cases, tolerance=Tolerance.for_dtype(np.float32))
