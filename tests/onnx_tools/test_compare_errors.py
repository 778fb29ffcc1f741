"""issue 19 item 6: compare fails with one BnrefOnnxError line, never onnxruntime's exception.

Two models with the same input name but another spatial size, a static batch or another rank
used to reach ``session.run`` and print onnxruntime's traceback. The class: whatever
onnxruntime raises, at session creation or in any batch's run of either model, compare_models
raises a BnrefOnnxError subclass and the CLI prints one line.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

import onnx_tools as ot
from tests.onnx_tools.helpers import (
    CNN_TEXT,
    assert_clean_failure,
    cnn_data,
    cnn_initializers,
    listing,
    make_model,
    run_cli,
)


def _variant(x_type: str) -> onnx.ModelProto:
    return make_model(CNN_TEXT.replace("float[N,3,6,6] x", x_type), cnn_initializers(),
                      opset=15, ir=8)


@pytest.mark.parametrize("x_type", ["float[N,3,8,8] x", "float[4,3,6,6] x", "float[N,3,6] x",
                                    "float[N,3,6,6,1] x"])
def test_compare_models_with_other_input_shapes(tmp_path, x_type):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(make_model(CNN_TEXT, cnn_initializers(), opset=15, ir=8), a)
    onnx.save(_variant(x_type), b)
    np.save(tmp_path / "x.npy", cnn_data(10))
    with pytest.raises(ot.DataError, match=r"input 'x' has shape \(N, 3, 6, 6\) in model A"):
        ot.compare_models(a, b, tmp_path / "x.npy")
    before = listing(tmp_path)
    code, _, err = run_cli("compare", a, b, "--data", tmp_path / "x.npy")
    assert_clean_failure(code, err, 1, "the same batches cannot feed both", tmp_path, before)


ORT_ERRORS = [getattr(ort_state, n) for n in ("Fail", "InvalidArgument", "RuntimeException",
                                              "NotImplemented", "InvalidGraph", "EPFail")]


class _Failing:
    """An onnxruntime session that raises ``error`` at creation or in its ``call``-th run."""

    real = onnxruntime.InferenceSession
    count = 0

    def __init__(self, plan, *args, **kwargs):
        self.plan = plan
        type(self).count += 1
        self.index = type(self).count  # 1: model A, 2: model B
        self.runs = 0
        if plan["session"] == self.index and plan["call"] == 0:
            raise plan["error"]("injected failure at session creation")
        self.session = self.real(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, *args, **kwargs):
        self.runs += 1
        if self.plan["session"] == self.index and self.plan["call"] == self.runs:
            raise self.plan["error"]("injected failure in run")
        return self.session.run(*args, **kwargs)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(error=st.sampled_from(ORT_ERRORS), session=st.sampled_from([1, 2]),
       call=st.integers(0, 3))
def test_any_onnxruntime_failure_in_compare_is_a_bnref_error(tmp_path, monkeypatch, error,
                                                              session, call):
    model = tmp_path / "m.onnx"
    if not model.exists():
        onnx.save(make_model(CNN_TEXT, cnn_initializers(), opset=15, ir=8), model)
        np.save(tmp_path / "x.npy", cnn_data(30))
    plan = {"error": error, "session": session, "call": call}
    _Failing.count = 0
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda *a, **k: _Failing(plan, *a, **k))
    with pytest.raises(ot.BnrefOnnxError) as info:
        ot.compare_models(model, model, tmp_path / "x.npy", batch_size=8)
    assert not isinstance(info.value, tuple(ORT_ERRORS))
    assert "injected failure" in str(info.value)
    if call:
        assert f"batch {call - 1}: onnxruntime could not run model {'AB'[session - 1]}" in str(
            info.value)
    _Failing.count = 0
    code, _, err = run_cli("compare", model, model, "--data", tmp_path / "x.npy",
                           "--batch-size", "8")
    assert code == 1 and "Traceback" not in err
    assert [ln.startswith("bnref-onnx: error: ") for ln in err.splitlines()] == [True]
