"""The model variants exporters produce: storage kinds, sharing, ranks, opsets, dtypes, files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_tools as ot
from onnx_tools import modelio
from tests.onnx_tools.helpers import (
    CNN_TEXT,
    assert_stats_close,
    cnn_data,
    cnn_initializers,
    cnn_model,
    file_digest,
    make_model,
    reference_collect,
    run_cli,
)

KEYS = ["b1", "b2", "y"]


def _recal(model: onnx.ModelProto, x, batch_size=8, **kw) -> onnx.ModelProto:
    return ot.recalibrate(model, x, batch_size=batch_size, provider="cpu", **kw).model


@pytest.mark.parametrize("opset", list(range(7, onnx.defs.onnx_opset_version() + 1)))
def test_every_opset(opset):
    ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    model = make_model(CNN_TEXT, cnn_initializers(), opset=opset, ir=max(ir, 3))
    if ir < 4:  # IR 3 lists initializers as graph inputs
        model.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in model.graph.initializer
        )
    onnx.checker.check_model(model)
    x = cnn_data()
    out = _recal(model, x)
    assert out.opset_import == model.opset_import
    assert_stats_close(out, reference_collect(cnn_model(), x, 8), {"x": x[:2]})


OPSET6 = """
<ir_version: 3, opset_import: ["" : 6]>
old (float[N,3,6,6] x) => (float[N,4,6,6] y) {
  c1 = Conv<pads=[1,1,1,1]>(x, w1)
  y = BatchNormalization<is_test=1, epsilon=0.001>(c1, s1, o1, m1, v1)
}
"""


def test_opset6_is_converted_for_collection_and_kept_in_output():
    inits = {k: v for k, v in cnn_initializers().items() if k[-1] == "1"}
    model = make_model(OPSET6, inits)
    model.graph.input.extend(
        helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inits.items()
    )
    x = cnn_data()
    out = _recal(model, x)
    assert out.opset_import[0].version == 6
    assert [n.op_type for n in out.graph.node] == ["Conv", "BatchNormalization"]
    ref_model = make_model(OPSET6.replace('"" : 6', '"" : 15').replace("is_test=1, ", "")
                           .replace("ir_version: 3", "ir_version: 8"), inits)
    ref = reference_collect(ref_model, x, 8)
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    p = ref["y"]
    np.testing.assert_allclose(stored["v1"], p.var, rtol=2e-5)
    np.testing.assert_allclose(stored["m1"], p.mean, atol=1e-5 * np.sqrt(p.var.max()))


CONST_TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,6,6] x) => (float[N,4,6,6] y) {
  c1 = Conv<pads=[1,1,1,1]>(x, w1)
  s1 = Constant<value_floats=[1.0, 1.0, 1.0, 1.0]>()
  o1 = Constant<value_floats=[0.0, 0.0, 0.0, 0.0]>()
  m1 = Constant<value=float[4] {0.0, 0.0, 0.0, 0.0}>()
  v1 = Constant<value=float[4] {1.0, 1.0, 1.0, 1.0}>()
  y = BatchNormalization(c1, s1, o1, m1, v1)
}
"""


def test_constant_node_statistics_are_rewritten_in_place():
    model = make_model(CONST_TEXT, {"w1": cnn_initializers()["w1"]})
    x = cnn_data()
    out = _recal(model, x)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    assert len(out.graph.initializer) == 1
    assert_stats_close(out, reference_collect(model, x, 8), {"x": x[:2]})
    # scale/bias Constants unchanged
    assert out.graph.node[1] == model.graph.node[1] and out.graph.node[2] == model.graph.node[2]


ALIAS_TEXT = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[N,3,6,6] x) => (float[N,4,6,6] y) {
  c1 = Conv<pads=[1,1,1,1]>(x, w1)
  rv = Identity(s1)
  rm = Identity(o1)
  y = BatchNormalization(c1, s1, o1, rm, rv)
}
"""


def test_torchscript_identity_alias_is_unshared():
    """A fresh model's running_var = Identity(weight): writing through it would change scale."""
    f = np.float32
    model = make_model(ALIAS_TEXT, {"w1": cnn_initializers()["w1"], "s1": np.ones(4, f),
                                    "o1": np.zeros(4, f)})
    bn = ot.inspect_model(model)[0]
    assert bn.sources["var"].kind == "initializer" and bn.sources["var"].chain
    assert bn.sources["var"].shared
    x = cnn_data()
    out = _recal(model, x)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(inits["s1"], np.ones(4))
    np.testing.assert_array_equal(inits["o1"], np.zeros(4))
    assert len(inits) == 5  # two new tensors
    assert [n.name for n in out.graph.node] == [n.name for n in model.graph.node]
    assert_stats_close(out, reference_collect(model, x, 8), {"x": x[:2]})
    # The result still runs in onnxruntime and gives the reference inference output.
    import onnxruntime as ort

    y = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[:4]})[0]
    ref_y = onnx.reference.ReferenceEvaluator(out).run(None, {"x": x[:4]})[0]
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)


def test_identity_chain_unshared_root_is_written():
    text = ALIAS_TEXT.replace("rv = Identity(s1)", "rv = Identity(vv)").replace(
        "rm = Identity(o1)", "rm = Identity(mm)")
    f = np.float32
    model = make_model(text, {"w1": cnn_initializers()["w1"], "s1": np.ones(4, f),
                              "o1": np.zeros(4, f), "mm": np.zeros(4, f), "vv": np.ones(4, f)})
    x = cnn_data()
    out = _recal(model, x)
    assert len(out.graph.initializer) == 5  # written into the root, no new tensor
    assert out.graph.node == model.graph.node
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(stored["s1"], np.ones(4))  # scale and bias untouched
    np.testing.assert_array_equal(stored["o1"], np.zeros(4))
    assert_stats_close(out, reference_collect(model, x, 8), {"x": x[:2]})


SHARED_TEXT = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[N,3,6,6] x) => (float[N,4,6,6] y, float[4] z) {
  c1 = Conv<pads=[1,1,1,1]>(x, w1)
  b1 = BatchNormalization(c1, s, o, m, v)
  c2 = Conv<pads=[1,1,1,1]>(b1, w2)
  y = BatchNormalization(c2, s, o, m, v)
  z = Add(m, v)
}
"""


def test_tensors_shared_between_bns_and_other_nodes():
    f = np.float32
    rng = np.random.default_rng(0)
    inits = {"w1": cnn_initializers()["w1"], "w2": (rng.normal(size=(4, 4, 3, 3)) * 0.3).astype(f),
             "s": np.ones(4, f), "o": np.zeros(4, f), "m": np.zeros(4, f), "v": np.ones(4, f)}
    model = make_model(SHARED_TEXT, inits)
    x = cnn_data()
    out = _recal(model, x)
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for k in ("s", "o", "m", "v"):
        np.testing.assert_array_equal(stored[k], inits[k])  # nobody else's tensor changed
    assert len(stored) == 6 + 4
    assert_stats_close(out, reference_collect(model, x, 8), {"x": x[:2]})
    z = onnx.reference.ReferenceEvaluator(out).run(["z"], {"x": x[:1]})[0]
    np.testing.assert_array_equal(z, np.ones(4))


def test_ir3_graph_input_defaults():
    f = np.float32
    text = """
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[N,3,6,6] x, float[4] m1, float[4] v1) => (float[N,4,6,6] y) {
      c1 = Conv<pads=[1,1,1,1]>(x, w1)
      y = BatchNormalization(c1, s1, o1, m1, v1)
    }
    """
    inits = {"w1": cnn_initializers()["w1"], "s1": np.ones(4, f), "o1": np.zeros(4, f),
             "m1": np.zeros(4, f), "v1": np.ones(4, f)}
    model = make_model(text, inits)
    model.graph.input.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, [4])
                             for k in ("w1", "s1", "o1")[1:])
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [4, 3, 3, 3]))
    onnx.checker.check_model(model)
    bn = ot.inspect_model(model)[0]
    assert bn.sources["mean"].kind == "input"
    x = cnn_data()
    out = _recal(model, x)
    assert out.graph.input == model.graph.input
    onnx.checker.check_model(out)
    p = reference_collect(model, x, 8, input_name="x")["y"]
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_allclose(stored["v1"], p.var, rtol=2e-5)
    np.testing.assert_allclose(stored["m1"], p.mean, rtol=0, atol=2e-5 * np.sqrt(p.var).max())


def test_ir3_shared_tensor_gets_a_constant_node():
    f = np.float32
    text = """
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[N,3,6,6] x, float[4] s1, float[4] o1, float[4] w1) => (float[N,4,6,6] y) {
      c1 = Conv<pads=[1,1,1,1]>(x, w1)
      y = BatchNormalization(c1, s1, o1, o1, s1)
    }
    """
    inits = {"w1": cnn_initializers()["w1"], "s1": np.ones(4, f), "o1": np.zeros(4, f)}
    model = make_model(text, inits)
    model.graph.input[3].CopyFrom(helper.make_tensor_value_info("w1", 1, [4, 3, 3, 3]))
    onnx.checker.check_model(model)
    x = cnn_data()
    out = _recal(model, x)
    onnx.checker.check_model(out)
    assert out.graph.input == model.graph.input
    assert [n.op_type for n in out.graph.node] == ["Conv", "Constant", "Constant",
                                                   "BatchNormalization"]
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(stored["s1"], np.ones(4))
    np.testing.assert_array_equal(stored["o1"], np.zeros(4))
    assert_stats_close(out, reference_collect(model, x, 8), {"x": x[:2]})  # the new Constants


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_ranks(rank):
    spatial = [5, 4, 3][: rank - 2]
    shape = ["N", "3", *map(str, spatial)]
    text = f"""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[{','.join(shape)}] x) => (float[{','.join(shape)}] y) {{
      y = BatchNormalization(x, s, o, m, v)
    }}
    """
    f = np.float32
    model = make_model(text, {"s": np.full(3, 2, f), "o": np.ones(3, f), "m": np.zeros(3, f),
                              "v": np.ones(3, f)})
    rng = np.random.default_rng(rank)
    x = (rng.normal(size=(24, 3, *spatial)) + 5).astype(f)
    x[:, 1] *= 3
    out = _recal(model, x, batch_size=8)
    p = bnref_stats(x, 8)
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_allclose(stored["v"], p.var, rtol=1e-5)
    np.testing.assert_allclose(stored["m"], p.mean, rtol=1e-5)


def bnref_stats(x, b):
    import bnref

    p = bnref.PreciseBN()
    for i in range(0, len(x) // b * b, b):
        p.update_from_array(x[i:i + b].astype(np.float64), axis=1)
    return p


def test_channels_last_transpose():
    text = """
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[N,6,6,3] x) => (float[N,6,6,3] y) {
      t = Transpose<perm=[0,3,1,2]>(x)
      b = BatchNormalization(t, s, o, m, v)
      y = Transpose<perm=[0,2,3,1]>(b)
    }
    """
    f = np.float32
    model = make_model(text, {"s": np.ones(3, f), "o": np.zeros(3, f), "m": np.zeros(3, f),
                              "v": np.ones(3, f)})
    x = cnn_data().transpose(0, 2, 3, 1).copy()
    out = _recal(model, x)
    p = bnref_stats(x.transpose(0, 3, 1, 2), 8)
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_allclose(stored["v"], p.var, rtol=1e-5)
    np.testing.assert_allclose(stored["m"], p.mean, rtol=0, atol=1e-5 * np.sqrt(p.var).max())


def test_float16_model():
    model = cnn_model()
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for t in half.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    half.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    half.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(half)
    x = cnn_data()
    out = _recal(half, x.astype(np.float16))
    assert all(t.data_type == TensorProto.FLOAT16 for t in out.graph.initializer)
    ref_model = onnx.ModelProto()
    ref_model.CopyFrom(model)
    for t in ref_model.graph.initializer:  # float32 model with the float16-rounded weights
        t.CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(t).astype(np.float16).astype(np.float32), t.name))
    ref = reference_collect(ref_model, x.astype(np.float16).astype(np.float32), 8)
    stored = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in out.graph.initializer}
    for key, (m, v) in {"b1": ("m1", "v1"), "b2": ("m2", "v2"), "y": ("m3", "v3")}.items():
        np.testing.assert_allclose(stored[v], ref[key].var, rtol=5e-3)
        np.testing.assert_allclose(stored[m], ref[key].mean, atol=5e-3 * np.sqrt(ref[key].var.max()))


def test_bfloat16_is_refused(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 15]>
    g (bfloat16[N,3] x) => (bfloat16[N,3] y) { y = BatchNormalization(x, s, o, m, v) }
    """
    model = onnx.parser.parse_model(text)
    for name in "somv":
        model.graph.initializer.append(helper.make_tensor(name, TensorProto.BFLOAT16, [3],
                                                          [1.0, 1.0, 1.0]))
    p = tmp_path / "bf.onnx"
    onnx.save(model, p)
    np.save(tmp_path / "x.npy", np.ones((16, 3), np.float32))
    code, _, err = run_cli("recalibrate", p, "--data", tmp_path / "x.npy", "-o", tmp_path / "o.onnx")
    assert code == 1 and "bfloat16" in err and not (tmp_path / "o.onnx").exists()


def test_external_data_written_back_the_same_way(tmp_path):
    model = cnn_model()
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    np.save(tmp_path / "x.npy", cnn_data())
    before = {p.name: file_digest(p) for p in tmp_path.iterdir()}
    out = tmp_path / "fixed.onnx"
    code, _, err = run_cli("recalibrate", path, "--data", tmp_path / "x.npy", "-o", out,
                           "--batch-size", "8", "--quiet")
    assert code == 0, err
    assert (tmp_path / "fixed.onnx.data").exists()
    assert {p.name: file_digest(p) for p in tmp_path.iterdir() if p.name in before} == before
    skeleton = onnx.load(out, load_external_data=False)
    ext = {t.name for t in skeleton.graph.initializer
           if t.data_location == TensorProto.EXTERNAL}
    assert ext == {t.name for t in cnn_model().graph.initializer}
    ref = reference_collect(cnn_model(), cnn_data(), 8)  # onnx.save moved `model`'s data out
    assert_stats_close(str(out), ref, {"x": cnn_data()[:2]})
    # --in-place keeps the data file's name and leaves no stray files
    code, _, err = run_cli("recalibrate", path, "--data", tmp_path / "x.npy", "--in-place",
                           "--batch-size", "8", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ext.onnx", "weights.bin", "x.npy", "fixed.onnx", "fixed.onnx.data"])
    assert_stats_close(str(path), ref, {"x": cnn_data()[:2]})


def test_over_protobuf_limit_goes_by_path(tmp_path, monkeypatch):
    """The 2 GB path, exercised with the limit lowered instead of a 2 GB file."""
    import onnxruntime as ort

    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 2000)
    seen = []
    real = ort.InferenceSession

    def spy(src, *args, **kwargs):
        seen.append(src)
        return real(src, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    model = cnn_model()
    assert model.ByteSize() > 2000
    out = tmp_path / "big.onnx"
    x = cnn_data()
    ot.recalibrate(model, x, batch_size=8, provider="cpu", output=out)
    assert seen and all(isinstance(s, str) for s in seen)  # onnxruntime got a path
    assert (tmp_path / "big.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert_stats_close(str(out), reference_collect(model, x, 8), {"x": x[:2]})


def test_custom_domain_operator():
    text = """
    <ir_version: 8, opset_import: ["" : 15, "com.microsoft" : 1]>
    g (float[N,3,6,6] x) => (float[N,4,6,6] y) {
      gx = com.microsoft.Gelu(x)
      c1 = Conv<pads=[1,1,1,1]>(gx, w1)
      y = BatchNormalization(c1, s1, o1, m1, v1)
    }
    """
    inits = {k: v for k, v in cnn_initializers().items() if k[-1] == "1"}
    model = make_model(text, inits)
    x = cnn_data()
    out = _recal(model, x)
    from math import erf

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))(x.astype(np.float64))
    ref_model = make_model(text.replace("gx = com.microsoft.Gelu(x)", "gx = Identity(x)")
                           .replace(', "com.microsoft" : 1', ""), inits)
    p = reference_collect(ref_model, gelu.astype(np.float32), 8)["y"]
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_allclose(stored["v1"], p.var, rtol=1e-4)
    np.testing.assert_allclose(stored["m1"], p.mean, rtol=0, atol=1e-4 * np.sqrt(p.var).max())


def test_bn_inside_if_body_is_a_clear_error(tmp_path):
    f = np.float32
    then_bn = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "s", "o", "m", "v"], ["t"],
                          name="bn_in_then")],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_bn,
                          else_branch=else_g)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(3, f), n) for n in "sv"]
        + [numpy_helper.from_array(np.zeros(3, f), n) for n in "om"])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    p = tmp_path / "if.onnx"
    onnx.save(model, p)
    np.savez(tmp_path / "d.npz", x=np.ones((16, 3), f), c=np.ones(16, bool))
    code, out, _ = run_cli("inspect", p)
    assert code == 0 and "bn_in_then" in out
    code, _, err = run_cli("recalibrate", p, "--data", tmp_path / "d.npz", "-o", tmp_path / "o.onnx")
    assert code == 1 and "If branch > bn_in_then" in err and not (tmp_path / "o.onnx").exists()


def test_training_mode_export_is_refused():
    text = CNN_TEXT.replace("y = BatchNormalization(g, s3, o3, m3, v3)",
                            "y, rm, rv = BatchNormalization<training_mode=1>(g, s3, o3, m3, v3)")
    model = make_model(text, cnn_initializers(), opset=15, ir=8)
    with pytest.raises(ot.ModelError, match="training mode"):
        _recal(model, cnn_data())


def test_double_model():
    text = """
    <ir_version: 8, opset_import: ["" : 15]>
    g (double[N,3,4] x) => (double[N,3,4] y) { y = BatchNormalization(x, s, o, m, v) }
    """
    model = make_model(text, {"s": np.ones(3), "o": np.zeros(3), "m": np.zeros(3),
                              "v": np.ones(3)})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3, 4)) * 1e-3 + 1e4  # cancellation-prone; double keeps it exact
    out = _recal(model, x)
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert stored["v"].dtype == np.float64
    np.testing.assert_allclose(stored["v"], bnref_stats(x, 8).var, rtol=1e-7)
