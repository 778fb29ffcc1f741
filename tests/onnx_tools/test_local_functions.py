"""issue 19 item 8: BN inside a model-local function is named and refused, never "folded".

torch.onnx's ``export_modules_as_functions`` puts a module's BN inside a function of the
model, called once per module instance. bnref-onnx does not recalibrate those (yet): every
command refuses the model naming the function, its call sites and the BN, with the advice
to inline the functions first (which this test checks works), and ``inspect`` lists them.
A model with BN both in the main graph and in a function is refused as a whole.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnx.inliner
import onnx.parser
import pytest
from onnx import numpy_helper

import onnx_tools as ot
from tests.onnx_tools.helpers import assert_clean_failure, file_digest, listing, run_cli

FUNCTION_MODEL = """
<ir_version: 8, opset_import: ["" : 15, "local" : 1]>
agraph (float[N,3,4,4] x) => (float[N,3,4,4] y) {{
  {main}
  h1 = local.Block(x0, s1, b1, m1, v1)
  y = local.Block(h1, s2, b2, m2, v2)
}}
<domain: "local", opset_import: ["" : 15]>
Block (inp, s, b, m, v) => (out) {{
  c = BatchNormalization(inp, s, b, m, v)
  out = Relu(c)
}}
"""


def _model(main_bn: bool) -> onnx.ModelProto:
    main = "x0 = BatchNormalization(x, s0, b0, m0, v0)" if main_bn else "x0 = Identity(x)"
    model = onnx.parser.parse_model(FUNCTION_MODEL.format(main=main))
    rng = np.random.default_rng(0)
    for i in range(3):
        for name, value in (("s", rng.uniform(0.5, 2, 3)), ("b", rng.normal(size=3)),
                            ("m", np.zeros(3)), ("v", np.ones(3))):
            model.graph.initializer.append(
                numpy_helper.from_array(value.astype(np.float32), f"{name}{i}"))
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(32, 3, 4, 4))
            .astype(np.float32) * 2 + 1)
    return tmp_path


@pytest.mark.parametrize("main_bn", [False, True])
@pytest.mark.parametrize("command", ["recalibrate", "collect", "apply"])
def test_every_command_refuses_naming_the_function(files, main_bn, command):
    model = files / "fn.onnx"
    onnx.save(_model(main_bn), model)
    stats = files / "s.npz"
    if command == "apply":  # a STATS file of the main-graph BN cannot exist: make one by hand
        np.savez(stats, meta=np.array("{}"))
    args = {"recalibrate": ["recalibrate", model, "--data", files / "x.npy", "-o",
                            files / "o.onnx", "--batch-size", "8"],
            "collect": ["collect", model, "--data", files / "x.npy", "-o", files / "o.npz",
                        "--batch-size", "8"],
            "apply": ["apply", model, stats, "-o", files / "o.onnx"]}[command]
    digest, before = file_digest(model), listing(files)
    code, _, err = run_cli(*args)
    if command == "apply":
        # The STATS file is checked when read; the API refuses the model itself.
        with pytest.raises(ot.ModelError, match=r"inside a model-local function"):
            ot.apply_stats(model, ot.CollectedStats.__new__(ot.CollectedStats))
        assert code == 1
        return
    assert_clean_failure(code, err, 1, "BatchNormalization inside a model-local function is "
                         "not supported: function local.Block (called by h1, y) > c",
                         files, before, model, digest)
    assert "folded" not in err and "inline_local_functions" in err
    with pytest.raises(ot.ModelError, match="local.Block"):
        ot.collect(model, files / "x.npy", batch_size=8)


def test_inspect_lists_them_and_never_says_folded(files):
    model = files / "fn.onnx"
    onnx.save(_model(False), model)
    code, out, err = run_cli("inspect", model)
    assert code == 0, err
    assert "folded" not in out
    assert "function local.Block (called by h1, y) > c" in out
    code, out, _ = run_cli("inspect", model, "--json")
    doc = json.loads(out)
    assert doc["in_functions"] == ["function local.Block (called by h1, y) > c"]
    assert "folded" not in doc["advice"] and "inline_local_functions" in doc["advice"]
    assert ot.describe_model(model).in_functions == doc["in_functions"]


def test_the_advice_works_inlined_model_recalibrates(files):
    inlined = onnx.inliner.inline_local_functions(_model(True))
    result = ot.recalibrate(inlined, files / "x.npy", batch_size=8)
    assert len(result.report.rows) == 3
    x = np.load(files / "x.npy").astype(np.float64)
    stored = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_allclose(stored["m0"], x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stored["v0"], x.var(axis=(0, 2, 3)), rtol=1e-5)


def test_torch_export_modules_as_functions(files):
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    net = torch.nn.Sequential(Block(), Block()).eval()
    path = files / "torch_fn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warnings
        torch.onnx.export(net, torch.randn(2, 3, 4, 4), str(path), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=15,
                          export_modules_as_functions={Block}, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
    code, out, _ = run_cli("inspect", path)
    assert code == 0 and "folded" not in out and ".Block (called by" in out
    code, _, err = run_cli("recalibrate", path, "--data", files / "x.npy", "-o",
                           files / "o.onnx", "--batch-size", "8")
    assert code == 1 and "model-local function" in err and "folded" not in err

