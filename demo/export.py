"""Export the NumPy MLP to ONNX (Gemm + BatchNormalization + Relu) and run it with onnxruntime.

The graph, for ``sizes = (784, 256, 128, 10)``::

    image[N, 784] -> Gemm(fc0) -> BatchNormalization(bn0) -> Relu -> Gemm(fc1) -> bn1 -> Relu
                  -> Gemm(fc2, + bias) -> logits[N, 10]

BN keeps its own node (nothing folded into the Gemm, so ``bnref-onnx`` can recalibrate it),
with the given statistics (usually the EMA ones, as a framework would export them) as the
``input_mean``/``input_var`` initializers, ``epsilon = model.EPS`` and ONNX ``momentum = 0.9``
(what torch.onnx writes for PyTorch's 0.1). Every tensor has its own initializer: nothing is
shared, so reading statistics back by name is unambiguous.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from demo.model import EPS, Params, Stats, num_bn

__all__ = ["OPSET", "to_onnx", "save", "bn_stats", "session", "run_logits", "onnx_accuracy"]

OPSET = 17
INPUT, OUTPUT = "image", "logits"


def to_onnx(params: Params, stats: Stats, name: str = "bnref_demo_mlp") -> onnx.ModelProto:
    """The network with ``stats`` in its BatchNormalization nodes, checked by the onnx checker."""
    k = num_bn(params)
    if len(stats) != k:
        raise ValueError(f"stats must hold {k} (mean, var) pairs, got {len(stats)}")
    inits, nodes = [], []

    def init(tensor_name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), tensor_name))
        return tensor_name

    h = INPUT
    for i in range(k):
        mean, var = stats[i]
        nodes.append(
            helper.make_node("Gemm", [h, init(f"fc{i}.weight", params[f"W{i}"])], [f"fc{i}"], name=f"fc{i}")
        )
        bn_in = [
            f"fc{i}",
            init(f"bn{i}.scale", params[f"gamma{i}"]),
            init(f"bn{i}.bias", params[f"beta{i}"]),
            init(f"bn{i}.running_mean", mean),
            init(f"bn{i}.running_var", var),
        ]
        nodes.append(
            helper.make_node(
                "BatchNormalization", bn_in, [f"bn{i}"], name=f"bn{i}", epsilon=EPS, momentum=0.9
            )
        )
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"relu{i}"))
        h = f"relu{i}"
    w, b = init(f"fc{k}.weight", params[f"W{k}"]), init(f"fc{k}.bias", params[f"b{k}"])
    nodes.append(helper.make_node("Gemm", [h, w, b], [OUTPUT], name=f"fc{k}"))
    d_in, d_out = params["W0"].shape[0], params[f"W{k}"].shape[1]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", d_in])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", d_out])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnref-demo", ir_version=8
    )
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path``."""
    onnx.save(model, os.fspath(path))


def bn_stats(model: onnx.ModelProto) -> Stats:
    """The ``(mean, var)`` stored in every BatchNormalization node, in graph order."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            out.append((values[node.input[3]], values[node.input[4]]))
    return out


def session(model: onnx.ModelProto):
    """A single-threaded CPU onnxruntime session (deterministic, and the fastest here)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_logits(model_or_session, x: np.ndarray) -> np.ndarray:
    """Logits of ``x`` from the ONNX model (or a session made by :func:`session`)."""
    sess = session(model_or_session) if isinstance(model_or_session, onnx.ModelProto) else model_or_session
    return sess.run([OUTPUT], {INPUT: np.ascontiguousarray(x, np.float32)})[0]


def onnx_accuracy(model_or_session, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the ONNX model on ``(x, y)``."""
    return float((run_logits(model_or_session, x).argmax(axis=1) == y).mean())
