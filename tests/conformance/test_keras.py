"""Keras 3 BatchNormalization on the JAX backend vs bnref (momentum 0.99, eps 1e-3, channels-last)."""

import os

import ml_dtypes
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")
pytest.importorskip("jax")

from bnref.conventions import KERAS  # noqa: E402
from tests.conformance import adapters  # noqa: E402
from tests.conformance._lib import (  # noqa: E402
    batches,
    check_updates,
    compare,
    make_case,
    shape_with_channels,
    with_eps,
)

pytestmark = [
    pytest.mark.frameworks,
    pytest.mark.skipif(keras.backend.backend() != "jax", reason="needs KERAS_BACKEND=jax"),
]
V = keras.__version__

CONFIGS = [
    (2, -1, None, None),
    (4, -1, None, None),
    (3, 1, None, None),
    (4, -1, 1e-5, 0.9),
]


def _id(c):
    return f"rank{c[0]}-axis{c[1]}-eps{c[2]}-mom{c[3]}"


def test_defaults_match_convention():
    bn = keras.layers.BatchNormalization()
    assert (bn.momentum, bn.epsilon, bn.axis) == (KERAS.momentum, KERAS.eps, KERAS.channel_axis)


CFG_DTYPES = [(c, np.float32) for c in CONFIGS] + [(CONFIGS[1], np.float16),
                                                   (CONFIGS[1], np.dtype(ml_dtypes.bfloat16))]


@pytest.mark.parametrize("cfg,dtype", CFG_DTYPES, ids=lambda v: _id(v) if isinstance(v, tuple) else np.dtype(v).name)
def test_batch_normalization(matrix, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=20 + rank)
    compare(matrix, "Keras 3 (JAX)", "layers.BatchNormalization", V, adapters.keras_bn(),
            with_eps(KERAS, eps), case, momentum=mom, variant=_id(cfg))


@pytest.mark.parametrize("momentum", [0.99, 0.6])
def test_several_updates(matrix, momentum):
    shape = shape_with_channels(4, -1)
    xs = batches(shape, -1, np.float32, 5, seed=7)
    layer = keras.layers.BatchNormalization(momentum=momentum)
    layer.build(shape)

    def step(x):
        layer(x, training=True)
        return np.asarray(layer.moving_mean.value), np.asarray(layer.moving_variance.value)

    check_updates(matrix, "Keras 3 (JAX)", "layers.BatchNormalization", V, step,
                  lambda rm, rv, mo: KERAS.update(rm, rv, mo, momentum=momentum), xs,
                  np.zeros(3), np.ones(3), axis=-1, variant=f"5 updates, momentum={momentum}")
