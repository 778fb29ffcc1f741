"""Export the NumPy conv net to ONNX, with its BatchNormalization nodes kept or folded away.

BN-kept (``to_onnx(params, stats)``), for ``widths = (8, 16, 16, 32, 32)``::

    image[N, 1, 28, 28] -> Conv(conv0) -> BatchNormalization(bn0) -> Relu -> ... -> Conv(conv4)
                        -> bn4 -> Relu -> GlobalAveragePool -> Flatten -> Gemm(fc) -> logits[N, 10]

Folded (``to_onnx(convnet.fold(params, stats), None)``): the same graph without the BN nodes,
each Conv with the folded weight and a bias — what torch.onnx, tf2onnx or onnxsim write by
default. The fold is done here in NumPy (:func:`demo.convnet.fold`), so no framework is needed.

Every tensor has its own initializer (nothing shared); BN nodes have ``epsilon = model.EPS`` and
ONNX ``momentum = 0.9``. Runs with the onnxruntime session helpers of :mod:`demo.export`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from demo import export as X
from demo.convnet import SIDE, STRIDES
from demo.model import EPS, Params, Stats

__all__ = ["to_onnx", "nchw", "run_logits", "onnx_accuracy"]


def _conv_weight(w: np.ndarray) -> np.ndarray:
    """im2col weight ``(C_in * 9, C_out)`` -> ONNX ``(C_out, C_in, 3, 3)`` (columns are C, row, col)."""
    c_out = w.shape[1]
    return np.ascontiguousarray(w.T.reshape(c_out, -1, 3, 3))


def to_onnx(params: Params, stats: Stats | None, name: str = "bnref_demo_convnet") -> onnx.ModelProto:
    """The conv net as ONNX: BN nodes with ``stats``, or, with ``stats=None``, a folded network.

    A folded network (:func:`demo.convnet.fold`) has conv biases ``c{i}`` and no BN parameters.
    """
    k = sum(1 for p in params if p.startswith("W")) - 1
    if stats is not None and len(stats) != k:
        raise ValueError(f"stats must hold {k} (mean, var) pairs, got {len(stats)}")
    inits, nodes = [], []

    def init(tensor_name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), tensor_name))
        return tensor_name

    h = X.INPUT
    for i in range(k):
        conv_in = [h, init(f"conv{i}.weight", _conv_weight(params[f"W{i}"]))]
        if f"c{i}" in params:
            conv_in.append(init(f"conv{i}.bias", params[f"c{i}"]))
        s = STRIDES[i]
        nodes.append(
            helper.make_node(
                "Conv", conv_in, [f"conv{i}"], name=f"conv{i}",
                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[s, s],
            )
        )
        h = f"conv{i}"
        if stats is not None:
            bn_in = [
                h,
                init(f"bn{i}.scale", params[f"gamma{i}"]),
                init(f"bn{i}.bias", params[f"beta{i}"]),
                init(f"bn{i}.running_mean", stats[i][0]),
                init(f"bn{i}.running_var", stats[i][1]),
            ]
            nodes.append(
                helper.make_node("BatchNormalization", bn_in, [f"bn{i}"], name=f"bn{i}", epsilon=EPS, momentum=0.9)
            )
            h = f"bn{i}"
        nodes.append(helper.make_node("Relu", [h], [f"relu{i}"], name=f"relu{i}"))
        h = f"relu{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    w, b = init("fc.weight", params[f"W{k}"]), init("fc.bias", params[f"b{k}"])
    nodes.append(helper.make_node("Gemm", ["flat", w, b], [X.OUTPUT], name="fc"))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(X.INPUT, TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info(X.OUTPUT, TensorProto.FLOAT, ["N", params[f"b{k}"].shape[0]])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", X.OPSET)], producer_name="bnref-demo", ir_version=8
    )
    onnx.checker.check_model(model)
    return model


def nchw(x: np.ndarray) -> np.ndarray:
    """Flattened ``(n, 784)`` digits -> the model input ``(n, 1, 28, 28)`` float32."""
    return np.ascontiguousarray(np.asarray(x, np.float32).reshape(len(x), 1, SIDE, SIDE))


def run_logits(model_or_session, x: np.ndarray) -> np.ndarray:
    """Logits of flattened digits ``x`` from the ONNX conv net (or its :func:`demo.export.session`)."""
    return X.run_logits(model_or_session, nchw(x))


def onnx_accuracy(model_or_session, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the ONNX conv net on flattened digits ``(x, y)``."""
    return X.onnx_accuracy(model_or_session, nchw(x), y)
