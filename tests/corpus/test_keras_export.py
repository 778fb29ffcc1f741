"""Keras 3's own ONNX export: BN arrives as arithmetic, and bnref-onnx says so.

``model.export(path, format="onnx")`` needs tf2onnx + TensorFlow for the TensorFlow and JAX
backends (not installed here) and torch.onnx for the torch backend. Every backend's
``ops.batch_normalization`` is plain arithmetic (``(x - mean) * rsqrt(var + eps) * scale +
offset``), so the file has Sub/Mul/Add with the statistics as constants and no
BatchNormalization node at all: there is nothing to recalibrate. This case exports a
Conv-BN-ReLU model with the torch backend (in a subprocess: the backend is fixed per process,
and the rest of the suite runs Keras on JAX) and checks that ``inspect`` finds no BN and
that its advice names Keras 3.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.corpus import needs

needs.module("torch")
needs.package_dir("keras")  # imported only in the subprocess, with the torch backend
import onnx_tools as ot  # noqa: E402

pytestmark = [pytest.mark.frameworks, pytest.mark.corpus]

SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
import numpy as np, keras
from keras import layers
keras.utils.set_random_seed(0)
inp = keras.Input((16, 16, 3), name="image")
h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, use_bias=False)(inp)))
model = keras.Model(inp, layers.Dense(4)(layers.GlobalAveragePooling2D()(h)))
model(np.zeros((2, 16, 16, 3), np.float32))
model.export(sys.argv[1], format="onnx", verbose=False)
"""


def test_keras3_torch_backend_export_has_no_batchnorm(tmp_path):
    path = tmp_path / "keras.onnx"
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True,
                   capture_output=True, timeout=300)
    import onnx

    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "BatchNormalization" not in ops and {"Sub", "Mul", "Add"} <= ops
    description = ot.describe_model(str(path))
    assert description.batchnorms == []
    assert "Keras 3" in description.advice
