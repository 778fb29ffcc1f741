"""Framework side of the real-export checks (run inside a worker): each exported model's own
training-mode batch statistics, per batch, for ``tests/corpus/test_live_exports.py``."""

from __future__ import annotations

import numpy as np


def tf2onnx_batch_stats(*batches):
    """Per BN of ``tests/corpus/make_tf2onnx.graph`` (TF, training mode), stacked over the
    batches: ``(mean_1, var_1, mean_2, var_2)``, each (batches, channels); var Bessel-corrected,
    as FusedBatchNormV3 returns it."""
    from tests.corpus.make_tf2onnx import graph

    fn = graph(training=True)
    per_batch = [[t.numpy() for t in fn(b)[1:]] for b in batches]
    return tuple(np.stack([p[k] for p in per_batch]) for k in range(len(per_batch[0])))


def paddle2onnx_batch_stats(*batches):
    """Per BN of ``tests/corpus/make_paddle2onnx.model`` (Paddle, training mode, momentum 0 so
    the running statistics become each batch's), stacked over the batches: ``(mean_1, var_1,
    mean_2, var_2)``, each (batches, channels); var biased, as Paddle's CPU kernel keeps it."""
    import paddle

    from tests.corpus.make_paddle2onnx import batchnorms, model

    net = model()
    bns = batchnorms(net)
    for bn in bns:
        bn._momentum = 0.0
    net.train()
    per_batch = []
    for b in batches:
        with paddle.no_grad():
            net(paddle.to_tensor(b))
        per_batch.append([a for bn in bns for a in (bn._mean.numpy().copy(), bn._variance.numpy().copy())])
    return tuple(np.stack([p[k] for p in per_batch]) for k in range(len(per_batch[0])))
