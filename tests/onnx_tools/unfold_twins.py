"""BN-kept twins for ``unfold``'s dialect tests: fold a model the way an exporter does.

:func:`fold` removes every BatchNormalization of a BN-kept model K that reads a layer's output
(Conv, ConvTranspose, Gemm, MatMul) and writes, by ``form``, what an exporter leaves:

* ``"fold"``: the BN folded into the layer, W' = W * a per output channel and
  b' = (b - mu) * a + beta with a = g / sqrt(v + eps) (torch.onnx, tf2onnx, onnxsim); a MatMul
  gets its bias as a following Add (MatMul+Add, what exporters write for a Linear);
* ``"muladd"``: the layer kept, the BN written as Mul(a) then Add(beta - a * mu) (a BN an
  exporter decomposed and nothing fused);
* ``"onnxsim"``: what onnxsim 0.8.1 writes for layer -> Mul -> Add (checked against its real
  output, ``tests/corpus/data/onnxsim_muladd.onnx``): a Conv with a bias takes the Mul
  (W * a, b * a) and leaves the Add; one without a bias takes both; a ConvTranspose neither;
* ``"submuladd"``: Sub(mu) -> Mul(a) -> Add(beta) after the layer (onnxsim on a BN
  decomposed as Sub/Mul/Mul/Add merges the two Muls);
* ``"keras"``: nothing folded, the BN written as NHWC Sub/Mul/Add by (C,) constants behind a
  Transpose (Keras 3's own ONNX export, ``tests/corpus/test_unfold_keras.py``);
* ``"nhwc_bias"``: the BN folded into the conv's weights, its shift left as an NHWC BiasAdd
  behind a Transpose pair (the conv output, the site, is then z = y - c per channel).

The last node of each form writes the BN's output name. unfold inserts its BN on the layer's
output z, which is s * x + t per channel with x the BN's input in K (``fold``: s = a,
t = c; ``muladd``/``submuladd``/``keras``: z = x; ``onnxsim``: s = a; ``nhwc_bias``: s = a, t = -a b);
:func:`closed_form` gives the statistics unfold must insert there from the recalibrated K:
mean = s * mu + t, var = s^2 * v (for ``fold``: beta and g^2 v / (v + eps)). The folding is
written here, independently of ``onnx_tools``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnx_tools as ot
from tests.onnx_tools.helpers import make_model

EPS = 1e-9  # the twins' BN epsilon: a^2 * eps is negligible, so eps' = EPS is exact enough
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Conv with bias, grouped Conv without bias, depthwise Conv in a residual, grouped
# ConvTranspose (channels = W.shape[1] * group), then a Gemm head.
CNN = """
<ir_version: {ir}, opset_import: ["" : {opset}]>
cnn ({t}[N,3,8,8] x) => ({t}[N,4] y) {{
  c1 = Conv<pads=[1,1,1,1]>(x, w1, bias1)
  b1 = BatchNormalization<epsilon={eps}>(c1, g1, be1, m1, v1)
  r1 = Relu(b1)
  c2 = Conv<pads=[1,1,1,1], group=2>(r1, w2)
  b2 = BatchNormalization<epsilon={eps}>(c2, g2, be2, m2, v2)
  r2 = Relu(b2)
  c3 = Conv<pads=[1,1,1,1], group=6>(r2, w3)
  b3 = BatchNormalization<epsilon={eps}>(c3, g3, be3, m3, v3)
  a3 = Add(b3, r2)
  r3 = Relu(a3)
  c4 = ConvTranspose<strides=[2,2], group=2>(r3, w4, bias4)
  b4 = BatchNormalization<epsilon={eps}>(c4, g4, be4, m4, v4)
  r4 = Relu(b4)
  p = GlobalAveragePool(r4)
  f = Flatten(p)
  y = Gemm(f, wf, bf)
}}
"""
CNN_SITES = ["b1", "b2", "b3", "b4"]


def bn_init(rng, k: str, c: int) -> dict:
    """BN tensors of layer ``k``: gamma of both signs, stale statistics."""
    return {f"g{k}": rng.uniform(0.5, 2, c) * rng.choice([-1, 1], c), f"be{k}": rng.normal(size=c),
            f"m{k}": np.zeros(c), f"v{k}": np.ones(c)}  # stale: recalibrated by check_twin


def cnn(opset: int = 15, ir: int = 8, dtype=np.float32, seed: int = 0) -> onnx.ModelProto:
    """The BN-kept CNN (gamma of both signs: a negative a flips a channel)."""
    rng = np.random.default_rng(seed)
    init = {"w1": rng.normal(size=(6, 3, 3, 3)), "bias1": rng.normal(size=6),
            "w2": rng.normal(size=(6, 3, 3, 3)) * 0.4, "w3": rng.normal(size=(6, 1, 3, 3)) * 0.5,
            "w4": rng.normal(size=(6, 2, 2, 2)) * 0.4, "bias4": rng.normal(size=4),
            "wf": rng.normal(size=(4, 4)), "bf": rng.normal(size=4)}
    for k, c in (("1", 6), ("2", 6), ("3", 6), ("4", 4)):
        init |= bn_init(rng, k, c)
    t = {np.float32: "float", np.float16: "float16"}[dtype]
    return make_model(CNN, {k: np.asarray(v, dtype) for k, v in init.items()},
                      eps=EPS, opset=opset, ir=ir, t=t)


def source_target(shape: tuple, n: int = 64, seed: int = 5, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Source A and target B (B: contrast and brightness shift of A)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, *shape)) * rng.uniform(0.5, 1.5, (n,) + (1,) * len(shape)) + 0.2
    b = a[rng.permutation(n)] * 0.4 + 0.7
    return a.astype(dtype), b.astype(dtype)


def bn_params(model: onnx.ModelProto) -> dict[str, dict]:
    """Each BN's output name -> its layer node, a, c, beta, g, v, eps (float64)."""
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.input[0] not in producer:
            continue
        layer = producer[node.input[0]]
        if layer.op_type not in LAYERS:
            continue
        g, beta, mu, v = (init[n] for n in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        a = g / np.sqrt(v + eps)
        out[node.output[0]] = {"bn": node, "layer": layer, "a": a, "c": beta - a * mu,
                               "beta": beta, "g": g, "v": v, "eps": eps, "mu": mu}
    return out


def scale_weight(layer: onnx.NodeProto, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """W with output channel k scaled by a[k], in the layer's weight layout."""
    if layer.op_type == "Conv":
        return w * a.reshape(-1, *[1] * (w.ndim - 1))
    if layer.op_type == "ConvTranspose":  # (Cin, Cout/group, k...): channel = g * Cout/g + j
        group = next((at.i for at in layer.attribute if at.name == "group"), 1)
        cin, per = w.shape[0], w.shape[1]
        a_g = a.reshape(group, 1, per).repeat(cin // group, axis=1).reshape(cin, per)
        return w * a_g.reshape(cin, per, *[1] * (w.ndim - 2))
    trans_b = layer.op_type == "Gemm" and any(at.name == "transB" and at.i for at in layer.attribute)
    return w * (a[:, None] if trans_b else a[None, :])


def _const(name: str, value: np.ndarray, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value).astype(dtype), name)


def _layer_form(form: str, layer: onnx.NodeProto, has_b: bool) -> str:
    """onnxsim 0.8.1 (``data/onnxsim_muladd.onnx``): a Conv with a bias takes the Mul and
    leaves the Add, a Conv without one takes both (the Add becomes its bias), a
    ConvTranspose takes neither."""
    if form != "onnxsim":
        return form
    return "muladd" if layer.op_type == "ConvTranspose" else "onnxsim" if has_b else "fold"


def _fold_one(graph: onnx.GraphProto, init: dict, node: onnx.NodeProto, p: dict, form: str,
              dtype) -> tuple[list[onnx.NodeProto], str, np.ndarray, np.ndarray]:
    """Fold BN ``node`` into its layer: the nodes after the layer, the site, s and t."""
    layer, key, x = p["layer"], node.output[0], node.input[0]
    shape = (1, -1) if layer.op_type in ("Gemm", "MatMul") else (1, -1, 1, 1)
    w = numpy_helper.to_array(init[layer.input[1]]).astype(np.float64)
    has_b = len(layer.input) > 2 and bool(layer.input[2])
    b = numpy_helper.to_array(init[layer.input[2]]).astype(np.float64) if has_b else 0.0 * p["a"]
    form = _layer_form(form, layer, has_b)
    extra, s, t, after = [], p["a"], p["c"], []
    if form in ("fold", "nhwc_bias"):
        w, b0, b = scale_weight(layer, w, p["a"]), b, (b - p["mu"]) * p["a"] + p["beta"]
        layer.output[0] = key if form == "fold" and layer.op_type != "MatMul" else f"{key}/z"
        if form == "nhwc_bias":
            after = [helper.make_node("Transpose", [layer.output[0]], [f"{key}/t"], perm=[0, 2, 3, 1]),
                     helper.make_node("Add", [f"{key}/t", f"{key}/c"], [f"{key}/tb"]),
                     helper.make_node("Transpose", [f"{key}/tb"], [key], perm=[0, 3, 1, 2])]
            graph.initializer.append(_const(f"{key}/c", b, dtype))
            b, t = None, -p["a"] * b0
        elif layer.op_type == "MatMul":
            extra, b, t = [("Add", b)], None, 0.0 * t
    elif form == "onnxsim":
        w, b, t = scale_weight(layer, w, p["a"]), b * p["a"], 0.0 * t
        layer.output[0] = f"{key}/z"
        extra = [("Add", p["c"])]
    elif form == "keras":  # the whole BN as NHWC arithmetic behind a Transpose, nothing folded
        s, t, b = 1.0 + 0.0 * s, 0.0 * t, b if has_b else None
        layer.output[0] = x
        ops = (("Sub", p["mu"]), ("Mul", p["a"]), ("Add", p["beta"]))
        names = [f"{key}/t", *(f"{key}/{op}" for op, _ in ops)]
        after = [helper.make_node("Transpose", [x], [names[0]], perm=[0, 2, 3, 1])]
        after += [helper.make_node(op, [names[k], f"{key}/{op}.c"], [names[k + 1]]) for k, (op, _) in enumerate(ops)]
        after.append(helper.make_node("Transpose", [names[-1]], [key], perm=[0, 3, 1, 2]))
        graph.initializer.extend(_const(f"{key}/{op}.c", value, dtype) for op, value in ops)
    else:
        s, t = 1.0 + 0.0 * s, 0.0 * t
        layer.output[0] = x
        b = b if has_b else None
        extra = ([("Mul", p["a"]), ("Add", p["c"])] if form == "muladd" else
                 [("Sub", p["mu"]), ("Mul", p["a"]), ("Add", p["beta"])])
    graph.initializer.remove(init[layer.input[1]])
    graph.initializer.append(_const(layer.input[1], w, dtype))
    if has_b:
        graph.initializer.remove(init[layer.input[2]])
    del layer.input[2:]
    if b is not None:
        layer.input.append(f"{key}/b")
        graph.initializer.append(_const(f"{key}/b", b, dtype))
    prev = layer.output[0]
    for k, (op, value) in enumerate(extra):
        out = key if k == len(extra) - 1 else f"{key}/{op}{k}"
        graph.initializer.append(_const(f"{key}/{op}{k}.c", value.reshape(shape), dtype))
        after.append(helper.make_node(op, [prev, f"{key}/{op}{k}.c"], [out]))
        prev = out
    return after, layer.output[0], s, t


def fold(kept: onnx.ModelProto, form: str = "fold", keep: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    """``kept`` with its layer-BN pairs folded as ``form`` says (but the BNs named in ``keep``).

    Returns the folded model and {site (layer output): (BN output in ``kept``, s, t)}: the
    site's values are s * x + t per channel, x the BN's input.
    """
    model = onnx.ModelProto()
    model.CopyFrom(kept)
    params = {k: v for k, v in bn_params(model).items() if k not in keep}
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    dtype = helper.tensor_dtype_to_np_dtype(init[next(iter(params.values()))["layer"].input[1]].data_type)
    new_nodes, sites = [], {}
    for node in graph.node:
        p = params.get(node.output[0]) if node.op_type == "BatchNormalization" else None
        if p is None:
            new_nodes.append(node)
            continue
        after, site, s, t = _fold_one(graph, init, node, p, form, dtype)
        new_nodes += after
        sites[site] = (node.output[0], s, t)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for bn in (p["bn"] for p in params.values()):
        for name in bn.input[1:]:
            if name in init:
                graph.initializer.remove(init[name])
    if model.ir_version < 4:  # IR 3: every initializer is also a graph input
        data = [i for i in graph.input if i.name not in init]
        del graph.input[:]
        graph.input.extend(data + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                   for t in graph.initializer])
    return model, sites


def ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as IR 3 requires it: every initializer also a graph input."""
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    return model


def closed_form(ka: onnx.ModelProto, sites: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (mean, var) unfold must insert at each site, from the recalibrated twin K_A."""
    params = bn_params(ka)
    out = {}
    for site, (key, s, t) in sites.items():
        p = params[key]
        out[site] = (s * p["mu"] + t, s**2 * p["v"])
    return out


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of ``model`` on ``feeds`` (onnxruntime, CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def check_twin(kept: onnx.ModelProto, a: np.ndarray, b: np.ndarray, form: str = "fold",
               tol: float = 2e-5, keep: tuple[str, ...] = (), **unfold_options) -> ot.UnfoldResult:
    """Identity, closed-form statistics and equivalence of ``unfold`` on the folded twin.

    ``tol``: the allowed differences, relative to the output RMS (identity: tol / 20, at least
    4 ulp of the output's dtype) and
    to each channel's standard deviation (statistics); ``keep``: BNs left unfolded (they are
    recalibrated alongside the inserted ones).
    """
    name = kept.graph.input[0].name
    ka = ot.recalibrate(kept, a, batch_size=16).model
    folded, sites = fold(ka, form, keep)
    onnx.checker.check_model(folded)
    result = ot.unfold(folded, a, batch_size=16, bn_eps=EPS, **unfold_options)
    assert sorted(s.output for s in result.sites) == sorted(sites)
    unfolded = result.model
    for x in (a[:8], b[:8]):
        ref = run(folded, {name: x})
        rms = np.sqrt(np.mean(ref.astype(np.float64) ** 2))
        # identity: tol / 20 of the RMS, but never below 4 ulp of the output's dtype at its
        # largest value (float16: the inserted BN's scale and 1/sqrt(v + eps') round there)
        ulps = 4 * np.finfo(ref.dtype).eps * np.abs(ref).max()
        np.testing.assert_allclose(run(unfolded, {name: x}), ref, rtol=0, atol=max(tol / 20 * rms, ulps))
    for site, (mean, var) in closed_form(ka, sites).items():
        got_m, got_v = result.statistics[site]
        std = np.sqrt(var).max()
        np.testing.assert_allclose(got_m, mean, rtol=0, atol=tol * std, err_msg=site)
        np.testing.assert_allclose(np.sqrt(got_v), np.sqrt(var), rtol=0, atol=tol * std, err_msg=site)
    ref = run(ot.recalibrate(ka, b, batch_size=16).model, {name: b})
    got = run(ot.recalibrate(unfolded, b, batch_size=16).model, {name: b})
    rms = np.sqrt(np.mean(ref.astype(np.float64) ** 2))
    assert np.abs(run(folded, {name: b}) - ref).max() > 20 * tol * rms  # adapting changes outputs
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * rms)
    return result
