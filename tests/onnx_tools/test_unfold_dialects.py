"""``unfold`` in every exporter dialect: identity, closed-form statistics, twin equivalence.

Each test builds a BN-kept model K in ONNX text, recalibrates it on source data A (K_A),
folds it as an exporter does (:mod:`tests.onnx_tools.unfold_twins`: full folds, partial folds
that leave Mul/Add/Sub after the layer, an NHWC BiasAdd behind Transposes), unfolds the
folded model on A and checks (:func:`~tests.onnx_tools.unfold_twins.check_twin`): identity at
inference, the statistics inserted at every site against the closed form from K_A, and
recalibrating the unfolded model on target data B against recalibrating K_A on B.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_tools as ot
from onnx_tools.errors import ModelError
from tests.onnx_tools.helpers import ROOT, file_digest, make_model, run_cli
from tests.onnx_tools.unfold_twins import (
    CNN_SITES,
    EPS,
    bn_init,
    check_twin,
    closed_form,
    cnn,
    fold,
    ir3,
    run,
    scale_weight,
    source_target,
)

ort = pytest.importorskip("onnxruntime")

@pytest.fixture(scope="module")
def images():
    return source_target((3, 8, 8))


def test_the_twin_fold_is_the_exporters_fold():
    """The tests' fold reproduces tf2onnx's: its default conversion from its BN-kept one."""
    data = ROOT / "tests" / "corpus" / "data"
    kept = onnx.load(data / "tf2onnx_no_bn_fusion.onnx")
    folded = onnx.load(data / "tf2onnx_default.onnx")
    expected = _refold_values(folded, kept)
    got = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-5 * np.abs(value).max())
    assert len(expected) == 4


def _refold_values(folded: onnx.ModelProto, kept: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of ``folded``'s Conv weights/biases folded from ``kept``'s Conv-BN pairs.

    ``kept``'s BNs read their Conv through Transpose pairs (tf2onnx without BN fusion);
    ``folded``'s Conv writes the BN's output name (tf2onnx's fold keeps it).
    """
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in kept.graph.initializer}
    producer = {o: n for n in kept.graph.node for o in n.output}
    out = {}
    for conv in (n for n in folded.graph.node if n.op_type == "Conv"):
        bn = producer.get(conv.output[0])
        if bn is None or bn.op_type != "BatchNormalization":
            continue
        src = producer[bn.input[0]]
        while src.op_type == "Transpose":
            src = producer[src.input[0]]
        g, beta, mu, v = (init[n] for n in bn.input[1:5])
        a = g / np.sqrt(v + next(x.f for x in bn.attribute if x.name == "epsilon"))
        b = init[src.input[2]] if len(src.input) > 2 else 0.0
        out[conv.input[1]] = scale_weight(src, init[src.input[1]], a).astype(np.float32)
        out[conv.input[2]] = ((b - mu) * a + beta).astype(np.float32)
    return out


def test_tf2onnx_default_conversion_unfolds_exactly():
    """tf2onnx's own files: K = BN-kept conversion (eps set tiny), F = its default conversion
    (transposes pushed out, BN folded) with K_A folded in; NHWC input, MatMul head."""
    data = ROOT / "tests" / "corpus" / "data"
    kept = onnx.load(data / "tf2onnx_no_bn_fusion.onnx")
    for node in kept.graph.node:
        for attr in node.attribute:
            if node.op_type == "BatchNormalization" and attr.name == "epsilon":
                attr.f = EPS
    a, b = source_target((16, 16, 3), n=48)
    ka = ot.recalibrate(kept, a, batch_size=16).model
    folded = onnx.load(data / "tf2onnx_default.onnx")
    values = _refold_values(folded, ka)
    for t in folded.graph.initializer:
        if t.name in values:
            t.CopyFrom(onnx.numpy_helper.from_array(values[t.name], t.name))
    result = ot.unfold(folded, a, batch_size=16, bn_eps=EPS, linear_sites=True)
    assert [s.output for s in result.sites] == ["FusedBatchNormV3:0", "FusedBatchNormV3_1:0"]
    assert [bn.depth for bn in result.inserted] == [1, 2]
    for x in (a[:8], b[:8]):
        ref = run(folded, {"image": x})
        np.testing.assert_allclose(run(result.model, {"image": x}), ref, rtol=0,
                                   atol=1e-6 * np.sqrt(np.mean(ref**2)))
    params = {bn.output[0]: bn for bn in ka.graph.node if bn.op_type == "BatchNormalization"}
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in ka.graph.initializer}
    for key, (mean, var) in result.statistics.items():
        g, beta, _, v = (init[n] for n in params[key].input[1:5])
        std = np.sqrt(g**2 * v / (v + EPS))
        np.testing.assert_allclose(mean, beta, rtol=0, atol=2e-5 * std.max())
        np.testing.assert_allclose(np.sqrt(var), std, rtol=0, atol=2e-5 * std.max())
    ref = run(ot.recalibrate(ka, b, batch_size=16).model, {"image": b})
    got = run(ot.recalibrate(result.model, b, batch_size=16).model, {"image": b})
    rms = np.sqrt(np.mean(ref**2))
    assert np.abs(run(folded, {"image": b}) - ref).max() > 0.1 * rms  # adapting changes outputs
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * rms)


@pytest.mark.parametrize("form", ["fold", "muladd", "onnxsim", "submuladd"])
def test_folds_and_partial_folds(images, form):
    """Full folds and partial folds (Mul/Add/Sub left after the layer) of every conv kind."""
    a, b = images
    result = check_twin(cnn(), a, b, form)
    assert [bn.depth for bn in result.inserted] == [1, 2, 3, 4]  # node order
    assert [s.op_type for s in result.sites] == ["Conv", "Conv", "Conv", "ConvTranspose"]
    assert [s.channels for s in result.sites] == [6, 6, 6, 4]
    chain = {"fold": [0] * 4, "muladd": [2] * 4, "onnxsim": [1, 0, 0, 2], "submuladd": [3] * 4}
    assert [len(s.through) for s in result.sites] == chain[form]
    assert [s.end for s in result.sites] == CNN_SITES  # the chain ends where the BN's output was


def test_the_twin_folds_are_onnxsims_and_a_bn_it_keeps_is_recalibrated(images):
    """onnxsim 0.8.1's real output (``tests/corpus/make_onnxsim.py``) for the CNN with its BNs
    (it keeps the grouped ConvTranspose's BN) and with each BN as Mul+Add (partial folds) is
    what the twins' folds write; unfolding a model with a kept BN is exact too."""
    data = ROOT / "tests" / "corpus" / "data"
    kept = onnx.load(data / "onnxsim_kept.onnx")
    x = source_target((3, 8, 8), n=8, seed=11)[0]
    for name, form, keep in (("fold", "fold", ("b4",)), ("muladd", "onnxsim", ())):
        real = onnx.load(data / f"onnxsim_{name}.onnx")
        mine, _ = fold(kept, form, keep)
        assert [n.op_type for n in real.graph.node] == [n.op_type for n in mine.graph.node]
        ref = run(real, {"x": x})
        np.testing.assert_allclose(run(mine, {"x": x}), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        sites = ot.find_sites(real)
        assert [len(s.through) for s in sites] == ([0, 0, 0] if keep else [1, 0, 0, 2])
    a, b = images
    result = check_twin(cnn(), a, b, "fold", keep=("b4",))
    assert [bn.depth for bn in result.inserted] == [1, 2, 3]


NHWC = """
<ir_version: 8, opset_import: ["" : 15]>
nhwc (float[N,8,8,3] x) => (float[N,4] y) {
  t0 = Transpose<perm=[0,3,1,2]>(x)
  c1 = Conv<pads=[1,1,1,1]>(t0, w1, bias1)
  b1 = BatchNormalization<epsilon=1e-9>(c1, g1, be1, m1, v1)
  t1 = Transpose<perm=[0,2,3,1]>(b1)
  r1 = Relu(t1)
  t2 = Transpose<perm=[0,3,1,2]>(r1)
  c2 = Conv<pads=[1,1,1,1], group=6>(t2, w2)
  b2 = BatchNormalization<epsilon=1e-9>(c2, g2, be2, m2, v2)
  t3 = Transpose<perm=[0,2,3,1]>(b2)
  r2 = Relu(t3)
  p = ReduceMean<axes=[1,2], keepdims=0>(r2)
  y = MatMul(p, wf)
}
"""


@pytest.mark.parametrize("form", ["fold", "nhwc_bias", "keras"])
def test_nhwc_convolutions_behind_transposes(form):
    """tf2onnx without its transpose optimizer: NCHW convs between NHWC Transposes; the BN
    goes on the conv's NCHW output, also when the fold's shift is an NHWC BiasAdd or the
    whole BN is NHWC arithmetic (Keras 3's export)."""
    rng = np.random.default_rng(1)
    init = {"w1": rng.normal(size=(6, 3, 3, 3)), "bias1": rng.normal(size=6),
            "w2": rng.normal(size=(6, 1, 3, 3)), "wf": rng.normal(size=(6, 4))}
    for k in "12":
        init |= bn_init(rng, k, 6)
    kept = make_model(NHWC, {k: np.asarray(v, np.float32) for k, v in init.items()})
    a, b = source_target((8, 8, 3))
    result = check_twin(kept, a, b, form, linear_sites=True)
    assert all(s.op_type == "Conv" for s in result.sites)  # the MatMul head stays out


@pytest.mark.parametrize("opset,ir", [(7, 3), (9, 3), (11, 6), (13, 7), (15, 8), (18, 8), (21, 10),
                                      (23, 11), (25, 12)])
def test_opsets(images, opset, ir):
    """BN-7/9/15 models; IR 3 (initializers are graph inputs: the BN's tensors are Constants)."""
    a, b = images
    kept = ir3(cnn(opset, ir)) if ir < 4 else cnn(opset, ir)
    result = check_twin(kept, a[:32], b[:32], "onnxsim" if opset % 2 else "fold")
    constants = {n.output[0] for n in result.model.graph.node if n.op_type == "Constant"}
    assert all((name in constants) == (ir < 4) for bn in result.inserted for name in bn.tensors.values())


def test_weights_in_constant_nodes(images):
    """paddle2onnx writes weights as Constant nodes: sites, identity and statistics as usual."""
    a, b = images
    ka = ot.recalibrate(cnn(), a, batch_size=16).model
    folded, sites = fold(ka)
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in folded.graph.initializer]
    nodes += list(folded.graph.node)
    del folded.graph.initializer[:], folded.graph.node[:]
    folded.graph.node.extend(nodes)
    result = ot.unfold(folded, a, batch_size=16, bn_eps=EPS)
    assert [s.output for s in result.sites] == CNN_SITES
    ref = run(folded, {"x": b[:8]})
    np.testing.assert_allclose(run(result.model, {"x": b[:8]}), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    for key, (mean, var) in closed_form(ka, sites).items():
        np.testing.assert_allclose(result.statistics[key][0], mean, rtol=0, atol=2e-5 * np.sqrt(var).max())
        np.testing.assert_allclose(result.statistics[key][1], var, rtol=1e-4)


def _keep_io_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """float32 input and output around a float16 graph (onnxconverter-common's keep_io_types)."""
    g = model.graph
    for node in g.node:
        node.input[:] = ["x16" if n == "x" else n for n in node.input]
        node.output[:] = ["y16" if n == "y" else n for n in node.output]
    g.node.insert(0, onnx.helper.make_node("Cast", ["x"], ["x16"], to=onnx.TensorProto.FLOAT16))
    g.node.append(onnx.helper.make_node("Cast", ["y16"], ["y"], to=onnx.TensorProto.FLOAT))
    g.input[0].type.tensor_type.elem_type = g.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model


@pytest.mark.parametrize("keep_io", [False, True])
def test_float16_models_unfold_in_float16_and_fuse(images, tmp_path, keep_io):
    """A float16 model (or one with float32 input/output Casts): the inserted BN tensors are
    float16 (the weights' type), which onnxruntime needs to fuse them into the Conv;
    equivalence to float16 rounding."""
    kept = _keep_io_types(cnn(dtype=np.float16)) if keep_io else cnn(dtype=np.float16)
    a, b = images if keep_io else (x.astype(np.float16) for x in images)
    result = check_twin(kept, a, b, "fold", tol=1e-2)
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert all(types[name] == onnx.TensorProto.FLOAT16
               for bn in result.inserted for name in bn.tensors.values())
    kinds = _optimized_kinds(result.model, tmp_path / "opt.onnx")
    assert "BatchNormalization" not in kinds


def _optimized_kinds(model: onnx.ModelProto, path) -> list[str]:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(path).graph.node)


@pytest.mark.parametrize("form", ["fold", "muladd", "onnxsim", "submuladd"])
def test_inserted_bns_cost_nothing_at_inference(images, form, tmp_path):
    """After onnxruntime's optimizations the unfolded model runs the folded one's operators:
    every inserted BN is fused, also after a Mul/Add chain (Conv: into the Conv; where
    onnxruntime leaves a ConvTranspose's Mul/Add it fuses the BN into them)."""
    a, _ = images
    folded, _ = fold(ot.recalibrate(cnn(), a, batch_size=16).model, form)
    unfolded = ot.unfold(folded, a[:16], batch_size=16).model
    assert _optimized_kinds(unfolded, tmp_path / "u.onnx") == _optimized_kinds(folded, tmp_path / "f.onnx")


def test_external_data_in_external_data_out(images, tmp_path):
    a, _ = images
    ka = ot.recalibrate(cnn(), a, batch_size=16).model
    folded, sites = fold(ka, "fold")
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(folded)  # onnx.save turns the tensors it writes out into references
    onnx.save(on_disk, tmp_path / "f.onnx", save_as_external_data=True, location="f.data",
              size_threshold=0)
    np.save(tmp_path / "a.npy", a)
    digests = [file_digest(tmp_path / n) for n in ("f.onnx", "f.data")]
    assert [s.output for s in ot.find_sites(onnx.load(tmp_path / "f.onnx", load_external_data=False))] == CNN_SITES
    result = ot.unfold(str(tmp_path / "f.onnx"), str(tmp_path / "a.npy"), batch_size=16, bn_eps=EPS,
                       output=str(tmp_path / "u.onnx"))
    written = onnx.load(tmp_path / "u.onnx", load_external_data=False)
    external = [t for t in written.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert {t.name for t in external} == {t.name for t in folded.graph.initializer}  # as they were
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"u.onnx.data"}
    assert [file_digest(tmp_path / n) for n in ("f.onnx", "f.data")] == digests
    unfolded = onnx.load(tmp_path / "u.onnx")
    np.testing.assert_allclose(run(unfolded, {"x": a[:8]}), run(folded, {"x": a[:8]}), rtol=0, atol=1e-5)
    for key, (mean, var) in closed_form(ka, sites).items():
        np.testing.assert_allclose(result.statistics[key][0], mean, rtol=0, atol=1e-4 * np.sqrt(var).max())


MLP = """
<ir_version: 8, opset_import: ["" : 15]>
mlp (float[N,10] x) => (float[N,3] y) {
  l1 = Gemm<transB=1>(x, w1, bias1)
  b1 = BatchNormalization<epsilon=1e-9>(l1, g1, be1, m1, v1)
  r1 = Relu(b1)
  l2 = MatMul(r1, w2)
  b2 = BatchNormalization<epsilon=1e-9>(l2, g2, be2, m2, v2)
  r2 = Relu(b2)
  l3 = Gemm(r2, w3)
  b3 = BatchNormalization<epsilon=1e-9>(l3, g3, be3, m3, v3)
  r3 = Relu(b3)
  z = Gemm(r3, wf, bf)
  y = Softmax(z)
}
"""


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    init = {"w1": rng.normal(size=(8, 10)), "bias1": rng.normal(size=8),
            "w2": rng.normal(size=(8, 7)) * 0.5, "w3": rng.normal(size=(7, 5)) * 0.5,
            "wf": rng.normal(size=(5, 3)), "bf": rng.normal(size=3)}
    for k, c in (("1", 8), ("2", 7), ("3", 5)):
        init |= bn_init(rng, k, c)
    return make_model(MLP, {k: np.asarray(v, np.float32) for k, v in init.items()})


@pytest.mark.parametrize("form", ["fold", "muladd"])
def test_linear_sites_on_an_mlp(form):
    """BN1d folded into Gemm (transB or not), MatMul (+ Add), or left as Mul+Add: sites only
    with linear_sites; the classifier Gemm (then Softmax) stays out (rule 4)."""
    kept, (a, b) = mlp(), source_target((10,))
    result = check_twin(kept, a, b, form, linear_sites=True)
    assert [s.op_type for s in result.sites] == ["Gemm", "MatMul", "Gemm"]
    assert [s.channels for s in result.sites] == [8, 7, 5]
    assert [bn.depth for bn in result.inserted] == [1, 2, 3]
    folded, _ = fold(ot.recalibrate(kept, a, batch_size=16).model, form)
    assert ot.find_sites(folded) == []
    with pytest.raises(ModelError, match="linear_sites"):
        ot.unfold(folded, a)


def test_cli_linear_sites_and_partial_folds(tmp_path):
    a, _ = source_target((10,))
    folded, _ = fold(ot.recalibrate(mlp(), a, batch_size=16).model, "muladd")
    onnx.save(folded, tmp_path / "f.onnx")
    np.save(tmp_path / "a.npy", a)
    rc, out, err = run_cli("inspect", tmp_path / "f.onnx")
    assert rc == 0, err
    rc, out, err = run_cli("unfold", tmp_path / "f.onnx", "--data", tmp_path / "a.npy", "-o", tmp_path / "u.onnx")
    assert rc == 1 and "--linear-sites" in err and not (tmp_path / "u.onnx").exists()
    rc, out, err = run_cli("unfold", tmp_path / "f.onnx", "--data", tmp_path / "a.npy", "--linear-sites",
                           "-o", tmp_path / "u.onnx", "--batch-size", "16")
    assert rc == 0 and "inserted 3 BatchNormalization(s)" in out, err
    unfolded = onnx.load(tmp_path / "u.onnx")
    np.testing.assert_allclose(run(unfolded, {"x": a}), run(folded, {"x": a}), rtol=0, atol=1e-5)
