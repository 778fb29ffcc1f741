"""Keras 3's own ONNX export (torch backend) writes BN as NHWC arithmetic: ``unfold`` makes it
recalibratable.

The export has no BatchNormalization: each Conv2D/DepthwiseConv2D is an NCHW Conv between
Transposes and Casts, followed by Sub/Mul/Add with (C,) constants in NHWC
(``test_keras_export.py``). That arithmetic is a per-channel affine map after the Conv, so
a BN inserted on the Conv's NCHW output gives what recalibrating the BN would (the twin
``"keras"`` form in ``tests/onnx_tools/test_unfold_dialects.py`` shows it exactly); here the
real file is checked for its sites, identity and cost at inference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.corpus import needs

needs.module("torch")
needs.package_dir("keras")  # imported only in the subprocess, with the torch backend
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

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
h = layers.ReLU()(layers.BatchNormalization()(layers.DepthwiseConv2D(3, padding="same")(h)))
model = keras.Model(inp, layers.Dense(4)(layers.GlobalAveragePooling2D()(h)))
model(np.zeros((2, 16, 16, 3), np.float32))
model.export(sys.argv[1], format="onnx", verbose=False)
"""


def _optimized_kinds(model: onnx.ModelProto, path) -> list[str]:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(path).graph.node)


def test_keras3_export_unfolds_on_the_nchw_conv_outputs(tmp_path):
    path = tmp_path / "keras.onnx"
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True,
                   capture_output=True, timeout=300)
    model = onnx.load(path)
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and "BatchNormalization" not in {n.op_type for n in model.graph.node}
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 16, 16, 3)).astype(np.float32)
    result = ot.unfold(model, a, batch_size=16)
    assert [s.output for s in result.sites] == convs  # the Dense head (MatMul) is no candidate
    assert [bn.depth for bn in result.inserted] == [1, 2]
    x = (a[:8] * 0.4 + 0.7).astype(np.float32)
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                .run(None, {"image": x})[0] for m in (model, result.model))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert _optimized_kinds(result.model, tmp_path / "u.opt") == _optimized_kinds(model, tmp_path / "f.opt")
