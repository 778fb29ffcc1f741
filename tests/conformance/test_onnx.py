"""ONNX BatchNormalization: the backend test cases, onnx.reference and onnxruntime vs bnref."""

import functools
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

import bnref  # noqa: E402
from bnref.conventions import ONNX  # noqa: E402
from bnref.testing import BatchNormImpl, Tolerance, assert_within, output_scale  # noqa: E402
from tests.conformance import adapters  # noqa: E402
from tests.conformance._lib import compare, make_case, shape_with_channels, with_eps  # noqa: E402

pytestmark = pytest.mark.frameworks
OV = onnx.__version__

# (rank, eps, momentum); ONNX's channel axis is always 1
CONFIGS = [(2, None, None), (4, None, None), (5, None, None), (3, 1e-2, 0.3)]


def _id(c):
    return f"rank{c[0]}-eps{c[1]}-mom{c[2]}"


def _f32(v):
    # ONNX stores epsilon and momentum as FLOAT attributes: a float64 graph really uses
    # float32(1e-5) = 9.99999974738e-06 and float32(0.9), which a float64 comparison can see.
    return float(np.float32(v))


def _conv_mom(eps, mom):
    return with_eps(ONNX, _f32(ONNX.eps if eps is None else eps)), _f32(ONNX.momentum if mom is None else mom)


@functools.cache
def _backend_cases():
    """ONNX's BatchNormalization backend cases, regenerated from the installed onnx.

    ``collect_testcases(op_type=...)`` imports every operator's case module (~20 s here); this
    imports only ``node/batch_normalization.py`` under the same op-type filter, and falls back to the
    public function if onnx's internals move.
    """
    import importlib
    import sys

    import onnx.backend.test.case.node as node_cases

    def bn(cases):
        return [c for c in cases if c.model.graph.node[0].op_type == "BatchNormalization"]

    with warnings.catch_warnings():  # other operators' case generators warn on import
        warnings.simplefilter("ignore")
        try:
            found = bn(node_cases._NodeTestCases)
            if not found:
                node_cases._TargetOpType = "BatchNormalization"
                name = "onnx.backend.test.case.node.batch_normalization"
                mod = sys.modules.get(name)
                importlib.reload(mod) if mod else importlib.import_module(name)
                found = bn(node_cases._NodeTestCases)
        except (AttributeError, ImportError):
            found = []
        return tuple(found or bn(node_cases.collect_testcases(op_type="BatchNormalization")))


def test_defaults_match_convention():
    attrs = onnx.defs.get_schema("BatchNormalization").attributes
    assert attrs["epsilon"].default_value.f == np.float32(ONNX.eps)
    assert attrs["momentum"].default_value.f == np.float32(ONNX.momentum)
    assert attrs["epsilon"].type == onnx.AttributeProto.FLOAT  # float32, even in a float64 graph


def test_float64_graph_uses_float32_eps():
    """In float64, the float32 rounding of eps is visible: bnref with eps=1e-5 is off by ~1e-9
    relative, with eps=float32(1e-5) it agrees to the last bits."""
    from onnx.reference import ReferenceEvaluator

    case = make_case((6, 3), 1, np.float64, seed=0, log10_std=(-3.0, -2.5))
    m = adapters.onnx_bn_model(np.float64, eps=1e-5, momentum=0.9, training=False)
    y = ReferenceEvaluator(m).run(None, {"X": case.x, "scale": case.scale, "B": case.bias,
                                         "mean": case.running_mean, "var": case.running_var})[0]
    args = (case.x, case.scale, case.bias, case.running_mean, case.running_var)
    exact = bnref.batch_norm_eval(*args, eps=_f32(1e-5))
    nominal = bnref.batch_norm_eval(*args, eps=1e-5)
    np.testing.assert_allclose(y, exact, rtol=1e-13, atol=0)
    assert np.abs(y - nominal).max() > 1e3 * np.abs(y - exact).max()


def _attrs(case):
    return {a.name: onnx.helper.get_attribute_value(a) for a in case.model.graph.node[0].attribute}


def test_backend_cases_present():
    names = {c.name for c in _backend_cases()}
    assert {"test_batchnorm_example", "test_batchnorm_epsilon",
            "test_batchnorm_example_training_mode", "test_batchnorm_epsilon_training_mode"} <= names


def _bnref_outputs(inputs, attrs, eps=None):
    x, s, b, m, v = inputs
    eps = attrs.get("epsilon", ONNX.eps) if eps is None else eps
    if attrs.get("training_mode", 0):
        y, cache = bnref.batch_norm_train(x, s, b, eps=eps)
        rm, rv = ONNX.update(m, v, cache.moments, momentum=attrs.get("momentum", ONNX.momentum))
        return [y, rm, rv], cache
    return [bnref.batch_norm_eval(x, s, b, m, v, eps=eps)], None


def _check_outputs(matrix, framework, api, version, got, want, inputs, attrs, cache):
    x, s, b, m, v = (np.asarray(a, np.float64) for a in inputs)
    tol = Tolerance.for_dtype(np.float32)
    eps = attrs.get("epsilon", ONNX.eps)
    if cache is not None:
        xh = (x - cache.mean.reshape(1, -1, *[1] * (x.ndim - 2))) * cache.inv_std.reshape(1, -1, *[1] * (x.ndim - 2))
    else:
        shp = (1, -1) + (1,) * (x.ndim - 2)
        xh = (x - m.reshape(shp)) / np.sqrt(v.reshape(shp) + eps)
    q = "y_train" if cache is not None else "y_eval"
    r = assert_within(f"{q} ({api})", got[0], want[0], output_scale(xh, s, b, 1), tol, 1)
    matrix.record(framework, api, version, np.float32, q, r, tol, "backend cases")
    if cache is not None:
        for name, i, sc in (("running_mean", 1, np.abs(want[1]) + np.sqrt(cache.var)),
                            ("running_var", 2, np.abs(want[2]) + np.abs(v))):
            r = assert_within(f"{name} ({api})", got[i], want[i], sc, tol)
            matrix.record(framework, api, version, np.float32, name, r, tol, "backend cases")


def test_backend_case_expectations(matrix):
    """bnref reproduces every expected output ONNX ships for BatchNormalization, and each case's
    epsilon matters (the expectation would differ with the default eps)."""
    cases = _backend_cases()
    assert cases, "no BatchNormalization backend cases found"
    for case in cases:
        attrs = _attrs(case)
        for inputs, outputs in case.data_sets:
            want, cache = _bnref_outputs(inputs, attrs)
            _check_outputs(matrix, "ONNX", "backend test cases (expected outputs)", OV,
                           outputs, want, inputs, attrs, cache)
            if "epsilon" in attrs:
                other, _ = _bnref_outputs(inputs, attrs, eps=ONNX.eps)
                assert np.abs(other[0] - outputs[0]).max() > 1e-3


@pytest.mark.parametrize("runner", ["reference", "onnxruntime"])
def test_backend_case_models(matrix, runner):
    """The backend cases' own models, run by onnx.reference and by onnxruntime."""
    if runner == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
    cases = _backend_cases()
    assert cases, "no BatchNormalization backend cases found"
    for case in cases:
        attrs = _attrs(case)
        feeds = dict(zip([i.name for i in case.model.graph.input], case.data_sets[0][0], strict=True))
        if runner == "reference":
            from onnx.reference import ReferenceEvaluator

            got = ReferenceEvaluator(case.model).run(None, feeds)
            fw, api, ver = "ONNX", "reference.ReferenceEvaluator", OV
        else:
            sess = ort.InferenceSession(case.model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])
            got = sess.run(None, feeds)
            fw, api, ver = "onnxruntime", "CPU EP, backend case models", ort.__version__
        want, cache = _bnref_outputs(case.data_sets[0][0], attrs)
        _check_outputs(matrix, fw, api, ver, got, want, case.data_sets[0][0], attrs, cache)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_reference_evaluator(matrix, cfg, dtype):
    rank, eps, mom = cfg
    case = make_case(shape_with_channels(rank, 1), 1, dtype, seed=30 + rank)
    conv, mom = _conv_mom(eps, mom)
    compare(matrix, "ONNX", "reference.ReferenceEvaluator", OV, adapters.onnx_reference(),
            conv, case, momentum=mom, variant=f"training_mode 0 and 1, {_id(cfg)}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_onnxruntime_inference(matrix, cfg, dtype):
    ort = pytest.importorskip("onnxruntime")
    rank, eps, mom = cfg
    case = make_case(shape_with_channels(rank, 1), 1, dtype, seed=40 + rank)
    compare(matrix, "onnxruntime", "CPU EP, training_mode=0", ort.__version__,
            adapters.onnxruntime_cpu(training=False), _conv_mom(eps, mom)[0], case,
            variant=_id(cfg))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_onnxruntime_training_mode_fed_stats(matrix, cfg, dtype):
    """Training mode is correct on CPU when the running statistics are graph inputs (fresh
    buffers every run), which is the only way this suite uses it."""
    ort = pytest.importorskip("onnxruntime")
    rank, eps, mom = cfg
    case = make_case(shape_with_channels(rank, 1), 1, dtype, seed=50 + rank)
    impl = adapters.onnxruntime_cpu(training=True)
    conv, mom = _conv_mom(eps, mom)
    compare(matrix, "onnxruntime", "CPU EP, training_mode=1 (stats fed as inputs)",
            ort.__version__, BatchNormImpl(train=impl.train), conv, case,
            momentum=mom, variant=_id(cfg))
