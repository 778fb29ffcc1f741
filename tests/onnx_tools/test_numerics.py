"""Numerical edge cases of the collection model (issue 7): long reductions, constant channels,
float16 near overflow, and a batch of one into a BN after a fully connected layer.

Expected values come from NumPy in float64 on the same float32/float16 data, never from the
tool's own code path. The long-reduction cases use a constant offset (1e3 + noise): the case
where a float32 accumulation over one long row goes wrong (onnxruntime's float32 ReduceMean
accumulates in float32: ~4e-3 relative error in the mean and ~15x in the variance at 4·10⁶
values per row, measured with the single-stage rewrite this replaced).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_tools as ot
from onnx_tools.errors import DataError
from onnx_tools.rewrite import STAGE_LIMIT, ReductionPlan, build_collection_model, plan_reduction
from onnx_tools.session import make_session


def bn_model(shape: list, dtype: int = TensorProto.FLOAT, opset: int = 15) -> onnx.ModelProto:
    """X (``shape``, str for a symbolic dim) -> BatchNormalization -> Y; stale stats 0/1."""
    channels = shape[1]
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    x = helper.make_tensor_value_info("x", dtype, shape)
    y = helper.make_tensor_value_info("y", dtype, shape)
    inits = [
        numpy_helper.from_array(np.full(channels, 1.5, np_dtype), "scale"),
        numpy_helper.from_array(np.full(channels, 0.25, np_dtype), "bias"),
        numpy_helper.from_array(np.zeros(channels, np_dtype), "mean"),
        numpy_helper.from_array(np.ones(channels, np_dtype), "var"),
    ]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"],
                            name="bn", epsilon=1e-5)
    graph = helper.make_graph([node], "bn", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def batch_stats(model: onnx.ModelProto, x: np.ndarray, *, with_y: bool = False, **options):
    """One batch through the collection model: (mean, var[, y]) of its single BN."""
    cm = build_collection_model(model, **options)
    names = cm.output_names[:2]
    if with_y:
        elem = model.graph.input[0].type.tensor_type.elem_type
        cm.model.graph.output.append(helper.make_tensor_value_info("y", elem, None))
        names = [*names, "y"]
    session, _ = make_session(cm.model, "cpu")
    return session.run(names, {"x": x, **cm.feeds})


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance in float64, chunked over the batch axis."""
    axes = (0, *range(2, x.ndim))
    n = x.size // x.shape[1]
    total = sum(c.astype(np.float64).sum(axis=axes) for c in np.array_split(x, 8))
    mean = total / n
    shape = (1, -1) + (1,) * (x.ndim - 2)
    ss = sum(np.square(c.astype(np.float64) - mean.reshape(shape)).sum(axis=axes)
             for c in np.array_split(x, 8))
    return mean, ss / n


def offset_data(shape: tuple[int, ...], offset: float = 1e3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    x += np.float32(offset)
    return x


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.abs(want)))


# --------------------------------------------------------------------------- reduction plan


@pytest.mark.parametrize(
    ("dims", "plan"),
    [
        pytest.param([None, 8], ReductionPlan(None, (), None, wide=True), id="after-gemm"),
        pytest.param([None, 8, 32, 32], ReductionPlan(None, ((2, 3),), 1024), id="image-32"),
        pytest.param([None, 8, 512, 512], ReductionPlan(None, ((3,), (2,)), 512),
                     id="image-512-two-stages"),
        pytest.param([None, 8, None, None], ReductionPlan(None, ((3,), (2,)), None),
                     id="dynamic-image-per-axis"),
        pytest.param([None, 8, 8, 64, 64], ReductionPlan(None, ((3, 4), (2,)), 4096),
                     id="volume"),
        pytest.param([None, 2, 2**20], ReductionPlan((0, 0, -1, 4096), ((3,), (2,)), 4096),
                     id="long-signal-split"),
        pytest.param([None, 2, None], ReductionPlan((0, 0, -1), ((2,),), None, wide=True),
                     id="dynamic-signal-float64"),
        pytest.param([None, 2, 4099], ReductionPlan((0, 0, -1), ((2,),), None, wide=True),
                     id="prime-length-float64"),
        pytest.param(None, ReductionPlan((0, 0, -1), ((2,),), None, wide=True),
                     id="unknown-rank-float64"),
    ],
)
def test_plan_reduction_golden(dims, plan):
    assert plan_reduction(dims) == plan


@pytest.mark.parametrize("dims", [[None, 3, 7, 9, 11], [None, 3, 4096, 2], [None, 3, 1, 1],
                                  [None, 3, 100, None, 30], [None, 3, 5000, 3]])
def test_plan_reduction_covers_each_axis_once_within_the_limit(dims):
    plan = plan_reduction(dims)
    assert not plan.wide
    work = list(dims)
    if plan.reshape is not None:
        split = plan.reshape.index(-1)
        work = [*dims[:split], None, plan.reshape[split + 1], *dims[split + 1:]]
    axes = sorted(a for stage in plan.stages for a in stage)
    assert axes == list(range(2, len(work)))
    for stage in plan.stages:
        sizes = [work[a] for a in stage]
        assert all(s is None for s in sizes) or np.prod(sizes) <= STAGE_LIMIT


# --------------------------------------------------------------------------- long reductions


@pytest.mark.parametrize(
    ("declared", "shape", "limit"),
    [
        pytest.param(["N", 3, 10, 12], (5, 3, 10, 12), 16, id="4d-two-stages"),
        pytest.param(["N", 3, "H", "W"], (5, 3, 10, 12), 16, id="4d-dynamic"),
        pytest.param(["N", 3, 512], (5, 3, 512), 128, id="3d-split-short-rows"),
        pytest.param(["N", 3, 8192], (5, 3, 8192), STAGE_LIMIT, id="3d-split-matmul-rows"),
        pytest.param(["N", 3, "L"], (5, 3, 96), 16, id="3d-dynamic-float64"),
        pytest.param(["N", 3, 97], (5, 3, 97), 16, id="3d-prime-float64"),
        pytest.param(["N", 3, 4, 5, 6], (5, 3, 4, 5, 6), 8, id="5d"),
        pytest.param(["N", 3], (7, 3), 16, id="2d"),
        pytest.param(["N", 3, 24, 24], (5, 3, 24, 24), STAGE_LIMIT, id="4d-matmul-row"),
        pytest.param(["N", 3, 24, 24], (5, 3, 24, 24), 256, id="4d-short-rows"),
    ],
)
def test_every_plan_computes_the_batch_statistics(declared, shape, limit):
    """Small inputs with a small stage limit walk every code path of the rewrite."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3, shape[1]).reshape(
        (1, -1) + (1,) * (len(shape) - 2)) + 4).astype(np.float32)
    mean, var = batch_stats(bn_model(declared), x, stage_limit=limit)
    want_mean, want_var = reference(x)
    np.testing.assert_allclose(mean, want_mean, rtol=2e-6)
    np.testing.assert_allclose(var, want_var, rtol=2e-5)


@pytest.mark.parametrize(
    ("declared", "shape"),
    [
        pytest.param(["N", 1, 1024, 1024], (16, 1, 1024, 1024), id="image-static"),
        pytest.param(["N", 1, "H", "W"], (16, 1, 1024, 1024), id="image-dynamic"),
        pytest.param(["N", 1, "L"], (4, 1, 2**22), id="signal-dynamic"),
    ],
)
def test_long_reductions_are_exact_to_float32_rounding(declared, shape):
    """1.7·10⁷ values per channel, offset 1e3: relative error of mean and var <= 1e-6."""
    x = offset_data(shape)
    mean, var = batch_stats(bn_model(declared), x)
    want_mean, want_var = reference(x)
    assert rel_err(mean, want_mean) <= 1e-6
    assert rel_err(var, want_var) <= 1e-6


@pytest.mark.slow
def test_1e8_values_per_channel():
    """10⁸ values per channel (where a single float32 accumulation is off by ~0.7)."""
    x = offset_data((25, 1, 2000, 2000))
    mean, var = batch_stats(bn_model(["N", 1, 2000, 2000]), x)
    want_mean, want_var = reference(x)
    assert rel_err(mean, want_mean) <= 1e-6
    assert rel_err(var, want_var) <= 1e-6


# --------------------------------------------------------------------------- constant channels


@pytest.mark.parametrize("training_kernel", [False, True], ids=["primitive", "training-kernel"])
def test_constant_channels_have_zero_variance_and_finite_output(training_kernel):
    """Channels that never vary: variance 0 (or rounding of the constant), Y = bias, no NaN."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4, 8, 8)).astype(np.float32)
    x[:, 0] = 3.0          # exactly representable sums: variance exactly 0
    x[:, 1] = 0.0
    x[:, 2] = 0.1          # the float32 mean may round by an ulp: variance ~ulp²
    x[:, 3] = 1000.1
    mean, var, y = batch_stats(bn_model(["N", 4, 8, 8]), x, with_y=True,
                               training_kernel=training_kernel, batch_size=16)
    assert var[0] == 0.0 and var[1] == 0.0
    ulp = np.spacing(np.abs(x[0, :, 0, 0]))
    assert np.all(var >= 0.0)
    assert np.all(var <= (4 * ulp) ** 2)
    assert np.all(np.abs(mean - x[0, :, 0, 0]) <= 2 * ulp)
    assert np.isfinite(y).all()
    # eps keeps the normalization finite: (x - mean) / sqrt(var + eps) * scale + bias = bias
    np.testing.assert_allclose(y[:, 0], 0.25, atol=1e-6)
    np.testing.assert_allclose(y[:, 2:], 0.25, atol=0.1)


def test_constant_channel_through_collect_and_apply(tmp_path):
    """The aggregated population variance of a constant channel is 0; the new model runs."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 2, 5, 5)).astype(np.float32)
    x[:, 1] = -2.5
    model = bn_model(["N", 2, 5, 5])
    result = ot.recalibrate(model, x, batch_size=16, provider="cpu")
    bn = next(iter(result.stats.bns.values())).precise
    assert bn.var[1] == 0.0 and bn.mean[1] == -2.5
    session, _ = make_session(result.model, "cpu")
    (y,) = session.run(None, {"x": x[:4]})
    assert np.isfinite(y).all()


# --------------------------------------------------------------------------- float16


def test_float16_near_overflow_reduces_in_float32():
    """Values ~3e4 in float16: squares overflow float16 (max 65504); statistics stay right."""
    rng = np.random.default_rng(2)
    x = (3e4 + rng.normal(size=(32, 3, 16, 16)) * np.array([50.0, 100.0, 200.0]).reshape(
        1, 3, 1, 1)).astype(np.float16)
    with np.errstate(over="ignore"):
        assert np.isinf(np.square(x[:2])).any()  # the hazard is real
    mean, var, y = batch_stats(bn_model(["N", 3, 16, 16], TensorProto.FLOAT16), x, with_y=True)
    assert mean.dtype == np.float64 and var.dtype == np.float64  # never float16; batch sums in f64
    want_mean, want_var = reference(x)
    assert rel_err(mean, want_mean) <= 1e-6
    assert rel_err(var, want_var) <= 1e-5
    assert y.dtype == np.float16 and np.isfinite(y).all()
    # Y is the normalized batch: per channel mean = bias, std = scale
    y64 = y.astype(np.float64)
    np.testing.assert_allclose(y64.mean(axis=(0, 2, 3)), 0.25, atol=1e-2)
    np.testing.assert_allclose(y64.std(axis=(0, 2, 3)), 1.5, rtol=1e-2)


def test_float16_collect_aggregates_finite_statistics():
    rng = np.random.default_rng(4)
    x = (2.5e4 + rng.normal(size=(64, 2, 8, 8)) * 80).astype(np.float16)
    stats = ot.collect(bn_model(["N", 2, 8, 8], TensorProto.FLOAT16), x, batch_size=16,
                       provider="cpu")
    bn = next(iter(stats.bns.values())).precise
    want_mean, want_var = reference(x)
    assert rel_err(bn.mean, want_mean) <= 1e-6
    assert rel_err(bn.var, want_var) <= 1e-5


def test_float16_statistics_that_overflow_are_refused(tmp_path):
    # Found in review: a variance above 65504 was written as inf into a float16 model.
    rng = np.random.default_rng(5)
    x = (2e4 + rng.normal(size=(32, 2, 4, 4)) * 500).astype(np.float16)  # variance ~2.5e5
    model = bn_model(["N", 2, 4, 4], TensorProto.FLOAT16)
    with pytest.raises(ot.ModelError, match=r"new var of BatchNormalization .* does not fit in the model's float16"):
        ot.recalibrate(model, x, batch_size=16, provider="cpu", output=str(tmp_path / "o.onnx"))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- batch of one


FC_TEXT = """
<ir_version: 8, opset_import: ["" : 15]>
fc (float[N,4] x) => (float[N,3] y) {
  h = Gemm<transB=1>(x, w, b)
  y = BatchNormalization(h, s, o, m, v)
}
"""


def _fc_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(FC_TEXT)
    f = np.float32
    inits = {"w": rng.normal(size=(3, 4)).astype(f), "b": np.zeros(3, f), "s": np.ones(3, f),
             "o": np.zeros(3, f), "m": np.zeros(3, f), "v": np.ones(3, f)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    return model


def test_batch_of_one_after_fully_connected_is_refused():
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    with pytest.raises(DataError, match=r"1 value per channel.*at least 2 values per channel"):
        ot.collect(_fc_model(), x, batch_size=1, provider="cpu")


def test_batch_of_one_image_is_allowed(caplog):
    """One image still has H*W values per channel: allowed (with the small-batch warning)."""
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 4)).astype(np.float32)
    with caplog.at_level("WARNING", logger="onnx_tools.collection"):
        stats = ot.collect(bn_model(["N", 2, 4, 4]), x, batch_size=1, provider="cpu")
    assert "batch size 1 is far below" in caplog.text
    bn = next(iter(stats.bns.values())).precise
    want_mean, want_var = reference(x)
    np.testing.assert_allclose(bn.mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(bn.var, want_var, rtol=1e-5)
