"""issue 19 item 8: BN inside model-local functions is recalibrated, or refused naming it.

torch.onnx's ``export_modules_as_functions`` puts a module's BN inside a function of the
model, called once per module instance, its statistics fed through the function's inputs.
bnref-onnx collects on onnx's inlined copy and writes each call site's statistics back where
they live: the call site's mean/var inputs (a tensor shared with anything else gets its own
new tensor, wired to that call site). Expected values: onnx's ReferenceEvaluator in training
mode on the inlined model (``reference_collect``). A BN whose statistics live in the function
body, a function input the body also reads elsewhere, or a BN in a function called from
another function is refused naming the function. Never "folded".
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
from tests.onnx_tools.helpers import (
    assert_clean_failure,
    file_digest,
    listing,
    reference_collect,
    run_cli,
)

FUNCTION_MODEL = """
<ir_version: 8, opset_import: ["" : 15, "local" : 1]>
agraph (float[N,3,4,4] x) => (float[N,3,4,4] y) {{
  {main}
  h1 = local.Block(m1, v1, x0, s1, b1)
  y = local.Block({m2}, v2, h1, s2, b2)
}}
<domain: "local", opset_import: ["" : 15]>
Block (m, v, inp, s, b) => (out) {{
  c = BatchNormalization<epsilon=0.001>(inp, s, b, m, v)
  out = Relu(c)
}}
"""

BODY_STATS = """
<ir_version: 8, opset_import: ["" : 15, "local" : 1]>
agraph (float[N,3,4,4] x) => (float[N,3,4,4] y) {
  h1 = local.Block(x, s1, b1)
  y = local.Block(h1, s2, b2)
}
<domain: "local", opset_import: ["" : 15]>
Block (inp, s, b) => (out) {
  m = Constant<value = float[3] {0, 0, 0}>()
  v = Constant<value = float[3] {1, 1, 1}>()
  out = BatchNormalization(inp, s, b, m, v)
}
"""

READ_ELSEWHERE = FUNCTION_MODEL.replace(
    "  out = Relu(c)", "  r = Relu(c)\n  total = ReduceSum(m)\n  out = Add(r, total)")

NESTED = """
<ir_version: 8, opset_import: ["" : 15, "local" : 1]>
agraph (float[N,3,4,4] x) => (float[N,3,4,4] y) {
  y = local.Outer(x, s1, b1, m1, v1)
}
<domain: "local", opset_import: ["" : 15, "local" : 1]>
Outer (inp, s, b, m, v) => (out) {
  out = local.Inner(inp, s, b, m, v)
}
<domain: "local", opset_import: ["" : 15]>
Inner (inp, s, b, m, v) => (out) {
  out = BatchNormalization(inp, s, b, m, v)
}
"""


def _parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for i in range(3):
        for name, value in (("s", rng.uniform(0.5, 2, 3)), ("b", rng.normal(size=3)),
                            ("m", np.full(3, 0.25)), ("v", np.full(3, 3.0))):
            model.graph.initializer.append(
                numpy_helper.from_array(value.astype(np.float32), f"{name}{i}"))
    onnx.checker.check_model(model)
    return model


def _model(main_bn: bool, shared_mean: bool = False) -> onnx.ModelProto:
    main = "x0 = BatchNormalization(x, s0, b0, m0, v0)" if main_bn else "x0 = Identity(x)"
    return _parse(FUNCTION_MODEL.format(main=main, m2="m1" if shared_mean else "m2"))


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(1).normal(size=(32, 3, 4, 4)).astype(np.float32) * 2 + 1)
    return path


def _check_written(original, written, x, *, batch_size=8):
    """Each call site's mean/var inputs hold the statistics of its own BN, nothing else moved."""
    inlined = onnx.inliner.inline_local_functions(original)
    reference = reference_collect(inlined, x, batch_size)
    bns = {n.output[0]: n for n in inlined.graph.node if n.op_type == "BatchNormalization"}
    calls = [n for n in written.graph.node if n.op_type == "Block"]
    call_bns = [k for k in bns if k.startswith("c")]  # the inliner's names for each call's c
    assert len(call_bns) == len(calls) == 2
    values = _tensors(written)
    for key, call in zip(call_bns, calls, strict=True):
        np.testing.assert_allclose(values[call.input[0]], reference[key].mean, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(values[call.input[1]], reference[key].var, rtol=1e-5)
    # Only statistics changed: the same nodes, the same function, the other tensors as stored.
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    assert [f.SerializeToString() for f in written.functions] == \
        [f.SerializeToString() for f in original.functions]
    stats_inputs = {name for n in written.graph.node
                    for name in (n.input[:2] if n.op_type == "Block" else n.input[-2:])}
    before = _tensors(original)
    for name, value in before.items():
        if name not in stats_inputs and not name.startswith(("m", "v")):
            assert np.array_equal(values[name], value), name
    return reference


@pytest.mark.parametrize("main_bn", [False, True])
@pytest.mark.parametrize("shared_mean", [False, True])
def test_recalibrates_bn_inside_functions_at_their_call_sites(tmp_path, data, main_bn,
                                                               shared_mean):
    original = _model(main_bn, shared_mean)
    path = tmp_path / "fn.onnx"
    onnx.save(original, path)
    code, _, err = run_cli("recalibrate", path, "--data", data, "-o", tmp_path / "o.onnx",
                           "--batch-size", "8", "-q")
    assert code == 0, err
    written = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(written)
    reference = _check_written(original, written, np.load(data))
    if main_bn:
        np.testing.assert_allclose(_tensors(written)["m0"], reference["x0"].mean, rtol=1e-5)
    if shared_mean:  # one tensor fed both calls: each call got its own, m1 kept its value
        calls = [n for n in written.graph.node if n.op_type == "Block"]
        assert calls[0].input[0] != calls[1].input[0]
        assert np.array_equal(_tensors(written)["m1"], np.full(3, 0.25, np.float32))
    # collect + apply: the same model, byte for byte.
    assert run_cli("collect", path, "--data", data, "-o", tmp_path / "s.npz", "--batch-size",
                   "8", "-q")[0] == 0
    assert run_cli("apply", path, tmp_path / "s.npz", "-o", tmp_path / "o2.onnx", "-q")[0] == 0
    assert file_digest(tmp_path / "o2.onnx") == file_digest(tmp_path / "o.onnx")


def test_inspect_shows_the_function_and_never_says_folded(tmp_path):
    path = tmp_path / "fn.onnx"
    onnx.save(_model(False), path)
    code, out, err = run_cli("inspect", path)
    assert code == 0, err
    assert "folded" not in out
    assert out.count("in function local.Block (called by h1) > c") == 1
    assert out.count("in function local.Block (called by y) > c") == 1
    doc = json.loads(run_cli("inspect", path, "--json")[1])
    assert [bn["function"] for bn in doc["batchnorms"]] == [
        "function local.Block (called by h1) > c", "function local.Block (called by y) > c"]
    assert doc["in_functions"] == [] and "advice" not in doc


@pytest.mark.parametrize(("text", "reason"), [
    (BODY_STATS, "its mean lives in the function body"),
    (READ_ELSEWHERE.format(main="x0 = Identity(x)", m2="m2"),
     "the function reads its mean input elsewhere too"),
    (NESTED, "not called from the main graph"),
])
def test_unsupported_function_bn_is_refused_naming_it(tmp_path, data, text, reason):
    path = tmp_path / "fn.onnx"
    onnx.save(_parse(text), path)
    digest, before = file_digest(path), listing(tmp_path)
    code, _, err = run_cli("recalibrate", path, "--data", data, "-o", tmp_path / "o.onnx",
                           "--batch-size", "8")
    assert_clean_failure(code, err, 1, reason, tmp_path, before, path, digest)
    assert "model-local function" in err and "local." in err and "folded" not in err
    with pytest.raises(ot.ModelError, match=reason):
        ot.collect(path, data, batch_size=8)
    code, out, _ = run_cli("inspect", path)
    assert code == 0 and reason in out and "folded" not in out
    # The advice given works: the inlined model recalibrates.
    inlined = onnx.inliner.inline_local_functions(_parse(text))
    assert ot.recalibrate(inlined, data, batch_size=8).report.rows


def test_torch_export_modules_as_functions(tmp_path, data):
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    net = torch.nn.Sequential(Block(), Block()).eval()  # fresh: running_var aliases the weight
    path = tmp_path / "torch_fn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warnings
        torch.onnx.export(net, torch.randn(2, 3, 4, 4), str(path), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=15,
                          export_modules_as_functions={Block}, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
    original = onnx.load(path)
    assert original.functions, "exported with a local function"
    code, _, err = run_cli("recalibrate", path, "--data", data, "-o", tmp_path / "o.onnx",
                           "--batch-size", "8", "-q")
    assert code == 0, err
    written = onnx.load(tmp_path / "o.onnx")
    inlined = onnx.inliner.inline_local_functions(original)
    reference = reference_collect(inlined, np.load(data), 8)
    calls = [n for n in written.graph.node if n.domain == original.functions[0].domain]
    values = _tensors(written)
    for key, call in zip(reference, calls, strict=True):
        np.testing.assert_allclose(values[call.input[5]], reference[key].mean, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(values[call.input[6]], reference[key].var, rtol=1e-5)
    # The scale the running_var aliased keeps its value.
    weights = {n: v for n, v in _tensors(original).items() if n.endswith("bn.weight")}
    assert all(np.array_equal(values[n], v) for n, v in weights.items())
