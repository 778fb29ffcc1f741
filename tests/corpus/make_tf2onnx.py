"""Regenerate ``data/tf2onnx_*.onnx``: a small NHWC TensorFlow graph converted by tf2onnx.

Not a test (needs ``tensorflow-cpu`` and ``tf2onnx``, ~600 MB, which the project does not
install)::

    python -m venv /tmp/tfx && /tmp/tfx/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tfx/bin/python tests/corpus/make_tf2onnx.py

The graph is Conv2D -> FusedBatchNormV3 -> Relu -> DepthwiseConv2D -> BiasAdd ->
FusedBatchNormV3 -> Relu6 -> mean -> MatMul in NHWC (what tf.keras 2 BatchNormalization and
tf.compat.v1 models emit; Keras 3 emits primitive Mul/Add instead, see the corpus README).
Three conversions: ``default`` (tf2onnx's optimizers: the transposes are pushed out and BN is
folded into Conv: nothing left to recalibrate), ``no_bn_fusion`` (the default optimizers less
``remove_back_to_back``, the one that folds Conv -> BN: the transposes are gone and each BN
reads a Conv output in NCHW) and ``unoptimized`` (no optimizer: every BN sits between
NHWC->NCHW and NCHW->NHWC Transposes, as tf2onnx's FusedBatchNorm handler writes it).
"""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = Path(__file__).resolve().parent / "data"


def graph(training: bool = False):
    """The converted function; ``training=True`` runs each FusedBatchNormV3 in training mode
    and also returns its batch mean and (Bessel-corrected) variance, for the live check
    (``tests/corpus/test_live_exports.py``, through ``tests/conformance/exports.py``)."""
    rng = np.random.default_rng(0)
    f = np.float32

    def const(shape, low=None):
        v = rng.normal(size=shape) if low is None else rng.uniform(low, low + 1, size=shape)
        return v.astype(f)

    w1, w2, wd = const((3, 3, 3, 8)), const((3, 3, 8, 1)), const((8, 6))
    bias = np.linspace(-1, 1, 8).astype(f)
    bn = [(const(8, 0.5), const(8), const(8), const(8, 1.0)) for _ in range(2)]

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="image")])
    def fn(x):
        # Constants made inside the function are Const ops tf2onnx turns into initializers
        # (captured eager tensors would become graph inputs).
        c = tf.constant
        stats = []

        def batch_norm(h, s, o, m, v):
            if not training:
                return tf.compat.v1.nn.fused_batch_norm(h, c(s), c(o), c(m), c(v), epsilon=1e-3,
                                                        is_training=False)[0]
            h, mean, var = tf.compat.v1.nn.fused_batch_norm(h, c(s), c(o), epsilon=1e-3)
            stats.extend([mean, var])
            return h

        h = tf.nn.conv2d(x, c(w1), 1, "SAME")
        h = tf.nn.relu(batch_norm(h, *bn[0]))
        h = tf.nn.depthwise_conv2d(h, c(w2), [1, 1, 1, 1], "SAME") + c(bias)
        h = batch_norm(h, *bn[1])
        out = tf.reduce_mean(tf.nn.relu6(h), axis=[1, 2]) @ c(wd)
        return (out, *stats) if training else out

    return fn


def main() -> None:
    import tf2onnx
    import tf2onnx.optimizer

    fn = graph()
    default = dict(tf2onnx.optimizer._optimizers)
    # remove_back_to_back is the optimizer that folds Conv -> BatchNormalization.
    no_fusion = {k: v for k, v in default.items() if k != "remove_back_to_back"}
    for name, optimizers in (("default", default), ("no_bn_fusion", no_fusion), ("unoptimized", {})):
        tf2onnx.optimizer._optimizers = optimizers
        model, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=15)
        path = HERE / f"tf2onnx_{name}.onnx"
        path.write_bytes(model.SerializeToString())
        print("wrote", path, [n.op_type for n in model.graph.node])
    tf2onnx.optimizer._optimizers = default


if __name__ == "__main__":
    main()
