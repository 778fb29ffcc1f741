"""Regenerate ``data/paddle2onnx_bn.onnx``: a small PaddlePaddle CNN exported by paddle2onnx, BN kept.

Not a test. paddle2onnx 2.1 pins ``onnx<=1.17``, so it runs in the Paddle environment of
``make test-reference`` (``tests/conformance/envs/paddle.txt``), never in ``.venv``::

    make .venv-paddle/.stamp && .venv-paddle/bin/python tests/corpus/make_paddle2onnx.py

The model: Conv2D -> BatchNorm2D -> ReLU -> depthwise Conv2D -> BatchNorm2D -> ReLU ->
global average pool -> Linear, NCHW, weights and running statistics from a fixed NumPy seed.
``paddle.jit.save`` then ``paddle2onnx.export(..., enable_optimize=False)``: with its optimizer
on, paddle2onnx folds each BN into the Conv before it (nothing left to recalibrate).
``tests/corpus/test_live_exports.py`` checks the exported BNs against Paddle's own training-mode
statistics (``model`` here, run in a worker).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "data"
OPSET = 13


def model():
    """The network, in eval mode, with its fixed weights and statistics."""
    import paddle

    rng = np.random.default_rng(0)
    net = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
        paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
        paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(8, 4),
    )
    for p in net.parameters():
        p.set_value(rng.normal(scale=0.5, size=p.shape).astype(np.float32))
    for bn in batchnorms(net):
        bn.weight.set_value(rng.uniform(0.5, 1.5, 8).astype(np.float32))
        bn._mean.set_value(rng.normal(size=8).astype(np.float32))
        bn._variance.set_value(rng.uniform(1.0, 2.0, 8).astype(np.float32))
    net.eval()
    return net


def batchnorms(net):
    """The BatchNorm2D layers, in graph order."""
    import paddle

    return [m for m in net.sublayers() if isinstance(m, paddle.nn.BatchNorm2D)]


def main() -> None:
    """Export ``model()`` to ``data/paddle2onnx_bn.onnx``."""
    import paddle
    import paddle2onnx

    net = model()
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "image")]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "net")
        paddle.jit.save(net, prefix, input_spec=spec)
        files = {p.suffix: p for p in Path(tmp).iterdir()}
        model_file = files.get(".json") or files[".pdmodel"]
        exported = Path(tmp) / "net.onnx"
        paddle2onnx.export(str(model_file), str(files[".pdiparams"]), str(exported),
                           opset_version=OPSET, enable_optimize=False)
        import onnx

        m = onnx.load(exported)
        if not any(n.op_type == "BatchNormalization" for n in m.graph.node):
            sys.exit("paddle2onnx folded the BatchNorms: nothing to recalibrate (the committed file is kept)")
        out = HERE / "paddle2onnx_bn.onnx"
        shutil.copyfile(exported, out)  # only once it is known to be good
    print("wrote", out, out.stat().st_size, "bytes:", [n.op_type for n in m.graph.node])


if __name__ == "__main__":
    main()
