"""Hypothesis strategy for ONNX models shaped the way exporters shape them, and an independent
interpreter that computes each BatchNormalization's training-mode input statistics.

The generator draws a chain of blocks over an (N, C, *spatial) tensor: Conv / ConvTranspose /
Gemm / MatMul followed by BatchNormalization and an activation (Relu, Clip, Sigmoid); two-branch
blocks joined by Add or Concat; BN behind a Transpose to and from channels-last (tf2onnx); pooling;
Flatten/Reshape into a 2-D Gemm + BN. Statistics are stored as initializers, Constant nodes,
Identity aliases of initializers, tensors shared between BN nodes, or graph inputs with
initializer defaults (IR 3). Opsets 7..21 (7-8 with ``spatial=1``), float32 and float16, static
or dynamic batch.

``reference_population_stats`` does not use bnref-onnx's rewrite: it walks the graph node by
node, runs every non-BN node with ``onnx.reference.ReferenceEvaluator`` and every BN in training
mode with plain NumPy (float64, cast back to the model's dtype), and pools each BN's inputs over
all batches with ``np.mean``/``np.var``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

OPSETS = (7, 8, 9, 11, 13, 14, 15, 17, 18, 21)
STORAGE = ("initializer", "constant", "identity", "shared", "input_default")


@dataclass
class GeneratedModel:
    """A generated model and what the test needs to know about it."""

    model: onnx.ModelProto
    input_shape: tuple[int, ...]  # concrete, with the batch size used for data
    dtype: np.dtype
    bn_nodes: list[str]  # BN node names in graph order
    description: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"GeneratedModel(opset={self.model.opset_import[0].version}, dtype={self.dtype.name}, "
            f"input={self.input_shape}, blocks={self.description})"
        )


class _Builder:
    def __init__(self, draw, opset: int, dtype: np.dtype, rng: np.random.Generator):
        self.draw, self.opset, self.dtype, self.rng = draw, opset, dtype, rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.bn_nodes: list[str] = []
        self.desc: list[str] = []
        self.counter = 0
        self.last_stats: dict[int, tuple[str, str]] = {}  # channels -> (mean name, var name)
        self.ir3 = False

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def init(self, base: str, value: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=self.dtype), n))
        return n

    def init_raw(self, base: str, value: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(value, n))
        return n

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def stat_tensor(self, base: str, value: np.ndarray, storage: str) -> str:
        if storage == "constant":
            out = self.name(base)
            t = numpy_helper.from_array(np.asarray(value, dtype=self.dtype), self.name(base + "_value"))
            self.nodes.append(helper.make_node("Constant", [], [out], name=self.name("Constant"), value=t))
            return out
        if storage == "identity":
            src = self.init(base, value)
            return self.node("Identity", [src])
        if storage == "input_default":
            self.ir3 = True
            return self.init(base, value)
        return self.init(base, value)

    def batchnorm(self, x: str, channels: int) -> str:
        storage = self.draw(st.sampled_from(STORAGE), label="storage")
        if storage == "input_default" and self.opset > 8:
            storage = "initializer"
        if storage == "shared" and channels not in self.last_stats:
            storage = "initializer"
        scale = self.init("scale", self.rng.uniform(0.5, 2.0, channels))
        bias = self.init("bias", self.rng.normal(size=channels))
        if storage == "shared":
            mean, var = self.last_stats[channels]
        else:
            # Deliberately stale stored statistics.
            mean = self.stat_tensor("mean", self.rng.normal(size=channels), storage)
            var = self.stat_tensor("var", self.rng.uniform(0.5, 2.0, channels), storage)
            self.last_stats[channels] = (mean, var)
        eps = float(self.draw(st.sampled_from([1e-5, 1e-3]), label="eps"))
        attrs = {"epsilon": eps}
        if self.opset < 9:
            attrs["spatial"] = 1
        nm = self.name("BatchNormalization")
        out = self.name("bn")
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, scale, bias, mean, var], [out], name=nm, **attrs)
        )
        self.bn_nodes.append(nm)
        self.desc.append(f"BN[{storage}]")
        return out

    def activation(self, x: str) -> str:
        act = self.draw(st.sampled_from(["Relu", "Clip", "Sigmoid", "none"]), label="activation")
        if act == "none":
            return x
        self.desc.append(act)
        if act == "Clip":
            if self.opset < 11:
                return self.node("Clip", [x], min=0.0, max=6.0)  # ReLU6, as MobileNet exports
            lo = self.init("clip_lo", np.array(0.0))
            hi = self.init("clip_hi", np.array(6.0))
            return self.node("Clip", [x, lo, hi])
        return self.node(act, [x])


def _conv(b: _Builder, x: str, cin: int, cout: int, rank: int, transpose: bool = False) -> str:
    k = b.draw(st.sampled_from([1, 3]), label="kernel")
    spatial = rank - 2
    if transpose:
        w = b.init("wt", b.rng.normal(size=(cin, cout, *([k] * spatial))) / np.sqrt(cin * k**spatial))
        b.desc.append(f"ConvTranspose{spatial}d")
        return b.node("ConvTranspose", [x, w], pads=[k // 2] * (2 * spatial))
    w = b.init("w", b.rng.normal(size=(cout, cin, *([k] * spatial))) / np.sqrt(cin * k**spatial))
    inputs = [x, w]
    if b.draw(st.booleans(), label="conv_bias"):
        inputs.append(b.init("cb", b.rng.normal(size=cout)))
    b.desc.append(f"Conv{spatial}d")
    return b.node("Conv", inputs, pads=[k // 2] * (2 * spatial))


@st.composite
def onnx_models(draw, max_blocks: int = 4, dtypes=(np.float32, np.float16)) -> GeneratedModel:
    """Strategy: a valid, onnxruntime-runnable model with 1+ BatchNormalization nodes."""
    opset = draw(st.sampled_from(OPSETS), label="opset")
    dtype = np.dtype(draw(st.sampled_from(dtypes), label="dtype"))
    rank = draw(st.integers(2, 5), label="rank")
    channels = draw(st.integers(1, 5), label="channels")
    spatial = tuple(draw(st.lists(st.integers(2, 4), min_size=rank - 2, max_size=rank - 2), label="spatial"))
    batch = draw(st.integers(3, 6), label="batch")
    dynamic = draw(st.booleans(), label="dynamic_batch")
    b = _Builder(draw, opset, dtype, np.random.default_rng(draw(st.integers(0, 2**31), label="seed")))
    x, c, r = "x", channels, rank
    input_spatial = spatial
    tdtype = helper.np_dtype_to_tensor_dtype(dtype)

    blocks = draw(st.integers(1, max_blocks), label="blocks")
    for _ in range(blocks):
        kinds = ["linear_bn", "bn"]
        if r >= 3:
            kinds += ["conv_bn", "convt_bn", "branch_add", "branch_concat", "transpose_bn", "pool", "to_2d"]
        kind = draw(st.sampled_from(kinds), label="block")
        if kind == "bn":
            x = b.activation(b.batchnorm(x, c))
        elif kind == "conv_bn" or kind == "convt_bn":
            cout = draw(st.integers(1, 5), label="cout")
            x = b.activation(b.batchnorm(_conv(b, x, c, cout, r, transpose=kind == "convt_bn"), cout))
            c = cout
        elif kind in ("branch_add", "branch_concat"):
            cout = draw(st.integers(1, 4), label="cout")
            left = b.batchnorm(_conv(b, x, c, cout, r), cout)
            right = b.batchnorm(_conv(b, x, c, cout, r), cout)
            if kind == "branch_add":
                x = b.node("Add", [left, right])
                c = cout
            else:
                x = b.node("Concat", [left, right], axis=1)
                c = 2 * cout
            b.desc.append(kind)
            x = b.activation(x)
        elif kind == "transpose_bn":
            # tf2onnx: a channels-last tensor, Transpose to NCHW around the BN, back afterwards.
            to_last = [0, *range(2, r), 1]
            to_first = [0, r - 1, *range(1, r - 1)]
            x = b.node("Transpose", [x], perm=to_last)
            x = b.node("Relu", [x])
            x = b.node("Transpose", [x], perm=to_first)
            x = b.batchnorm(x, c)
            x = b.node("Transpose", [b.node("Transpose", [x], perm=to_last)], perm=to_first)
            b.desc.append("transpose_bn")
        elif kind == "pool":
            op = draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool"]), label="pool")
            if op == "GlobalAveragePool":
                x = b.node(op, [x])
                spatial = (1,) * (r - 2)
            else:
                x = b.node(op, [x], kernel_shape=[1] * (r - 2))
            b.desc.append(op)
        elif kind == "to_2d":
            if draw(st.booleans(), label="flatten"):
                x = b.node("Flatten", [x], axis=1)
            else:
                x = b.node("Reshape", [x, b.init_raw("shape", np.array([0, -1], dtype=np.int64))])
            c = c * int(np.prod(spatial))
            r, spatial = 2, ()
            b.desc.append("flatten")
            kind = "linear_bn"
        if kind == "linear_bn":
            cout = draw(st.integers(2, 5), label="units")
            if r == 2:
                w = b.init("fc", b.rng.normal(size=(c, cout)) / np.sqrt(c))
                if draw(st.booleans(), label="gemm"):
                    x = b.node("Gemm", [x, w, b.init("fb", b.rng.normal(size=cout))])
                    b.desc.append("Gemm")
                else:
                    x = b.node("MatMul", [x, w])
                    b.desc.append("MatMul")
                x = b.activation(b.batchnorm(x, cout))
                c = cout
            else:
                x = b.activation(b.batchnorm(x, c))

    if not b.bn_nodes:
        x = b.batchnorm(x, c)
    in_shape = ["N" if dynamic else batch, channels, *input_spatial]
    defaults = []
    if b.ir3:  # IR < 4: every initializer is also a graph input (a default value).
        defaults = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits]
    graph = helper.make_graph(
        b.nodes,
        "generated",
        [helper.make_tensor_value_info("x", tdtype, in_shape), *defaults],
        [helper.make_tensor_value_info(x, tdtype, ["N" if dynamic else batch, c, *spatial])],
        initializer=b.inits,
    )
    ir = 3 if b.ir3 else min(onnx.IR_VERSION, 10)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    model.producer_name = "bnref-fuzz"
    model.metadata_props.append(onnx.StringStringEntryProto(key="origin", value="graphgen"))
    onnx.checker.check_model(model)
    concrete = (batch, channels, *input_spatial)
    return GeneratedModel(model, concrete, dtype, b.bn_nodes, b.desc)


# -- independent interpreter ----------------------------------------------------------------------


class _Interpreter:
    """Node-by-node evaluation; ``wide=True`` computes every float tensor in float64."""

    def __init__(self, model: onnx.ModelProto, wide: bool = False):
        self.model = model
        self.wide = wide
        self.opsets = list(model.opset_import)
        self.consts = {t.name: self._widen(numpy_helper.to_array(t)) for t in model.graph.initializer}
        self.evaluators: dict[int, ReferenceEvaluator] = {}

    def _widen(self, v: np.ndarray) -> np.ndarray:
        return v.astype(np.float64) if self.wide and v.dtype.kind == "f" else v

    def _eval_node(self, i: int, node: onnx.NodeProto, values: dict) -> list[np.ndarray]:
        ev = self.evaluators.get(i)
        if ev is None:
            ev = ReferenceEvaluator(node, opsets={o.domain: o.version for o in self.opsets})
            self.evaluators[i] = ev
        return ev.run(None, {n: values[n] for n in node.input if n})

    def run(self, x: np.ndarray, record: dict[str, list[np.ndarray]]) -> None:
        values = dict(self.consts)
        values["x"] = self._widen(x)
        for i, node in enumerate(self.model.graph.node):
            if node.op_type == "BatchNormalization":
                xin, s, bb = (values[n] for n in node.input[:3])
                eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
                x64 = np.moveaxis(xin.astype(np.float64), 1, -1)
                rows = x64.reshape(-1, x64.shape[-1])
                record.setdefault(node.name, []).append(rows)
                mean, var = rows.mean(0), rows.var(0)
                wd = np.float64 if self.wide else np.float32
                if not self.wide:
                    # Sensitivity probe: a runtime's float32 batch mean is off by about one ulp
                    # of |mean| + std. Normalize with a mean perturbed by that much, so that the
                    # difference to the wide pass shows how this model amplifies such errors
                    # (a constant channel divided by sqrt(eps) amplifies them ~300x).
                    mean = mean + np.finfo(np.float32).eps * (np.abs(mean) + np.sqrt(var))
                xm = np.moveaxis(xin, 1, -1).astype(wd)
                y = (xm - mean.astype(wd)) / np.sqrt(var.astype(wd) + wd(eps)) * s.astype(wd) + bb.astype(wd)
                values[node.output[0]] = np.moveaxis(y, -1, 1).astype(xin.dtype)
            elif node.op_type == "Constant":
                values[node.output[0]] = self._widen(numpy_helper.to_array(node.attribute[0].t))
            elif node.op_type == "Clip" and len(node.input) == 1:  # opset < 11: min/max attributes
                attrs = {a.name: a.f for a in node.attribute}
                values[node.output[0]] = np.clip(values[node.input[0]], attrs["min"], attrs["max"])
            else:
                for name, v in zip(node.output, self._eval_node(i, node, values), strict=False):
                    values[name] = self._widen(v)


def reference_population_stats(
    model: onnx.ModelProto, batches: list[np.ndarray], wide: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pooled (population) mean and biased variance of every BN input over ``batches``.

    Non-BN nodes compute in the model's dtype, as a runtime does, and BNs normalize with a mean
    perturbed by one float32 ulp (``wide=True``: everything in float64, unperturbed). The
    difference between the two measures how sensitive each statistic is to rounding upstream.
    """
    interp = _Interpreter(model, wide=wide)
    record: dict[str, list[np.ndarray]] = {}
    for xb in batches:
        interp.run(xb, record)
    out = {}
    for name, rows in record.items():
        allrows = np.concatenate(rows, axis=0)
        out[name] = (allrows.mean(0), allrows.var(0))
    return out


def stored_stats(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The mean/var each BN node reads, resolved through Constant and Identity nodes."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def resolve(name: str) -> np.ndarray:
        if name in values:
            return values[name]
        n = producers[name]
        if n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        if n.op_type == "Identity":
            return resolve(n.input[0])
        raise AssertionError(f"cannot resolve {name} produced by {n.op_type}")

    return {
        n.name: (resolve(n.input[3]), resolve(n.input[4]))
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
    }
