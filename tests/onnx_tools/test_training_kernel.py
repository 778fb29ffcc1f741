"""The training-kernel route: onnxruntime's CPU training-mode BatchNormalization as collector.

Where a session runs on the CPU alone, each BN within the bounds of ``training_kernel_fits``
becomes onnxruntime's training-mode kernel with ``momentum=0``. Expected values come from
NumPy in float64 on the same data (and ``reference_collect``, ONNX's ReferenceEvaluator),
never from the tool's own path. The accuracy test at the bounds is what keeps a future
onnxruntime from silently accumulating worse than the primitive route.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_tools as ot
from onnx_tools import collection
from onnx_tools.errors import ModelError
from onnx_tools.rewrite import (
    PRIMITIVE,
    TRAINING_KERNEL,
    build_collection_model,
    training_kernel_fits,
)
from onnx_tools.rewrite import plan as plan_mod
from onnx_tools.rewrite.plan import (
    TRAINING_KERNEL_MAX_BATCH,
    TRAINING_KERNEL_MAX_ROW,
    TRAINING_KERNEL_MAX_VALUES,
    training_kernel_exact,
)
from onnx_tools.session import make_session
from tests.onnx_tools.helpers import (
    assert_stats_close,
    cnn_data,
    cnn_model,
    make_model,
    reference_collect,
)

F, D, H = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16


@pytest.mark.parametrize(
    ("elem", "dims", "batch", "exact"),
    [
        pytest.param(F, [None, 8, 32, 32], 64, True, id="image"),
        pytest.param(F, [None, 8, 64, 64], TRAINING_KERNEL_MAX_BATCH, True, id="corner"),
        pytest.param(F, [None, 8, 32, 32], TRAINING_KERNEL_MAX_BATCH + 1, False, id="big-batch"),
        pytest.param(F, [512, 8, 32, 32], 64, False, id="static-batch-wins"),
        pytest.param(F, [16, 8, 32, 32], None, True, id="static-batch-only"),
        pytest.param(F, [None, 8, 32, 32], None, False, id="batch-unknown"),
        pytest.param(F, [None, 8, TRAINING_KERNEL_MAX_ROW + 1], 8, False, id="long-row"),
        pytest.param(F, [None, 8, TRAINING_KERNEL_MAX_ROW], 8, True, id="longest-row"),
        pytest.param(F, [None, 8, 128, 128], 8, False, id="long-image-row"),
        pytest.param(F, [None, 8, None, None], 64, False, id="dynamic-spatial"),
        pytest.param(F, [None, 8], 256, True, id="after-gemm"),
        pytest.param(F, None, 64, False, id="rank-unknown"),
        pytest.param(D, None, None, True, id="double-any"),
        pytest.param(H, [None, 8, 4, 4], 64, False, id="float16"),
        pytest.param(None, [None, 8, 4, 4], 64, False, id="type-unknown"),
    ],
)
def test_training_kernel_exact_golden(elem, dims, batch, exact):
    assert training_kernel_exact(elem, dims, batch) is exact


@pytest.mark.parametrize(
    ("elem", "dims", "batch", "fits"),
    [
        pytest.param(F, [None, 16, 32, 32], 64, True, id="exactly-the-limit"),
        pytest.param(F, [None, 16, 32, 33], 64, False, id="one-row-over"),
        pytest.param(F, [None, 64, 56, 56], 64, False, id="large-input"),
        pytest.param(F, [None, 8, 32, 32], TRAINING_KERNEL_MAX_BATCH + 1, False, id="inexact"),
        pytest.param(F, [None, None, 4, 4], 64, False, id="dynamic-channels"),
        pytest.param(D, [None, 8, 4, 4], 64, True, id="double-small"),
        pytest.param(D, [None, 64, 56, 56], 64, False, id="double-large"),
        pytest.param(D, None, 64, False, id="double-rank-unknown"),
    ],
)
def test_training_kernel_fits_golden(elem, dims, batch, fits):
    assert TRAINING_KERNEL_MAX_VALUES == 64 * 16 * 32 * 32
    assert training_kernel_fits(elem, dims, batch) is fits


def one_bn(shape: list, opset: int = 15, dtype: int = F) -> onnx.ModelProto:
    """X -> BatchNormalization(scale 1.5, bias 0.25, stale mean 0 / var 1) -> Y."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    c = shape[1]
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g ({'float' if dtype == F else 'double'}[{','.join(map(str, shape))}] x)
      => ({'float' if dtype == F else 'double'}[{','.join(map(str, shape))}] y) {{
      y = BatchNormalization<epsilon=0.001>(x, s, b, m, v)
    }}
    """
    return make_model(text, {"s": np.full(c, 1.5, np_dtype), "b": np.full(c, 0.25, np_dtype),
                             "m": np.zeros(c, np_dtype), "v": np.ones(c, np_dtype)})


def run_one(model: onnx.ModelProto, x: np.ndarray):
    """The training-kernel collection model of a one-BN model on ``x``: mean, var, Y."""
    cm = build_collection_model(model, training_kernel=True, batch_size=len(x))
    assert [o.route for o in cm.outputs.values()] == [TRAINING_KERNEL]
    elem = model.graph.input[0].type.tensor_type.elem_type
    cm.model.graph.output.append(helper.make_tensor_value_info("y", elem, None))
    session, _ = make_session(cm.model, "cpu")
    names = [*cm.output_names[:2], "y"]
    return session.run(names, {"x": x, **cm.feeds})


def numpy_training_bn(x: np.ndarray, eps: float = 1e-3):
    """Batch mean, biased variance and training-mode Y (scale 1.5, bias 0.25) in float64."""
    axes = (0, *range(2, x.ndim))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x64 - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * 1.5 + 0.25
    return mean, var, y


@pytest.mark.parametrize("opset", [7, 9, 13, 14, 15, 21])
@pytest.mark.parametrize("shape", [(16, 3, 5, 4), (16, 3), (8, 3, 2, 3, 4)])
def test_statistics_and_output_match_numpy_in_every_opset(opset, shape):
    """Before opset 14 the extra outputs select training mode, from 14 the attribute does."""
    rng = np.random.default_rng(opset)
    spread = np.array([1.0, 3.0, 0.5]).reshape((1, 3) + (1,) * (len(shape) - 2))
    x = (rng.normal(size=shape) * spread + 2).astype(np.float32)
    model = one_bn(["N", *shape[1:]], opset)
    if opset < 9:  # BN-7/8 still have `spatial` (default 1)
        model.graph.node[0].attribute.append(helper.make_attribute("spatial", 1))
    mean, var, y = run_one(model, x)
    want_mean, want_var, want_y = numpy_training_bn(x)
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-6 * np.sqrt(want_var).max())
    np.testing.assert_allclose(var, want_var, rtol=2e-6)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=2e-5)


def test_double_stays_double():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3, 4)) * 1e-3 + 1e4  # cancellation-prone: float32 would lose it
    mean, var, y = run_one(one_bn(["N", 3, 4], dtype=D), x)
    want_mean, want_var, want_y = numpy_training_bn(x)
    assert var.dtype == np.float64
    np.testing.assert_allclose(mean, want_mean, rtol=1e-14)
    np.testing.assert_allclose(var, want_var, rtol=1e-9)
    # Y = x * s + (b - mean * s) with x ~ 1e4, s ~ 1.5e3: rounding of terms ~1.5e7 in float64
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1.5e7 * 2**-52 * 8)


def _kinds(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Data a float32 sum can go wrong on: an offset, and values that repeat (ReLU, pixels)."""
    rng = np.random.default_rng(5)
    g = rng.standard_normal(shape, dtype=np.float32)
    pixels = rng.integers(0, 256, shape).astype(np.float32) / np.float32(255)
    return {"offset": g + np.float32(1e3), "abs": np.abs(g), "relu": np.maximum(g, 0),
            "pixels": pixels}


def _errors(model: onnx.ModelProto, shape, training_kernel: bool) -> dict[str, tuple[float, float]]:
    """Relative error of the batch mean and variance per kind of data, against float64."""
    cm = build_collection_model(model, training_kernel=training_kernel, batch_size=shape[0])
    assert cm.outputs["y"].route == (TRAINING_KERNEL if training_kernel else PRIMITIVE)
    session, _ = make_session(cm.model, "cpu")
    out = {}
    axes = (0, *range(2, len(shape)))
    for kind, data in _kinds(shape).items():
        mean, var = session.run(cm.output_names[:2], {"x": data, **cm.feeds})
        x64 = data.astype(np.float64)
        want_mean, want_var = x64.mean(axis=axes), x64.var(axis=axes)
        out[kind] = (float(np.max(np.abs(mean - want_mean) / np.abs(want_mean))),
                     float(np.max(np.abs(var - want_var) / want_var)))
    return out


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((TRAINING_KERNEL_MAX_BATCH, 1, 64, 64), id="largest-batch-and-row"),
        pytest.param((TRAINING_KERNEL_MAX_BATCH, 2), id="largest-batch-after-gemm"),
    ],
)
def test_accuracy_at_the_bounds(shape, monkeypatch):
    """At the corner the installed onnxruntime's kernel is as exact as the primitive route.

    Within 1e-6, or within 1.5x the primitive route's own error where repeated values (ReLU
    zeros, 8-bit pixels) make both accumulate it. The size limit (a matter of speed, not
    accuracy) is lifted to reach the corner.
    """
    assert 64 * 64 == TRAINING_KERNEL_MAX_ROW
    monkeypatch.setattr(plan_mod, "TRAINING_KERNEL_MAX_VALUES", 2**40)
    model = one_bn(["N", *shape[1:]])
    kernel, primitive = _errors(model, shape, True), _errors(model, shape, False)
    for kind, errors in kernel.items():
        for got, reference in zip(errors, primitive[kind], strict=True):
            assert got <= max(1e-6, 1.5 * reference), (kind, kernel, primitive)


FOLDED = """
<ir_version: 8, opset_import: ["" : 15]>
folded (float[N,T,4] x) => (float[M,4] y) {
  shape = Constant<value = int64[2] {-1, 4}>()
  r = Reshape(x, shape)
  y = BatchNormalization(r, s, b, m, v)
}
"""


@pytest.mark.parametrize("training_kernel", [True, False])
def test_a_first_axis_that_is_not_the_batch_gets_no_batch_bound(training_kernel):
    """Reshape(-1, C): the BN's first axis holds batch x T rows, not the batch. The route may
    not take it for the batch (the kernel would add 10^6 rows in float32), and the primitive
    route's float64 sum over it keeps the mean of offset data (float32 lost it: 85x the
    variance)."""
    f = np.float32
    model = make_model(FOLDED, {"s": np.ones(4, f), "b": np.zeros(4, f), "m": np.zeros(4, f),
                                "v": np.ones(4, f)})
    cm = build_collection_model(model, training_kernel=training_kernel, batch_size=64)
    assert cm.outputs["y"].route == PRIMITIVE
    x = np.random.default_rng(0).standard_normal((64, 16000, 4), dtype=np.float32) + f(1e3)
    session, _ = make_session(cm.model, "cpu")
    mean, var, shape = session.run(cm.output_names, {"x": x})
    assert list(shape) == [64 * 16000, 4]
    x64 = x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=1e-6)


def test_routes_follow_the_bounds_and_the_option():
    model = cnn_model()
    before = model.SerializeToString()
    primitive = build_collection_model(model)
    assert {o.route for o in primitive.outputs.values()} == {PRIMITIVE} and not primitive.feeds
    trained = build_collection_model(model, training_kernel=True, batch_size=8)
    assert {o.route for o in trained.outputs.values()} == {TRAINING_KERNEL}
    inputs = {vi.name for vi in trained.model.graph.input}
    assert set(trained.feeds) <= inputs and len(trained.feeds) == 2 * len(trained.bns)
    assert not set(trained.feeds) & {t.name for t in trained.model.graph.initializer}
    big = build_collection_model(model, training_kernel=True, batch_size=TRAINING_KERNEL_MAX_BATCH + 1)
    assert {o.route for o in big.outputs.values()} == {PRIMITIVE}
    assert model.SerializeToString() == before


FRESH = """
<ir_version: 8, opset_import: ["" : 15]>
fresh (float[N,3,6,6] x) => (float[N,4,6,6] y) {
  c1 = Conv<pads=[1,1,1,1]>(x, w1)
  m1 = Identity(o1)
  v1 = Identity(s1)
  b1 = BatchNormalization(c1, s1, o1, m1, v1)
  r1 = Relu(b1)
  c2 = Conv<pads=[1,1,1,1]>(r1, w2)
  m2 = Identity(o1)
  v2 = Identity(s1)
  y = BatchNormalization(c2, s1, o1, m2, v2)
}
"""


def test_a_fresh_model_with_aliased_initializers_does_not_drift():
    """A fresh torch export: var is the scale (ones), mean the bias (zeros), shared by both BNs.

    onnxruntime merges such equal initializers, and the kernel declares its running outputs
    aliases of its mean/var inputs; were anything written into a shared tensor, the scale
    would change with every batch: the statistics of batch A would differ after batch B, and
    from the reference. (Feeding the kernel its own zeros is what makes this hold by design;
    with this onnxruntime it holds even without, since the running outputs are graph outputs
    and get their own buffers: the non-finite test below is the one that needs the feeds.)
    """
    rng = np.random.default_rng(0)
    f = np.float32
    inits = {"w1": rng.normal(size=(4, 3, 3, 3)).astype(f), "s1": np.ones(4, f),
             "o1": np.zeros(4, f), "w2": (rng.normal(size=(4, 4, 3, 3)) * 0.3).astype(f)}
    model = make_model(FRESH, inits)
    cm = build_collection_model(model, training_kernel=True, batch_size=8)
    session, _ = make_session(cm.model, "cpu")
    a = (rng.normal(size=(8, 3, 6, 6)) * 2 + 1).astype(f)
    b = (rng.normal(size=(8, 3, 6, 6)) * 5 - 3).astype(f)
    first = session.run(cm.output_names, {"x": a, **cm.feeds})
    session.run(cm.output_names, {"x": b, **cm.feeds})
    again = session.run(cm.output_names, {"x": a, **cm.feeds})
    for u, v in zip(first, again, strict=True):
        np.testing.assert_array_equal(u, v)
    for key, p in reference_collect(model, a, 8).items():
        out = cm.outputs[key]
        got = dict(zip(cm.output_names, first, strict=True))
        np.testing.assert_allclose(got[out.mean], p.mean, rtol=0, atol=1e-6 * np.sqrt(p.var).max())
        np.testing.assert_allclose(got[out.var], p.var, rtol=2e-6)


def _models_run(monkeypatch, fail_training: bool = False) -> list[onnx.ModelProto]:
    """Record the models collection builds sessions of (refusing training mode if asked)."""
    seen: list[onnx.ModelProto] = []
    real = collection.make_session

    def spy(model, provider="auto"):
        seen.append(model)
        if fail_training and _training_nodes(model):
            raise ModelError("onnxruntime cannot load the model: Training mode is not supported "
                             "in this build.")
        return real(model, provider)

    monkeypatch.setattr(collection, "make_session", spy)
    return seen


def _training_nodes(model: onnx.ModelProto) -> int:
    """BN nodes with running outputs: the training kernel (the primitive route keeps only Y)."""
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization" and len(n.output) > 1)


@pytest.mark.parametrize(("provider", "cpu_build", "training"),
                         [("cpu", True, 3), ("auto", True, 3), ("cpu", False, 3),
                          ("auto", False, 0)])
def test_collect_uses_the_training_kernel_only_where_the_session_is_cpu_only(
        monkeypatch, provider, cpu_build, training):
    """``auto`` with CUDA built in may run on CUDA, which refuses training mode: primitive."""
    import onnxruntime

    if not cpu_build:
        monkeypatch.setattr(onnxruntime, "get_available_providers",
                            lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
        monkeypatch.setattr(collection, "make_session",
                            lambda m, p="auto", real=collection.make_session: real(m, "cpu"))
    seen = _models_run(monkeypatch)
    x = cnn_data()
    stats = ot.collect(cnn_model(), x, batch_size=8, provider=provider)
    assert _training_nodes(seen[-1]) == training
    ref = reference_collect(cnn_model(), x, 8)
    for key, p in ref.items():
        got = stats.bns[key].precise
        np.testing.assert_allclose(got.var, p.var, rtol=2e-5)


def test_a_build_without_training_support_falls_back_to_primitive_operators(monkeypatch):
    seen = _models_run(monkeypatch, fail_training=True)
    x = cnn_data()
    model = cnn_model()
    result = ot.recalibrate(model, x, batch_size=8, provider="cpu")
    assert len(seen) == 2 and _training_nodes(seen[0]) == 3 and _training_nodes(seen[1]) == 0
    assert_stats_close(result.model, reference_collect(model, x, 8), {"x": x[:2]})


def test_feeds_are_left_as_they_were():
    """The kernel aliases its running outputs onto the fed mean/var: they must not change."""
    model = one_bn(["N", 3, 4, 4])
    cm = build_collection_model(model, training_kernel=True, batch_size=8)
    before = {k: v.copy() for k, v in cm.feeds.items()}
    session, _ = make_session(cm.model, "cpu")
    x = (np.random.default_rng(0).normal(size=(8, 3, 4, 4)) + 7).astype(np.float32)
    session.run(cm.output_names, {"x": x, **cm.feeds})
    for k, v in cm.feeds.items():
        np.testing.assert_array_equal(v, before[k])


def test_non_finite_stored_statistics_do_not_reach_the_kernel():
    """Recalibration is for broken statistics: a diverged run leaves NaN/Inf in running_var.

    The kernel computes ``old * 0 + batch``, and 0 * NaN is NaN: it must never read the
    model's own mean/var, only the zeros collection feeds it.
    """
    f = np.float32
    model = one_bn(["N", 3, 4, 4])
    for t in model.graph.initializer:
        if t.name in ("m", "v"):
            t.CopyFrom(numpy_helper.from_array(np.array([np.nan, np.inf, -np.inf], f), t.name))
    x = (np.random.default_rng(0).normal(size=(8, 3, 4, 4)) * 2 + 1).astype(f)
    mean, var, y = run_one(model, x)
    want_mean, want_var, want_y = numpy_training_bn(x)
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-6 * np.sqrt(want_var).max())
    np.testing.assert_allclose(var, want_var, rtol=2e-6)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=2e-5)
