"""TensorFlow 2.21 and tf-keras 2 vs bnref, run in ``.venv-tf`` through a worker process.

APIs: the raw ``FusedBatchNormV3`` op and ``tf.compat.v1.nn.fused_batch_norm`` (momentum =
``exponential_avg_factor``, the batch's weight), ``tf.nn.moments`` + ``tf.nn.batch_normalization``
(running statistics: the user's EMA of the moments), tf-keras 2 ``BatchNormalization`` (fused on
4-D/5-D inputs, plain ops otherwise). Keras 3 on the TensorFlow backend: ``test_keras_backends``.
"""

from dataclasses import replace

import numpy as np
import pytest

from bnref.conventions import KERAS, TF_FUSED, TF_KERAS2
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

HALF = [np.float16, BF16]


def tf_keras2_for(rank: int):
    """tf-keras 2 takes the fused op (Bessel-corrected moving variance) on 4-D/5-D inputs only."""
    return TF_KERAS2 if rank in (4, 5) else replace(TF_KERAS2, unbiased_running_var=False)


# -- the fused op ---------------------------------------------------------------------------------

FUSED_CONFIGS = [(4, -1, None, None), (4, 1, None, None), (5, -1, None, None), (4, -1, 1e-2, 0.3)]
FUSED = [(c, np.float32) for c in FUSED_CONFIGS] + [(FUSED_CONFIGS[0], dt) for dt in HALF]


@pytest.mark.parametrize("api", ["raw", "v1"])
@pytest.mark.parametrize("cfg,dtype", FUSED, ids=config_id)
def test_fused_batch_norm(matrix, tf_worker, api, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=40 + rank)
    name = "raw_ops.FusedBatchNormV3" if api == "raw" else "compat.v1.nn.fused_batch_norm"
    compare(matrix, "TensorFlow", name, tf_worker.versions["tensorflow"],
            remote_impl(tf_worker, "adapters_tf:tf_fused", api=api), with_eps(TF_FUSED, eps), case,
            momentum=mom, variant=config_id(cfg))


def test_fused_eps_is_not_floored(matrix, tf_worker):
    """TF 2.21 uses eps as given, on the raw op and the v1 wrapper: no 1.001e-5 floor (FACTS.md
    recorded one; older wrappers clamped for cuDNN). At std 1e-4 the floor would shrink y 20x."""
    case = make_case(shape_with_channels(4, -1), -1, np.float32, seed=5, log10_std=(-4.0, -4.0))
    assert TF_FUSED.min_eps == 0.0
    for api in ("raw", "v1"):
        impl = remote_impl(tf_worker, "adapters_tf:tf_fused", api=api)
        compare(matrix, "TensorFlow", "raw_ops.FusedBatchNormV3" if api == "raw" else
                "compat.v1.nn.fused_batch_norm", tf_worker.versions["tensorflow"], impl,
                with_eps(TF_FUSED, 1e-8), case, momentum=1.0, variant="eps=1e-8 at std 1e-4")
        y = impl.train(case.x, case.scale, case.bias, case.running_mean, case.running_var,
                       eps=1e-8, momentum=1.0, axis=-1)[0]
        # the same eps=1e-8 under the old record's floor: bnref then uses 1.001e-5 and y differs
        floored = replace(TF_FUSED, eps=1e-8, min_eps=1.001e-5)
        with pytest.raises(AssertionError, match=r"y \(training mode\) differs"):
            compare(matrix.__class__(), "x", "x", "x", _fixed(y), floored, case, momentum=1.0)


def _fixed(y):
    from bnref.testing import BatchNormImpl

    return BatchNormImpl(train=lambda x, s, b, rm, rv, **_: (y, rm, rv))


# -- tf.nn.moments + tf.nn.batch_normalization -----------------------------------------------------

MOMENTS_CONFIGS = [(2, -1, None, None), (3, 1, None, None), (4, -1, None, None), (5, 1, 1e-2, 0.5)]
MOMENTS = [(c, np.float32) for c in MOMENTS_CONFIGS] + [(MOMENTS_CONFIGS[2], dt)
                                                         for dt in (np.float64, *HALF)]
TF_NN = replace(KERAS, name="tf.nn (user EMA)")


@pytest.mark.parametrize("cfg,dtype", MOMENTS, ids=config_id)
def test_moments_and_batch_normalization(matrix, tf_worker, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=50 + rank)
    compare(matrix, "TensorFlow", "nn.moments + nn.batch_normalization",
            tf_worker.versions["tensorflow"], remote_impl(tf_worker, "adapters_tf:tf_nn_moments"),
            with_eps(TF_NN, eps), case, momentum=mom, variant=config_id(cfg))


# -- tf-keras 2 -------------------------------------------------------------------------------------

KERAS2_CONFIGS = [(2, -1, None, None), (3, 1, None, None), (4, -1, None, None), (4, 1, None, None),
                  (5, -1, 1e-5, 0.9)]
KERAS2 = [(c, np.float32) for c in KERAS2_CONFIGS] + [(KERAS2_CONFIGS[2], dt) for dt in HALF] + \
    [(KERAS2_CONFIGS[0], np.float64), (KERAS2_CONFIGS[0], BF16)]


def test_tf_keras2_defaults(tf_worker):
    d = tf_worker.call("adapters_tf:keras_defaults", module="tf_keras")
    assert (d["momentum"], d["epsilon"], d["axis"]) == (TF_KERAS2.momentum, TF_KERAS2.eps,
                                                        TF_KERAS2.channel_axis)


@pytest.mark.parametrize("cfg,dtype", KERAS2, ids=config_id)
def test_tf_keras2_batch_normalization(matrix, tf_worker, cfg, dtype):
    rank, axis, eps, mom = cfg
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=60 + rank)
    fused = "fused" if rank in (4, 5) else "not fused"
    if dtype == np.float64:  # tf-keras makes the decay 1 - momentum a float32 tensor
        mom = 1.0 - float(np.float32(1.0 - (mom or TF_KERAS2.momentum)))
        fused += ", decay 1 - momentum in float32"
    compare(matrix, "tf-keras 2", "layers.BatchNormalization", tf_worker.versions["tf-keras"],
            remote_impl(tf_worker, "adapters_tf:keras_layer", module="tf_keras"),
            with_eps(tf_keras2_for(rank), eps), case, momentum=mom, variant=f"{config_id(cfg)} ({fused})")


@pytest.mark.parametrize("rank", [2, 4])
def test_tf_keras2_moving_variance_bessel_depends_on_the_path(tf_worker, rank):
    """The finding behind TF_KERAS2: on the fused path (4-D) the moving variance takes the
    Bessel-corrected batch variance, on the plain path (2-D) the biased one. One update with
    momentum 0 makes the moving variance the batch variance itself."""
    shape = shape_with_channels(rank, -1)
    x = make_case(shape, -1, np.float32, seed=3).x
    _, var = tf_worker.call("adapters_tf:keras_updates", x, module="tf_keras", momentum=0.0)
    x64 = x.astype(np.float64).reshape(-1, shape[-1])
    ddof = 1 if rank == 4 else 0
    np.testing.assert_allclose(var[0], x64.var(0, ddof=ddof), rtol=1e-4)
    assert not np.allclose(var[0], x64.var(0, ddof=1 - ddof), rtol=1e-3)


@pytest.mark.parametrize("rank,momentum", [(4, 0.99), (4, 0.6), (2, 0.6)])
def test_tf_keras2_several_updates(matrix, tf_worker, rank, momentum):
    shape = shape_with_channels(rank, -1)
    xs = batches(shape, -1, np.float32, 5, seed=7)
    got_m, got_v = tf_worker.call("adapters_tf:keras_updates", *xs, module="tf_keras", momentum=momentum)
    conv = tf_keras2_for(rank)
    check_updates(matrix, "tf-keras 2", "layers.BatchNormalization", tf_worker.versions["tf-keras"],
                  replay(got_m, got_v), lambda rm, rv, mo: conv.update(rm, rv, mo, momentum=momentum), xs,
                  np.zeros(3), np.ones(3), axis=-1, variant=f"5 updates, rank {rank}, momentum={momentum}")
