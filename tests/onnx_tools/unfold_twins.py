"""BN-kept twins for ``unfold``'s dialect tests: fold a model the way an exporter does.

:func:`fold` removes every BatchNormalization of a BN-kept model K that reads a layer's output
(Conv, ConvTranspose, Gemm, MatMul) and writes, by ``form``, what an exporter leaves:

* ``"fold"``: the BN folded into the layer, W' = W * a per output channel and
  b' = (b - mu) * a + beta with a = g / sqrt(v + eps) (torch.onnx, tf2onnx, onnxsim); a MatMul
  gets its bias as a following Add (MatMul+Add, what exporters write for a Linear);
* ``"muladd"``: the layer kept, the BN written as Mul(a) then Add(beta - a * mu) (a BN an
  exporter decomposed and nothing fused);
* ``"onnxsim"``: the Mul folded into the layer (W * a, b * a), the Add left: what onnxsim 0.8.1
  writes for Conv -> Mul -> Add;
* ``"submuladd"``: Sub(mu) -> Mul(a) -> Add(beta) after the layer (onnxsim on a BN
  decomposed as Sub/Mul/Mul/Add merges the two Muls);
* ``"nhwc_bias"``: the BN folded into the conv's weights, its shift left as an NHWC BiasAdd
  behind a Transpose pair (the conv output, the site, is then z = y - c per channel).

The last node of each form writes the BN's output name. unfold inserts its BN on the layer's
output z, which is s * x + t per channel with x the BN's input in K (``fold``: s = a,
t = c; ``muladd``/``submuladd``: z = x; ``onnxsim``: s = a; ``nhwc_bias``: s = a, t = -a b);
:func:`closed_form` gives the statistics unfold must insert there from the recalibrated K:
mean = s * mu + t, var = s^2 * v (for ``fold``: beta and g^2 v / (v + eps)). The folding is
written here, independently of ``onnx_tools``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnx_tools as ot

EPS = 1e-9  # the twins' BN epsilon: a^2 * eps is negligible, so eps' = EPS is exact enough
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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


def fold(kept: onnx.ModelProto, form: str = "fold") -> tuple[onnx.ModelProto, dict]:
    """``kept`` with its layer-BN pairs folded as ``form`` says, and its sites.

    Returns the folded model and {site (layer output): (BN output in ``kept``, s, t)}: the
    site's values are s * x + t per channel, x the BN's input.
    """
    model = onnx.ModelProto()
    model.CopyFrom(kept)
    params = bn_params(model)
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    dtype = helper.tensor_dtype_to_np_dtype(init[next(iter(params.values()))["layer"].input[1]].data_type)
    new_nodes, sites = [], {}
    for node in graph.node:
        p = params.get(node.output[0]) if node.op_type == "BatchNormalization" else None
        if p is None:
            new_nodes.append(node)
            continue
        layer, key, x = p["layer"], node.output[0], node.input[0]
        rank = 2 if layer.op_type in ("Gemm", "MatMul") else 4
        shape = (1, -1) + (1,) * (rank - 2)
        w = numpy_helper.to_array(init[layer.input[1]]).astype(np.float64)
        has_b = len(layer.input) > 2 and layer.input[2]
        b = numpy_helper.to_array(init[layer.input[2]]).astype(np.float64) if has_b else 0.0
        extra, shift, s, t = [], 0.0, p["a"], p["c"]
        if form in ("fold", "nhwc_bias"):
            w, b0, b = scale_weight(layer, w, p["a"]), b, (b - p["mu"]) * p["a"] + p["beta"]
            if form == "nhwc_bias":
                shift, b, t = b, None, -p["a"] * b0
            layer.output[0] = key if form == "fold" and layer.op_type != "MatMul" else f"{key}/z"
            t = 0.0 * t if layer.op_type == "MatMul" else t
        elif form == "onnxsim":
            w, b, t = scale_weight(layer, w, p["a"]), b * p["a"], 0.0 * t
            layer.output[0] = f"{key}/z"
            extra = [("Add", p["c"])]
            b = b if has_b else None
        else:
            s, t = 1.0 + 0.0 * s, 0.0 * t
            layer.output[0] = x
            b = None if not has_b else b
            extra = ([("Mul", p["a"]), ("Add", p["c"])] if form == "muladd" else
                     [("Sub", p["mu"]), ("Mul", p["a"]), ("Add", p["beta"])])
        graph.initializer.remove(init[layer.input[1]])
        graph.initializer.append(_const(layer.input[1], w, dtype))
        if has_b:
            graph.initializer.remove(init[layer.input[2]])
        if b is not None and layer.op_type != "MatMul":
            del layer.input[2:]
            layer.input.append(f"{key}/b")
            graph.initializer.append(_const(f"{key}/b", b, dtype))
        elif layer.op_type == "MatMul" and form == "fold":
            extra = [("Add", b)]
        elif b is None and has_b:
            del layer.input[2:]
        if form == "nhwc_bias":
            new_nodes += [helper.make_node("Transpose", [layer.output[0]], [f"{key}/t"], perm=[0, 2, 3, 1]),
                          helper.make_node("Add", [f"{key}/t", f"{key}/c"], [f"{key}/tb"]),
                          helper.make_node("Transpose", [f"{key}/tb"], [key], perm=[0, 3, 1, 2])]
            graph.initializer.append(_const(f"{key}/c", shift, dtype))
            sites[layer.output[0]] = (key, s, t)
            continue
        prev = layer.output[0]
        for k, (op, value) in enumerate(extra):
            out = key if k == len(extra) - 1 else f"{key}/{op}{k}"
            graph.initializer.append(_const(f"{key}/{op}{k}.c", value.reshape(shape), dtype))
            new_nodes.append(helper.make_node(op, [prev, f"{key}/{op}{k}.c"], [out]))
            prev = out
        sites[layer.output[0]] = (key, s, t)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for bn in (p["bn"] for p in params.values()):
        for name in bn.input[1:]:
            if name in init:
                graph.initializer.remove(init[name])
    return model, sites


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
               tol: float = 1e-4, **unfold_options) -> ot.UnfoldResult:
    """Identity, closed-form statistics and equivalence of ``unfold`` on the folded twin.

    ``tol``: the allowed differences, relative to the output RMS (identity: tol / 20) and
    to each channel's standard deviation (statistics).
    """
    name = kept.graph.input[0].name
    ka = ot.recalibrate(kept, a, batch_size=16).model
    folded, sites = fold(ka, form)
    onnx.checker.check_model(folded)
    result = ot.unfold(folded, a, batch_size=16, bn_eps=EPS, **unfold_options)
    assert sorted(s.output for s in result.sites) == sorted(sites)
    unfolded = result.model
    for x in (a[:8], b[:8]):
        ref = run(folded, {name: x})
        rms = np.sqrt(np.mean(ref.astype(np.float64) ** 2))
        np.testing.assert_allclose(run(unfolded, {name: x}), ref, rtol=0, atol=tol / 20 * rms)
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
