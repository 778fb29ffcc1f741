"""The oracle against ONNX's own definition on random BatchNormalization nodes: the reference
evaluator and onnxruntime (inference mode, and training mode where the runtime is correct).

ONNX's own backend test cases are checked in ``tests/conformance/test_onnx.py`` (no framework
needed), which also records them in the conformance matrix.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnref
from bnref.conventions import ONNX
from bnref.testing import bn_cases, shapes_and_axes

onnx = pytest.importorskip("onnx")
from onnx import helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402


def _bn_model(shape, training, eps, momentum, opset=15, dtype=onnx.TensorProto.FLOAT):
    c = shape[1]
    outs = ["y", "rm", "rv"] if training else ["y"]
    node = helper.make_node(
        "BatchNormalization",
        ["x", "s", "b", "m", "v"],
        outs,
        epsilon=eps,
        momentum=momentum,
        **({"training_mode": 1} if training else {}),
    )
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "bn",
        [vi("x", dtype, shape)] + [vi(n, dtype, [c]) for n in "sbmv"],
        [vi("y", dtype, shape)]
        + ([vi("rm", dtype, [c]), vi("rv", dtype, [c])] if training else []),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


channels_first = shapes_and_axes(max_rank=5, max_side=5).map(lambda sa: (sa[0], 1))


@settings(max_examples=30)
@given(
    case=bn_cases(np.float32, shape_axis=channels_first, min_log10_std=-1, max_log10_std=2),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    momentum=st.sampled_from([0.9, 0.5, 0.0]),
)
def test_reference_evaluator_both_modes(case, eps, momentum):
    feeds = dict(x=case.x, s=case.scale, b=case.bias, m=case.running_mean, v=case.running_var)
    y_ev = ReferenceEvaluator(_bn_model(case.x.shape, False, eps, momentum)).run(None, feeds)[0]
    ref_ev = bnref.batch_norm_eval(
        case.x, case.scale, case.bias, case.running_mean, case.running_var, eps=eps
    )
    np.testing.assert_allclose(y_ev, ref_ev, rtol=1e-4, atol=1e-4 * np.abs(case.scale).max())
    y, rm, rv = ReferenceEvaluator(_bn_model(case.x.shape, True, eps, momentum)).run(None, feeds)
    ref_y, cache = bnref.batch_norm_train(case.x, case.scale, case.bias, eps=eps)
    ref_m, ref_v = ONNX.update(
        case.running_mean, case.running_var, cache.moments, momentum=momentum
    )
    np.testing.assert_allclose(
        y, ref_y, rtol=1e-4, atol=1e-4 * (np.abs(case.scale).max() + np.abs(case.bias).max())
    )
    np.testing.assert_allclose(rm, ref_m, rtol=1e-5, atol=1e-5 * np.abs(cache.mean).max())
    np.testing.assert_allclose(rv, ref_v, rtol=1e-4)


ort = pytest.importorskip("onnxruntime")


def _session(model):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@settings(max_examples=30)
@given(
    case=bn_cases(np.float32, shape_axis=channels_first, min_log10_std=-1, max_log10_std=2),
    eps=st.sampled_from([1e-5, 1e-3]),
    opset=st.sampled_from([9, 14, 15, 21]),
)
def test_onnxruntime_inference_mode(case, eps, opset):
    feeds = dict(x=case.x, s=case.scale, b=case.bias, m=case.running_mean, v=case.running_var)
    y = _session(_bn_model(case.x.shape, False, eps, 0.9, opset=opset)).run(None, feeds)[0]
    ref = bnref.batch_norm_eval(
        case.x, case.scale, case.bias, case.running_mean, case.running_var, eps=eps
    )
    # float32 kernel that folds scale*inv_std: a few ulp of the natural output scale.
    tol = (
        16
        * np.finfo(np.float32).eps
        * (
            np.abs(case.scale).max()
            * (
                1
                + np.abs(ref - case.bias.reshape([1, -1] + [1] * (ref.ndim - 2))).max()
                / np.abs(case.scale).min()
            )
            + np.abs(case.bias).max()
        )
    )
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)


@settings(max_examples=20)
@given(
    case=bn_cases(
        np.float32,
        shape_axis=channels_first,
        min_log10_std=-1,
        max_log10_std=1,
        max_abs_mean_over_std=3,
    )
)
def test_onnxruntime_training_mode_with_distinct_tensors(case):
    # Correct only with graph optimizations off and distinct mean/var buffers (FACTS: the CPU
    # kernel aliases running outputs onto its inputs; bnref-onnx never relies on it).
    feeds = dict(
        x=case.x, s=case.scale, b=case.bias, m=case.running_mean.copy(), v=case.running_var.copy()
    )
    y, rm, rv = _session(_bn_model(case.x.shape, True, 1e-5, 0.9)).run(None, feeds)
    ref_y, cache = bnref.batch_norm_train(case.x, case.scale, case.bias, eps=1e-5)
    ref_m, ref_v = ONNX.update(case.running_mean, case.running_var, cache.moments)
    np.testing.assert_allclose(
        y, ref_y, rtol=1e-4, atol=1e-4 * (np.abs(case.scale).max() + np.abs(case.bias).max())
    )
    np.testing.assert_allclose(rm, ref_m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rv, ref_v, rtol=1e-4)
