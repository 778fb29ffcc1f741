"""Graphs in the shape two exporters write them, built with onnx.helper (no framework needed).

:func:`paddle_style` is what paddle2onnx writes (compare the PP-OCR models inside the
rapidocr-onnxruntime wheel, ``test_wheels.py``): opset 11, IR 7, *no initializers* (every
weight and every BN statistic is the output of an unnamed ``Constant`` node), ``dim_value:
-1`` for the batch axis and ``dim_param: "?"`` for image axes, no value_info, hard-swish as
``x * Clip(x + 3, 0, 6) / 6`` with Constant clip bounds, a squeeze-excite block with
HardSigmoid, a residual Add, and a ``Reshape(0, -1)`` head.

:func:`tf2onnx_style` is tf2onnx's FusedBatchNorm dialect: an NHWC input with a
``unk__N`` batch, every BN between an NHWC->NCHW and an NCHW->NHWC Transpose (the shape
before tf2onnx's transpose optimizer), TF-style tensor names with ``:0``, ``ReduceMean`` over
H, W and a MatMul head; one BN reads a tensor two Transposes away from its Conv, and one a
transposed BiasAdd. The real tf2onnx files are in ``data/`` (``make_tf2onnx.py``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Graph:
    """Accumulates nodes; constants become unnamed Constant nodes or initializers."""

    def __init__(self, seed: int, constants_as_nodes: bool):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.as_nodes = constants_as_nodes
        self.k = 0

    def const(self, name: str, value) -> str:
        value = np.asarray(value)
        if self.as_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op: str, inputs: list[str], out: str, name: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, prefix: str, k: int = 3, group: int = 1,
             bias: bool = False) -> str:
        w = self.rng.normal(size=(cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))
        ins = [x, self.const(f"{prefix}_weights", w.astype(np.float32))]
        if bias:
            ins.append(self.const(f"{prefix}_bias", self.rng.normal(size=cout).astype(np.float32) * 0.1))
        return self.op("Conv", ins, f"{prefix}.tmp_0", kernel_shape=[k, k], pads=[k // 2] * 4,
                       group=group, strides=[1, 1], dilations=[1, 1])

    def bn(self, x: str, c: int, prefix: str, out: str, name: str = "", eps: float = 1e-5) -> str:
        r = self.rng
        stats = {
            "scale": r.uniform(0.5, 1.5, c), "offset": r.normal(size=c) * 0.2,
            "mean": r.normal(size=c), "variance": r.uniform(0.5, 3.0, c),
        }
        ins = [self.const(f"{prefix}_bn_{k}", v.astype(np.float32)) for k, v in stats.items()]
        return self.op("BatchNormalization", [x, *ins], out, name=name, epsilon=eps, momentum=0.9)


def _hard_swish(g: _Graph, x: str, tag: str) -> str:
    three, zero, six = (g.const(f"{tag}_{n}", np.array(v, np.float32)) for n, v in
                        (("three", 3.0), ("zero", 0.0), ("six", 6.0)))
    t = g.op("Add", [x, three], f"{tag}.tmp_a")
    t = g.op("Clip", [t, zero, six], f"{tag}.tmp_c")
    t = g.op("Mul", [x, t], f"{tag}.tmp_m")
    return g.op("Div", [t, six], f"{tag}.tmp_d")


def paddle_style(seed: int = 0) -> onnx.ModelProto:
    """A paddle2onnx-shaped MobileNetV3-like block stack (input ``x``: (-1, 3, ?, ?))."""
    g = _Graph(seed, constants_as_nodes=True)
    h = g.bn(g.conv("x", 3, 8, "conv1"), 8, "conv1", "batch_norm_0.tmp_2", "BatchNormalization@0")
    h = _hard_swish(g, h, "hswish_0")
    skip = h
    h = g.bn(g.conv(h, 8, 8, "conv2_dw", group=8), 8, "conv2_dw", "batch_norm_1.tmp_2")  # unnamed
    h = g.op("Relu", [h], "relu_0.tmp_0")
    se = g.op("GlobalAveragePool", [h], "pool2d_0.tmp_0")
    se = g.op("Relu", [g.conv(se, 8, 4, "conv2_se_1", k=1, bias=True)], "relu_1.tmp_0")
    se = g.op("HardSigmoid", [g.conv(se, 4, 8, "conv2_se_2", k=1, bias=True)], "hard_sigmoid_0.tmp_0",
              alpha=0.2, beta=0.5)
    h = g.op("Mul", [h, se], "elementwise_mul_0")
    h = g.bn(g.conv(h, 8, 8, "conv2_linear", k=1), 8, "conv2_linear", "batch_norm_2.tmp_2",
             "BatchNormalization@2")
    h = g.op("Add", [h, skip], "elementwise_add_0")
    h = g.bn(g.conv(h, 8, 16, "conv_last", k=1), 16, "conv_last", "batch_norm_3.tmp_2",
             "BatchNormalization@3")
    h = _hard_swish(g, h, "hswish_1")
    h = g.op("GlobalAveragePool", [h], "pool2d_1.tmp_0")
    h = g.op("Reshape", [h, g.const("reshape_shape", np.array([0, -1], np.int64))], "reshape2_0.tmp_0")
    w = g.const("fc_0.w_0", (g.rng.normal(size=(16, 2)) * 0.3).astype(np.float32))
    h = g.op("MatMul", [h, w], "fc_0.tmp_0")
    g.op("Softmax", [h], "softmax_0.tmp_0", axis=1)
    graph = helper.make_graph(
        g.nodes, "paddle-infer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])],
        [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT, [-1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)],
                              producer_name="PaddlePaddle", ir_version=7)
    return model


def _nhwc_bn(g: _Graph, x_nhwc: str, c: int, tag: str) -> str:
    """tf2onnx's FusedBatchNorm: Transpose to NCHW, BN, Transpose back."""
    t = g.op("Transpose", [x_nhwc], f"{tag}/FusedBatchNormV3__t:0", perm=[0, 3, 1, 2])
    y = g.bn(t, c, tag, f"{tag}/FusedBatchNormV3:0", name=f"{tag}/FusedBatchNormV3", eps=1e-3)
    return g.op("Transpose", [y], f"{tag}/FusedBatchNormV3__t2:0", perm=[0, 2, 3, 1])


def _nhwc_conv(g: _Graph, x_nhwc: str, cin: int, cout: int, tag: str, group: int = 1) -> str:
    t = g.op("Transpose", [x_nhwc], f"{tag}/Conv2D__t:0", perm=[0, 3, 1, 2])
    y = g.conv(t, cin, cout, f"{tag}/Conv2D", group=group)
    return g.op("Transpose", [y], f"{tag}/Conv2D:0", perm=[0, 2, 3, 1])


def tf2onnx_style(seed: int = 0, side: int = 16) -> onnx.ModelProto:
    """A tf2onnx-shaped NHWC graph (input ``image``: (unk__12, side, side, 3))."""
    g = _Graph(seed, constants_as_nodes=False)
    p = "StatefulPartitionedCall/model"
    h = _nhwc_conv(g, "image", 3, 8, f"{p}/conv2d")
    h = g.op("Relu", [_nhwc_bn(g, h, 8, f"{p}/batch_normalization")], f"{p}/re_lu/Relu:0")
    h = _nhwc_conv(g, h, 8, 8, f"{p}/depthwise_conv2d", group=8)
    bias = g.const(f"{p}/depthwise_conv2d/BiasAdd/ReadVariableOp:0",
                   np.linspace(-1, 1, 8).astype(np.float32))
    h = g.op("Add", [h, bias], f"{p}/depthwise_conv2d/BiasAdd:0")
    h = _nhwc_bn(g, h, 8, f"{p}/batch_normalization_1")
    lo, hi = (g.const(f"{p}/re_lu_1/{n}:0", np.array(v, np.float32)) for n, v in (("min", 0.0), ("max", 6.0)))
    h = g.op("Clip", [h, lo, hi], f"{p}/re_lu_1/Relu6:0")
    axes = g.const(f"{p}/global_average_pooling2d/Mean/reduction_indices:0", np.array([1, 2], np.int64))
    h = g.op("ReduceMean", [h, axes], f"{p}/global_average_pooling2d/Mean:0", keepdims=0)
    w = g.const(f"{p}/dense/MatMul/ReadVariableOp:0", (g.rng.normal(size=(8, 4)) * 0.3).astype(np.float32))
    g.op("MatMul", [h, w], "dense")
    graph = helper.make_graph(
        g.nodes, "tf2onnx",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["unk__12", side, side, 3])],
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__13", 4])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="tf2onnx", ir_version=8)
    return model
