"""Fuzz bnref-onnx's rewrite with generated models: statistics, output contract, runnable result.

For every generated model and random data, ``recalibrate`` must

* write, for every BN, the pooled mean/biased variance of its training-mode inputs as computed
  by an independent node-by-node interpreter (``graphgen.reference_population_stats``), within
  float32 (or float16) reduction error;
* change nothing else than the output contract allows: same node order, names, op types and
  attributes; inputs equal except BN mean/var inputs re-pointed at new (un-shared) tensors;
  every pre-existing initializer either unchanged or one that only BN mean/var read; same graph
  inputs/outputs, opset, IR version and pre-existing metadata;
* produce a model onnxruntime loads and runs.

``make fuzz`` runs the same property on larger models (3000 examples; CI runs 300);
regressions found along the way are pinned with ``@example`` below.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings

from tests.robustness.graphgen import GeneratedModel, onnx_models, reference_population_stats, stored_stats

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ot = pytest.importorskip("onnx_tools")
from onnx import numpy_helper  # noqa: E402

NUM_BATCHES = 3


def _data(g: GeneratedModel, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = g.input_shape[0] * NUM_BATCHES
    shape = (n, *g.input_shape[1:])
    # Per-sample offsets make the pixels of one sample correlated, as in images.
    x = rng.normal(size=shape) + rng.normal(size=(n, g.input_shape[1], *([1] * (len(shape) - 2))))
    return (x * 1.5 + 0.3).astype(g.dtype)


def _tolerance(dtype: np.dtype) -> float:
    # Relative to the channel's std: float16 models compute every layer in float16.
    return 3e-2 if dtype == np.float16 else 5e-4


def _check_output_contract(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    before_names = [n.name for n in before.graph.node]
    after_by_name = {n.name: n for n in after.graph.node}
    new_nodes = [n for n in after.graph.node if n.name not in set(before_names)]
    # Original nodes keep their relative order. New nodes are allowed only for un-sharing
    # statistics in IR < 4 models (where a new initializer would need a new graph input), and
    # only as Constant nodes.
    assert [n.name for n in after.graph.node if n.name in set(before_names)] == before_names
    if before.ir_version >= 4:
        assert not new_nodes, f"new nodes {[n.name for n in new_nodes]} in an IR {before.ir_version} model"
    assert all(n.op_type == "Constant" for n in new_nodes)
    stat_sources = _stat_sources(before)
    for nb in before.graph.node:
        na = after_by_name[nb.name]
        assert na.op_type == nb.op_type and na.domain == nb.domain
        if nb.op_type == "BatchNormalization":
            assert list(na.input[:3]) == list(nb.input[:3])
            assert list(na.output) == list(nb.output)
            assert [a.SerializeToString() for a in na.attribute] == [
                a.SerializeToString() for a in nb.attribute
            ]
        elif nb.op_type == "Constant" and nb.output[0] in stat_sources:
            pass  # a Constant that only feeds BN statistics may carry new values
        else:
            assert na.SerializeToString() == nb.SerializeToString(), f"node {nb.name} changed"
    only_stats = stat_sources
    after_inits = {t.name: t for t in after.graph.initializer}
    for t in before.graph.initializer:
        assert t.name in after_inits, f"initializer {t.name} removed"
        if t.name not in only_stats:
            assert after_inits[t.name].SerializeToString() == t.SerializeToString(), (
                f"initializer {t.name} changed"
            )
    assert [i.SerializeToString() for i in after.graph.input] == [
        i.SerializeToString() for i in before.graph.input
    ]
    assert [o.SerializeToString() for o in after.graph.output] == [
        o.SerializeToString() for o in before.graph.output
    ]
    assert [o.SerializeToString() for o in after.opset_import] == [
        o.SerializeToString() for o in before.opset_import
    ]
    assert after.ir_version == before.ir_version
    before_meta = {p.key: p.value for p in before.metadata_props}
    after_meta = {p.key: p.value for p in after.metadata_props}
    assert all(after_meta.get(k) == v for k, v in before_meta.items())


def _stat_sources(model: onnx.ModelProto) -> set[str]:
    """Tensors (and Constant/Identity outputs) read only as some BN's mean/var, transitively."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, []).append((n, i))
    producers = {o: n for n in model.graph.node for o in n.output}
    out: set[str] = set()

    def only_stats(name: str) -> bool:
        rs = readers.get(name, [])
        return bool(rs) and all(
            (n.op_type == "BatchNormalization" and i in (3, 4))
            or (n.op_type == "Identity" and only_stats(n.output[0]))
            for n, i in rs
        )

    names = {t.name for t in model.graph.initializer} | set(producers)
    for name in names:
        if only_stats(name) and name not in {o.name for o in model.graph.output}:
            out.add(name)
    return out


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(g=onnx_models())
def test_recalibrate_generated_models(g: GeneratedModel):
    # Coverage, shown by --hypothesis-show-statistics.
    event(f"opset {g.model.opset_import[0].version}")
    event(f"dtype {g.dtype.name}")
    for block in set(g.description):
        event(f"block {block}")
    check_recalibrate(g)


def check_recalibrate(g: GeneratedModel) -> None:
    """The fuzz property for one model: statistics, output contract, runnable result."""
    before = onnx.ModelProto()
    before.CopyFrom(g.model)
    data = _data(g)
    batch = g.input_shape[0]
    result = ot.recalibrate(g.model, data, batch_size=batch, estimator="population", provider="cpu")
    # The caller's model is never modified.
    assert g.model.SerializeToString() == before.SerializeToString()

    batches = [data[i : i + batch] for i in range(0, len(data), batch)]
    expected = reference_population_stats(before, batches)
    # The same computation in float64 and unperturbed: how far rounding alone can move each
    # statistic in this model (deep chains through near-constant channels amplify it).
    wide = reference_population_stats(before, batches, wide=True)
    got = stored_stats(result.model)
    assert set(got) == set(expected) == set(g.bn_nodes)
    tol = _tolerance(g.dtype)
    ulp, tiny = np.finfo(g.dtype).eps, float(np.finfo(g.dtype).tiny)
    for name, (mean, var) in expected.items():
        gm, gv = (np.asarray(a, np.float64) for a in got[name])
        slack_m = 4 * np.abs(mean - wide[name][0])
        slack_v = 4 * np.abs(var - wide[name][1])
        # The stored value is rounded to the model's dtype (ulp terms); below its smallest
        # normal number only absolute accuracy is meaningful (tiny terms). onnxruntime's float32
        # kernels sum in another order than NumPy: dot products that cancel (a constant channel
        # behind a saturated Clip) differ by tens of float32 ulp of the result (acc term).
        acc = 64 * float(np.finfo(np.float32).eps)
        assert np.all(
            np.abs(gm - mean) <= tol * (np.sqrt(var) + tiny) + (ulp + acc) * np.abs(mean) + slack_m
        ), (
            name,
            gm,
            mean,
        )
        assert np.all(np.abs(gv - var) <= (2 * tol + ulp) * (var + tiny) + 4 * ulp * mean**2 + slack_v), (
            name,
            gv,
            var,
        )
        assert got[name][0].dtype == g.dtype

    _check_output_contract(before, result.model)
    onnx.checker.check_model(result.model)
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": data[:batch]})
    assert y.shape[0] == batch


@pytest.mark.fuzz
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=onnx_models(max_blocks=6))
def test_recalibrate_generated_models_long(g: GeneratedModel):
    check_recalibrate(g)


# -- regressions: shapes of model the fuzzer found hard, pinned as plain tests --------------------

_SATURATED = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[3,4] x) => (float[3,2] y) {
  h = Gemm(x, w1, c1)
  b1 = BatchNormalization(h, s1, o1, m1, v1)
  r1 = Clip(b1, lo, hi)
  z = MatMul(r1, w2)
  b2 = BatchNormalization(z, s2, o2, m2, v2)
  r2 = Relu(b2)
  y = BatchNormalization(r2, s2, o3, m2b, v2b)
}
"""


def _regression_model(text: str, inits: dict[str, np.ndarray], dtype=np.float32) -> GeneratedModel:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        numpy_helper.from_array(np.asarray(v, dtype=dtype if v.dtype.kind == "f" else v.dtype), k)
        for k, v in inits.items()
    )
    onnx.checker.check_model(model)
    bns = []
    for i, n in enumerate(model.graph.node):
        n.name = n.name or f"{n.op_type}_{i}"
        if n.op_type == "BatchNormalization":
            bns.append(n.name)
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    return GeneratedModel(model, shape, np.dtype(dtype), bns, ["regression"])


def test_regression_constant_channel_behind_saturated_clip():
    # Channel 0 of b1 saturates Clip at 6 for every sample: z is constant, BN b2 divides rounding
    # noise by sqrt(eps) and passes it on (found by the fuzzer as a ~1e-5 relative mismatch).
    f = np.float32
    inits = {
        "w1": np.eye(4, 2, dtype=f),
        "c1": np.zeros(2, f),
        "s1": np.array([0.5, 1.0], f),
        "o1": np.array([50.0, 0.0], f),
        "m1": np.zeros(2, f),
        "v1": np.ones(2, f),
        "lo": np.array(0.0, f),
        "hi": np.array(6.0, f),
        "w2": np.array([[0.3, 0.1], [0.0, 1.0]], f),
        "s2": np.array([1.0, 1.5], f),
        "o2": np.array([0.7, -0.2], f),
        "m2": np.zeros(2, f),
        "v2": np.ones(2, f),
        "o3": np.array([0.1, 0.2], f),
        "m2b": np.zeros(2, f),
        "v2b": np.ones(2, f),
    }
    check_recalibrate(_regression_model(_SATURATED, inits))


def test_regression_float16_variance_below_smallest_normal():
    # A float16 channel whose variance (~2e-6) is subnormal in float16: only absolute accuracy
    # (~6e-8 spacing) is meaningful there (found by the fuzzer).
    text = """
    <ir_version: 8, opset_import: ["" : 15]>
    g (float16[4,2,3] x) => (float16[4,2,3] y) {
      s = Mul(x, k)
      y = BatchNormalization(s, sc, of, mu, va)
    }
    """
    h = np.float16
    inits = {
        "k": np.array([[1e-3], [1.0]], h),
        "sc": np.ones(2, h),
        "of": np.zeros(2, h),
        "mu": np.zeros(2, h),
        "va": np.ones(2, h),
    }
    check_recalibrate(_regression_model(text, inits, dtype=h))


def test_stat_sources_sees_through_identity():
    # Meta-test of the contract checker: an initializer read by BN via Identity is a stat source;
    # one also read by another node is not.
    text = """
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[N,2] x) => (float[N,2] y) {
      mv = Identity(m)
      b = BatchNormalization(x, s, o, mv, v)
      y = Add(b, v)
    }
    """
    model = onnx.parser.parse_model(text)
    for n in "somv":
        model.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), n))
    src = _stat_sources(model)
    assert "m" in src and "mv" in src and "v" not in src and "s" not in src
