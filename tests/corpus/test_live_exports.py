"""Real exports against the exporting framework's own training-mode statistics.

The tf2onnx files in ``data/`` (``make_tf2onnx.py``) are converted from a TF 2.21 graph with two
FusedBatchNormV3 nodes; ``data/paddle2onnx_bn.onnx`` (``make_paddle2onnx.py``) from a Paddle 3.3
CNN with two BatchNorm2D by paddle2onnx 2.1, BN kept. Here the framework itself runs its model
in training mode (``.venv-tf``, ``.venv-paddle``, through ``tests.conformance.remote``) on the same
batches; the population statistics of its per-batch moments must be what ``bnref-onnx
recalibrate`` writes into the ONNX file's BNs.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest

import bnref
from bnref.conventions import PADDLE
from tests.corpus import needs
from tests.corpus.reference import assert_stats_close, batchnorm_tensors

needs.module("onnxruntime")
import onnx_tools as ot  # noqa: E402

pytestmark = [pytest.mark.frameworks, pytest.mark.reference]
DATA = Path(__file__).resolve().parent / "data"
BATCH = 8


def _images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_image = rng.normal(size=(n,) + (1,) * len(shape))
    return (rng.normal(size=(n, *shape)) * 1.3 + per_image + 0.2).astype(np.float32)


def population(means, variances, n_per_batch: int, ddof: int):
    """bnref's population estimate from per-batch moments (variances with ``ddof``)."""
    p = bnref.PreciseBN("population")
    for m, v in zip(means, variances, strict=True):  # M2 = (n - ddof) * variance
        p.update(bnref.Moments(count=n_per_batch, mean=m, m2=v.astype(np.float64) * (n_per_batch - ddof)))
    return p.mean, p.var


def _recalibrated(model, data):
    written = ot.recalibrate(model, data, batch_size=BATCH, provider="cpu").model
    return list(batchnorm_tensors(written).values())  # in node order, as in the TF graph


@pytest.mark.parametrize("name", ["no_bn_fusion", "unoptimized"])
def test_tf2onnx_statistics_are_tensorflows(tf_worker, name):
    model = onnx.load(DATA / f"tf2onnx_{name}.onnx")
    data = _images(24, (16, 16, 3))
    batches = [data[i : i + BATCH] for i in range(0, len(data), BATCH)]
    tf_stats = tf_worker.call("exports:tf2onnx_batch_stats", *batches)
    got = _recalibrated(model, data)
    assert len(got) == len(tf_stats) // 2 == 2
    n = BATCH * 16 * 16
    for k, bn in enumerate(got):
        mean, var = population(tf_stats[2 * k], tf_stats[2 * k + 1], n, ddof=1)
        assert_stats_close(bn["mean"], bn["var"], mean, var, f"BN {k} of {name}")
        # the check has teeth: TF's Bessel-corrected variance as-is is 1/(n-1) off
        with pytest.raises(AssertionError):
            assert_stats_close(bn["mean"], bn["var"], mean, tf_stats[2 * k + 1].mean(0), f"BN {k}")


def test_paddle2onnx_statistics_are_paddles(paddle_worker):
    model = onnx.load(DATA / "paddle2onnx_bn.onnx")
    # paddle2onnx's tensor names; polygraphy's folding leaves the producer name empty
    assert any(n.output[0].startswith("p2o.pd_op.") for n in model.graph.node)
    # Paddle's momentum weights the running value, as ONNX's does: exported unchanged
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    attrs = [{a.name: a.f for a in n.attribute} for n in bns]
    assert all(np.float32(a["momentum"]) == np.float32(PADDLE.momentum) for a in attrs)
    assert all(np.float32(a["epsilon"]) == np.float32(PADDLE.eps) for a in attrs)
    data = _images(24, (3, 16, 16)).reshape(24, 3, 16, 16)
    batches = [data[i : i + BATCH] for i in range(0, len(data), BATCH)]
    pd_stats = paddle_worker.call("exports:paddle2onnx_batch_stats", *batches)
    got = _recalibrated(model, data)
    assert len(got) == len(pd_stats) // 2 == 2
    before = list(batchnorm_tensors(model).values())
    for k, bn in enumerate(got):
        mean, var = population(pd_stats[2 * k], pd_stats[2 * k + 1], BATCH * 16 * 16, ddof=0)
        assert_stats_close(bn["mean"], bn["var"], mean, var, f"BN {k} of paddle2onnx_bn")
        with pytest.raises(AssertionError):  # the file's own statistics are far from these
            assert_stats_close(before[k]["mean"], before[k]["var"], mean, var, f"BN {k}")
