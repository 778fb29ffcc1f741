"""PaddlePaddle 3 BatchNorm vs bnref, run in ``.venv-paddle`` through a worker process.

``paddle.nn.functional.batch_norm`` and ``paddle.nn.BatchNorm1D/2D/3D``, channels first and last
(NCHW and NHWC, NCL/NLC, NCDHW/NDHWC), momentum 0.9 weighting the running value, eps 1e-5,
biased running variance (CPU kernel); ``use_global_stats``; the CPU has float32/float64 only.
"""

import numpy as np
import pytest

from bnref.conventions import PADDLE
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
from tests.conformance.remote import WorkerError, remote_impl

pytestmark = [pytest.mark.frameworks, pytest.mark.reference]

CONFIGS = [(2, 1, None, None), (3, 1, None, None), (3, -1, None, None), (4, 1, None, None),
           (4, -1, None, None), (5, 1, None, None), (5, -1, 1e-2, 0.3)]
CFG_DTYPES = [(c, np.float32) for c in CONFIGS] + [(c, np.float64) for c in CONFIGS[3:5]]


def test_defaults_match_convention(paddle_worker):
    d = paddle_worker.call("adapters_paddle:defaults")
    assert (d["momentum"], d["epsilon"], d["data_format"]) == (PADDLE.momentum, PADDLE.eps, "NCHW")
    assert PADDLE.channel_axis == 1


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("cfg,dtype", CFG_DTYPES, ids=config_id)
def test_batch_norm(matrix, paddle_worker, api, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=70 + rank)
    name = "nn.functional.batch_norm" if api == "functional" else "nn.BatchNorm1D/2D/3D"
    variant = config_id(cfg)
    if dtype == np.float64:  # momentum and epsilon are float32 attributes of the op, as in ONNX
        mom, eps = float(np.float32(mom or PADDLE.momentum)), float(np.float32(eps or PADDLE.eps))
        variant += ", momentum and eps as float32"
    compare(matrix, "PaddlePaddle", name, paddle_worker.versions["paddlepaddle"],
            remote_impl(paddle_worker, f"adapters_paddle:{api}"), with_eps(PADDLE, eps), case,
            momentum=mom, variant=variant)


def test_float64_uses_float32_momentum(paddle_worker):
    """The finding above: with momentum 0.9 exactly, a float64 update misses float64's bound."""
    case = make_case(shape_with_channels(4, 1), 1, np.float64, seed=74)
    with pytest.raises(AssertionError, match="running_mean"):
        check_case(remote_impl(paddle_worker, "adapters_paddle:functional"), PADDLE, case, momentum=0.9)


def test_use_global_stats_normalizes_with_the_running_statistics(paddle_worker):
    """``use_global_stats=True`` in training: y is the inference-mode y (running statistics)."""
    case = make_case(shape_with_channels(4, 1), 1, np.float64, seed=3)
    impl = remote_impl(paddle_worker, "adapters_paddle:functional", use_global_stats=True)
    y, rm, rv = impl.train(case.x, case.scale, case.bias, case.running_mean, case.running_var,
                           eps=1e-5, momentum=0.9, axis=1)
    y_eval = impl.eval(case.x, case.scale, case.bias, case.running_mean, case.running_var, eps=1e-5, axis=1)
    np.testing.assert_allclose(y, y_eval, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(rm, case.running_mean)
    np.testing.assert_array_equal(rv, case.running_var)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_several_updates(matrix, paddle_worker, momentum):
    xs = batches(shape_with_channels(4, 1), 1, np.float32, 5, seed=7)
    got_m, got_v = paddle_worker.call("adapters_paddle:updates", *xs, momentum=momentum)
    check_updates(matrix, "PaddlePaddle", "nn.BatchNorm1D/2D/3D", paddle_worker.versions["paddlepaddle"],
                  replay(got_m, got_v), lambda rm, rv, mo: PADDLE.update(rm, rv, mo, momentum=momentum), xs,
                  np.zeros(3), np.ones(3), axis=1, variant=f"5 updates, momentum={momentum}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_has_no_cpu_kernel(paddle_worker, dtype):
    """Paddle 3.3's CPU batch_norm kernel is registered for float32 and float64 only."""
    msg = paddle_worker.call("adapters_paddle:dtype_refused", dtype=dtype)
    assert "not registered" in msg or "NotFound" in msg, msg


def test_worker_reports_errors(paddle_worker):
    with pytest.raises(WorkerError, match="failed in the paddle worker:(.|\n)*IndexError"):
        paddle_worker.call("adapters_paddle:updates", np.zeros((2,), np.float32))
