"""Keras 3 ``BatchNormalization`` on the TensorFlow and torch backends vs bnref.

The backend is fixed per process, so each runs in a worker of its own: TensorFlow in
``.venv-tf``, torch in a second process of the main environment (``KERAS_BACKEND=torch``). The
JAX backend runs in this process (``test_keras.py``). Same configurations, one row per backend.
"""

import numpy as np
import pytest

from bnref.conventions import KERAS
from bnref.testing import Tolerance, check_case
from tests.conformance._lib import (
    BF16,
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

CONFIGS = [(2, -1, None, None), (4, -1, None, None), (3, 1, None, None), (4, -1, 1e-5, 0.9)]
CFG_DTYPES = [(c, np.float32) for c in CONFIGS] + [(CONFIGS[1], dt) for dt in (np.float64, np.float16, BF16)]
BACKENDS = ["tensorflow", "torch"]


@pytest.fixture(params=BACKENDS)
def keras_worker(request):
    if request.param == "torch":
        return request.getfixturevalue("keras_torch_worker")
    return request.getfixturevalue("tf_worker")


def _row(worker):
    d = worker.call("adapters_tf:keras_defaults", module="keras")
    return f"Keras 3 ({'TensorFlow' if d['backend'] == 'tensorflow' else d['backend']})", d


def test_defaults_match_convention(keras_worker):
    _, d = _row(keras_worker)
    assert (d["momentum"], d["epsilon"], d["axis"]) == (KERAS.momentum, KERAS.eps, KERAS.channel_axis)


@pytest.mark.parametrize("cfg,dtype", CFG_DTYPES, ids=config_id)
def test_batch_normalization(matrix, keras_worker, cfg, dtype):
    rank, axis, eps, mom = cfg
    framework, d = _row(keras_worker)
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=20 + rank)
    tol, variant = None, config_id(cfg)
    if d["backend"] == "torch" and dtype == np.float64:
        tol, variant = Tolerance.for_dtype(np.float32), variant + " at float32's bound (see below)"
    compare(matrix, framework, "layers.BatchNormalization", keras_worker.versions["keras"],
            remote_impl(keras_worker, "adapters_tf:keras_layer", module="keras"),
            with_eps(KERAS, eps), case, momentum=mom, tol=tol, variant=variant)


def test_torch_backend_computes_float64_in_float32(keras_torch_worker):
    """Keras 3 casts BN inputs to ``result_type(dtype, "float32")``, which is float32 for float64
    on the torch backend: a float64 layer misses float64's bound (within float32's: above)."""
    case = make_case(shape_with_channels(4, -1), -1, np.float64, seed=24)
    impl = remote_impl(keras_torch_worker, "adapters_tf:keras_layer", module="keras")
    with pytest.raises(AssertionError, match="differs from bnref"):
        check_case(impl, KERAS, case)


@pytest.mark.parametrize("momentum", [0.99, 0.6])
def test_several_updates(matrix, keras_worker, momentum):
    framework, _ = _row(keras_worker)
    xs = batches(shape_with_channels(4, -1), -1, np.float32, 5, seed=7)
    got_m, got_v = keras_worker.call("adapters_tf:keras_updates", *xs, module="keras", momentum=momentum)
    check_updates(matrix, framework, "layers.BatchNormalization", keras_worker.versions["keras"], replay(got_m, got_v),
                  lambda rm, rv, mo: KERAS.update(rm, rv, mo, momentum=momentum), xs,
                  np.zeros(3), np.ones(3), axis=-1, variant=f"5 updates, momentum={momentum}")
