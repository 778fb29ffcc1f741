"""Tests of onnx_tools.data.spec: model inputs, dtype casts, shape checks, NaN/Inf checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_tools.data import InputSpec, check_finite, open_data
from onnx_tools.errors import DataError
from tests.onnx_tools.data_helpers import collect, one_input, rows


def test_input_spec_from_model_skips_initializers_and_keeps_symbolic_dims():
    model = onnx.parser.parse_model(
        """<ir_version: 3, opset_import: ["" : 9]>
        g (float[N, 3, 8, 8] x, float[3] w, int64[batch, ?] t) => (float[N, 3, 8, 8] y) {
            y = Identity(x)
        }"""
    )
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "w"))
    specs = InputSpec.from_model(model)
    assert [s.name for s in specs] == ["x", "t"]
    assert specs[0].dtype == np.float32 and specs[0].shape == ("N", 3, 8, 8)
    assert specs[1].dtype == np.int64 and specs[1].shape == ("batch", None)
    assert specs[0].static_batch is None
    assert InputSpec("x", np.float32, (8, 3)).static_batch == 8

# --------------------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize(
    ("data_dtype", "model_dtype", "expected"),
    [
        (np.float64, "float", np.float32),
        (np.float32, "float16", np.float16),
        (np.float16, "double", np.float64),
        (np.int32, "int64", np.int64),
    ],
)
def test_allowed_casts_carry_a_note(data_dtype, model_dtype, expected):
    x = np.arange(8).reshape(4, 2).astype(data_dtype)
    source = open_data(x, one_input("N, 2", model_dtype))
    ((_, feed),) = collect(source, batch_size=4)
    assert feed["x"].dtype == expected
    np.testing.assert_array_equal(feed["x"], x.astype(expected))
    assert (
        f"cast {np.dtype(data_dtype)} -> {np.dtype(expected)} for input 'x'"
        in (source.summary.notes)
    )


def test_no_note_without_a_cast():
    source = open_data(rows(4, (2,)), one_input("N, 2"))
    collect(source, batch_size=4)
    assert source.summary.notes == []


@pytest.mark.parametrize(
    ("data_dtype", "model_dtype"),
    [
        (np.uint8, "float"),  # raw pixels: not normalized here
        (np.int64, "float"),
        (np.bool_, "float"),
        (np.float32, "int64"),
        (np.int64, "int32"),  # narrowing
    ],
)
def test_refused_casts(data_dtype, model_dtype):
    x = np.zeros((4, 2), data_dtype)
    with pytest.raises(DataError, match=r"input 'x' expects"):
        open_data(x, one_input("N, 2", model_dtype))


def test_reader_feeds_are_cast_with_a_note_or_refused():
    source = open_data([{"x": np.ones((2, 2), np.float64)}], one_input("N, 2"))
    ((_, feed),) = collect(source, batch_size=2)
    assert feed["x"].dtype == np.float32
    assert "cast float64 -> float32 for input 'x'" in source.summary.notes
    with pytest.raises(DataError, match="expects float32, got int64"):
        collect(open_data([{"x": np.ones((2, 2), np.int64)}], one_input("N, 2")), batch_size=2)


def test_shape_mismatch_names_input_expected_and_got(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 3, 5, 4), np.float32))
    with pytest.raises(DataError) as info:
        open_data(tmp_path / "x.npy", one_input())
    message = str(info.value)
    assert "'x'" in message and "(N, 3, 4, 4)" in message and "(10, 3, 5, 4)" in message
    with pytest.raises(DataError, match=r"expected shape \(N, 3, 4, 4\).*got \(2, 3, 4\)"):
        open_data(np.zeros((2, 3, 4), np.float32), one_input())
    with pytest.raises(DataError, match=r"'x'.*got \(1, 4, 4, 4\)"):
        collect(open_data([{"x": np.zeros((1, 4, 4, 4), np.float32)}], one_input()), batch_size=1)


def test_symbolic_non_batch_dims_accept_any_size():
    source = open_data(rows(4, (7, 5)), one_input("N, C, 5"))
    assert collect(source, batch_size=2)[0][1]["x"].shape == (2, 7, 5)


# --------------------------------------------------------------------------- check_finite


def test_check_finite_names_batch_and_input():
    feed = {"a": np.zeros((4, 2), np.float32), "b": np.zeros((4, 3), np.float32)}
    check_finite(feed, 3)
    feed["b"][2, 1] = np.nan
    feed["b"][3, 0] = np.inf
    with pytest.raises(DataError, match=r"batch 7: input 'b' contains 2 NaN/Inf.*sample 2"):
        check_finite(feed, 7)
    check_finite({"i": np.array([[1, 2]], np.int64)}, 0)


# --------------------------------------------------------------------------- dim_value <= 0


def _paddle_style(model: onnx.ModelProto, dims: list[int]) -> onnx.ModelProto:
    """``model`` with its input's dims written as ``dim_value`` (paddle2onnx writes -1)."""
    shape = model.graph.input[0].type.tensor_type.shape
    for d, value in zip(shape.dim, dims, strict=True):
        d.Clear()
        d.dim_value = value
    return model


def test_non_positive_dim_values_are_symbolic_and_run_end_to_end():
    import onnx_tools as ot
    from tests.onnx_tools.helpers import assert_stats_close, cnn_data, cnn_model, reference_collect

    # 0 and -1 are both dynamic (one rule); onnxruntime would read a declared 0 literally
    # ("Expected: 0"), so sessions get those dimensions cleared (session.runnable_inputs)
    for dims in ([0, 3, 0, -1], [-1, 3, -1, -1]):
        model = _paddle_style(cnn_model(), dims)
        (spec,) = InputSpec.from_model(model)
        assert spec.shape == (None, 3, None, None) and spec.static_batch is None
        assert spec.describe_shape() == "(?, 3, ?, ?)"
        x = cnn_data(40)
        result = ot.recalibrate(model, x, batch_size=8, provider="cpu")
        assert result.stats.num_batches == 5
        assert_stats_close(result.model, reference_collect(cnn_model(), x, 8), {"x": x[:8]})
        # the written model keeps the converter's declaration; only the sessions differ
        assert [d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim] == dims
        assert ot.compare_models(model, result.model, x, provider="cpu").num_samples == 40


def test_dim_param_names_are_kept_and_one_parser_serves_both():
    from onnx_tools.graph import tensor_dims, tensor_type_and_dims

    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, ?, 5] x) => (float[N, 3, ?, 5] y) { y = Identity(x) }"""
    )
    value = model.graph.input[0]
    value.type.tensor_type.shape.dim[2].dim_value = 0
    assert tensor_dims(value) == ["N", 3, None, 5]
    assert tensor_type_and_dims(value)[1] == [None, 3, None, 5]
    assert InputSpec.from_model(model)[0].shape == ("N", 3, None, 5)
