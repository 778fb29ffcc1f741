"""Real exports against the exporting framework's own training-mode statistics.

The tf2onnx files in ``data/`` (``make_tf2onnx.py``) are converted from a TF 2.21 graph with two
FusedBatchNormV3 nodes. Here TF itself runs that graph in training mode (``.venv-tf``, through
``tests.conformance.remote``) on the same batches; the population statistics of its per-batch
moments must be what ``bnref-onnx recalibrate`` writes into the ONNX file's BNs.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest

import bnref
from tests.conformance.remote import start_worker
from tests.corpus import needs
from tests.corpus.reference import assert_stats_close, batchnorm_tensors

needs.module("onnxruntime")
import onnx_tools as ot  # noqa: E402

pytestmark = [pytest.mark.frameworks, pytest.mark.reference]
DATA = Path(__file__).resolve().parent / "data"
BATCH = 8


@pytest.fixture(scope="module")
def tf_worker():
    w = start_worker("tf", {"TF_CPP_MIN_LOG_LEVEL": "3"})
    yield w
    w.close()


def _images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_image = rng.normal(size=(n,) + (1,) * len(shape))
    return (rng.normal(size=(n, *shape)) * 1.3 + per_image + 0.2).astype(np.float32)


def population(means, variances_ddof1, n_per_batch: int):
    """bnref's population estimate from per-batch moments (variances Bessel-corrected)."""
    p = bnref.PreciseBN("population")
    for m, v in zip(means, variances_ddof1, strict=True):  # M2 = (n - 1) * unbiased variance
        p.update(bnref.Moments(count=n_per_batch, mean=m, m2=v.astype(np.float64) * (n_per_batch - 1)))
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
        mean, var = population(tf_stats[2 * k], tf_stats[2 * k + 1], n)
        assert_stats_close(bn["mean"], bn["var"], mean, var, f"BN {k} of {name}")
        # the check has teeth: TF's Bessel-corrected variance as-is is 1/(n-1) off
        with pytest.raises(AssertionError):
            assert_stats_close(bn["mean"], bn["var"], mean, tf_stats[2 * k + 1].mean(0), f"BN {k}")
