"""MXNet 1.9.1 BatchNorm (CPU) vs bnref, run in ``.venv-mxnet`` (numpy < 1.24) through a worker.

The ``BatchNorm`` operator with ``fix_gamma=False`` (what gluon ``nn.BatchNorm`` runs), channels
first and last; momentum 0.9 weighting the running value, biased running variance on the CPU;
gluon eps 1e-5, operator (``mx.sym``/``mx.nd``) eps 1e-3 and ``fix_gamma=True``. The cuDNN
path (unbiased running variance) cannot run here and stays as recorded.
"""

import numpy as np
import pytest

from bnref.conventions import MXNET
from bnref.testing import check_case
from tests.conformance._lib import (
    batches,
    check_updates,
    compare,
    config_id,
    make_case,
    replay,
    shape_with_channels,
    with_eps,
)
from tests.conformance.remote import remote_impl

pytestmark = [pytest.mark.frameworks, pytest.mark.reference]

CONFIGS = [(2, 1, None, None), (3, 1, None, None), (4, 1, None, None), (4, -1, None, None),
           (5, 1, 1e-2, 0.3)]
CFG_DTYPES = [(c, np.float32) for c in CONFIGS] + [(CONFIGS[2], np.float64), (CONFIGS[2], np.float16)]


def test_defaults_match_convention(mxnet_worker):
    d = mxnet_worker.call("adapters_mxnet:defaults")
    g = d["gluon"]
    assert (g["momentum"], g["eps"], g["axis"], g["fix_gamma"]) == (MXNET.momentum, MXNET.eps,
                                                                    MXNET.channel_axis, False)
    doc = " ".join(d["operator_doc"])
    assert "eps : double, optional, default=0.001" in doc and "fix_gamma : boolean, optional, default=1" in doc


@pytest.mark.parametrize("cfg,dtype", CFG_DTYPES, ids=config_id)
def test_batch_norm_operator(matrix, mxnet_worker, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=80 + rank)
    variant = config_id(cfg)
    if dtype == np.float64:  # momentum is a float32 parameter of the operator
        mom = float(np.float32(mom or MXNET.momentum))
        variant += ", momentum as float32"
    compare(matrix, "MXNet", "nd.BatchNorm(fix_gamma=False) (gluon nn.BatchNorm's op)",
            mxnet_worker.versions["mxnet"], remote_impl(mxnet_worker, "adapters_mxnet:operator"),
            with_eps(MXNET, eps), case, momentum=mom, variant=variant)


def test_float64_uses_float32_momentum(mxnet_worker):
    case = make_case(shape_with_channels(4, 1), 1, np.float64, seed=84)
    with pytest.raises(AssertionError, match="running_mean"):
        check_case(remote_impl(mxnet_worker, "adapters_mxnet:operator"), MXNET, case, momentum=0.9)


def test_moving_statistics_move_in_the_backward_pass(mxnet_worker):
    """A training-mode forward alone leaves them as they were: a forward-only Precise BN pass
    (or any statistics-only recalibration) must run a backward in MXNet 1.9."""
    x = make_case(shape_with_channels(4, 1), 1, np.float32, seed=3).x
    mm, mv = mxnet_worker.call("adapters_mxnet:forward_only_update", x)
    np.testing.assert_array_equal(mm, np.zeros(3))
    np.testing.assert_array_equal(mv, np.ones(3))


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_gluon_several_updates(matrix, mxnet_worker, momentum):
    xs = batches(shape_with_channels(4, 1), 1, np.float32, 5, seed=7)
    got_m, got_v = mxnet_worker.call("adapters_mxnet:gluon_updates", *xs, momentum=momentum)
    check_updates(matrix, "MXNet", "gluon.nn.BatchNorm", mxnet_worker.versions["mxnet"], replay(got_m, got_v),
                  lambda rm, rv, mo: MXNET.update(rm, rv, mo, momentum=momentum), xs,
                  np.zeros(3), np.ones(3), axis=1, variant=f"5 updates, momentum={momentum}")
