"""``convert`` through the real frameworks: X -> PyTorch and PyTorch -> X.

Live: Keras 3 (JAX), Flax linen and onnxruntime against PyTorch. Raw TF fused batch norm and
Paddle are not in the main environment: their outputs come from ``golden/``
(``generate_golden.py``), with PyTorch live on the other side; where their reference venvs exist
(``make test-all``, ``make test-reference``) the live framework must reproduce every golden file. Every comparison is float32, elementwise
``|y_target - y_source| <= 64 * eps32 * (|scale| (1 + |x_hat|) + |bias|)`` (x_hat from the
source's parameters); the naive port (parameters copied, the target's eps) must fail it.
"""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bnref.conventions import TF_FUSED, by_name, convert
from tests.porting.cases import inputs, parameters

torch = pytest.importorskip("torch")
os.environ.setdefault("KERAS_BACKEND", "jax")

from tests.conformance import adapters  # noqa: E402

pytestmark = pytest.mark.frameworks
GOLDEN = Path(__file__).resolve().parent / "golden"
KEYS = ("scale", "bias", "mean", "var")
BOUND = 64 * float(np.finfo(np.float32).eps)


def ratio(y_got, y_want, p, eps):
    """Worst |error| / allowed, NCHW, natural scale from the source parameters ``p`` and eps.

    ``|scale| (1 + |x_hat| + |mean| / sqrt(var + eps)) + |bias|``: the last term is the
    rounding of ``x * a`` and ``mean * a`` (``a = scale / sqrt(var + eps)``) in frameworks that
    fold inference BN into one scale and shift, as onnxruntime does.
    """
    s, b, m, v = (np.asarray(p[k], np.float64).reshape(1, -1, 1, 1) for k in KEYS)
    y_want = np.asarray(y_want, np.float64)
    nat = np.abs(s) * (1 + np.abs(m) / np.sqrt(v + eps)) + np.abs(y_want - b) + np.abs(b)
    return float(np.max(np.abs(np.asarray(y_got, np.float64) - y_want) / (BOUND * nat)))


def params(r) -> dict[str, np.ndarray]:
    """``scale, bias, mean, var`` of a ``Converted`` as the dict the runners take."""
    return {k: getattr(r, k) for k in KEYS}


def torch_eval(x, p, eps):
    return adapters.torch_functional().eval(x, *(p[k] for k in KEYS), eps=eps, axis=1)


def torch_train(x, p, momentum):
    _, rm, rv = adapters.torch_functional().train(x, *(p[k] for k in KEYS), eps=1e-5,
                                                  momentum=momentum, axis=1)
    return rm, rv


# -- live: framework -> (its adapter, channel axis, its eps as the source) ------------------------


def _keras():
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    return adapters.keras_bn()


def _flax():
    pytest.importorskip("flax")
    return adapters.flax_linen(use_fast_variance=False)


def _ort():
    pytest.importorskip("onnxruntime")
    return adapters.onnxruntime_cpu(training=True)


LIVE = {"keras": (_keras, -1, 1e-3), "flax": (_flax, -1, 1e-3), "onnx": (_ort, 1, 1e-4)}
TORCH_EPS = 1e-4  # PyTorch's side of PyTorch -> X: an eps no target has by default


def _live(name, seed):
    """``(impl, axis, source eps, p, x)`` for a live framework and seeded inputs."""
    make, axis, src_eps = LIVE[name]
    p = parameters(seed)
    return make(), axis, src_eps, p, inputs(seed, p)


def _run_eval(impl, axis, x, p, eps):
    y = impl.eval(np.ascontiguousarray(np.moveaxis(x, 1, axis)), *(p[k] for k in KEYS), eps=eps, axis=axis)
    return np.moveaxis(np.asarray(y), axis, 1)


@pytest.mark.parametrize("name", sorted(LIVE))
def test_framework_to_pytorch(name):
    impl, axis, src_eps, p, x = _live(name, 31)
    y_src = _run_eval(impl, axis, x, p, src_eps)
    r = convert(*(p[k] for k in KEYS), source=name, target="pytorch", source_eps=src_eps)
    assert ratio(torch_eval(x, params(r), r.eps), y_src, p, src_eps) <= 1.0
    assert ratio(torch_eval(x, p, 1e-5), y_src, p, src_eps) > 10  # the naive port is caught


@pytest.mark.parametrize("name", sorted(LIVE))
def test_pytorch_to_framework(name):
    impl, axis, _, p, x = _live(name, 32)
    y_torch = torch_eval(x, p, TORCH_EPS)
    r = convert(*(p[k] for k in KEYS), source="pytorch", target=name, source_eps=TORCH_EPS)
    y = _run_eval(impl, axis, x, params(r), r.eps)
    assert ratio(y, y_torch, p, TORCH_EPS) <= 1.0
    assert ratio(_run_eval(impl, axis, x, p, by_name(name).eps), y_torch, p, TORCH_EPS) > 10


def _biased_from_torch(rv_torch, old, w, n):
    """What a biased-variance framework stores, from PyTorch's unbiased update."""
    unbiased = (rv_torch.astype(np.float64) - (1 - w) * old) / w
    return (1 - w) * old + w * unbiased * (n - 1) / n


def _check_running(rm, rv, rm_t, rv_t, p, w, n, unbiased):
    old_m, old_v = (p[k].astype(np.float64) for k in ("mean", "var"))
    want_v = rv_t.astype(np.float64) if unbiased else _biased_from_torch(rv_t, old_v, w, n)
    scale_m = np.abs(rm_t) + np.abs(old_m) + np.sqrt(np.abs(want_v))
    assert np.all(np.abs(rm - rm_t) <= BOUND * scale_m), (rm, rm_t)
    assert np.all(np.abs(rv - want_v) <= BOUND * (np.abs(want_v) + old_v)), (rv, want_v)


@pytest.mark.parametrize("name", sorted(LIVE))
def test_momentum_through_frameworks(name):
    """PyTorch momentum 0.3 and its conversion give the same running statistics."""
    impl, axis, _, p, x = _live(name, 33)
    m = convert(*(p[k] for k in KEYS), source="pytorch", target=name, source_momentum=0.3).momentum
    assert m == 0.7
    _, rm, rv = impl.train(np.ascontiguousarray(np.moveaxis(x, 1, axis)), *(p[k] for k in KEYS),
                           eps=1e-5, momentum=m, axis=axis)
    rm_t, rv_t = torch_train(x, p, 0.3)
    _check_running(np.asarray(rm), np.asarray(rv), rm_t, rv_t, p, 0.3, x.size // x.shape[1], False)


# -- golden: raw TF fused and Paddle --------------------------------------------------------------


def _golden(name):
    """``(arrays, source parameters, meta)`` of ``golden/<name>.npz``."""
    with np.load(GOLDEN / f"{name}.npz") as z:
        a = {k: z[k] for k in z.files if k != "meta"}
        return a, {k: a[f"src_{k}"] for k in KEYS}, json.loads(str(z["meta"]))


@pytest.mark.parametrize("fw", ["tf_fused", "paddle"])
def test_golden_framework_to_pytorch(fw):
    a, p, meta = _golden(f"{fw}_to_pytorch")
    r = convert(*(p[k] for k in KEYS), source=fw, target="pytorch", source_eps=meta["source_eps"])
    eps_used = meta["source_eps"]  # 1e-3 and 1e-5: no floor applies
    assert ratio(torch_eval(a["x"], params(r), r.eps), a["y"], p, eps_used) <= 1.0
    assert ratio(torch_eval(a["x"], p, 1e-5), a["y"], p, eps_used) > 10  # PyTorch's default eps


@pytest.mark.parametrize("fw", ["tf_fused", "paddle"])
def test_golden_pytorch_to_framework(fw):
    a, p, meta = _golden(f"pytorch_to_{fw}")
    r = convert(*(p[k] for k in KEYS), source="pytorch", target=fw, source_eps=meta["source_eps"],
                target_eps=meta["target_eps"])
    for k, v in zip(KEYS, r[:4], strict=True):  # the framework ran on exactly what convert returns today
        np.testing.assert_array_equal(v, a[f"tgt_{k}"], err_msg=f"{k}: regenerate golden/ ({__doc__})")
    assert r.eps == meta["eps"]
    y_torch = torch_eval(a["x"], p, meta["source_eps"])
    assert ratio(a["y"], y_torch, p, meta["source_eps"]) <= 1.0
    assert ratio(a["y_naive"], y_torch, p, meta["source_eps"]) > 10


@pytest.mark.parametrize("fw", ["tf_fused", "paddle"])
def test_golden_momentum(fw):
    a, p, meta = _golden(f"{fw}_train")
    m = convert(*(p[k] for k in KEYS), source="pytorch", target=fw,
                source_momentum=meta["torch_momentum"]).momentum
    assert m == meta["momentum"] == {"tf_fused": 0.3, "paddle": 0.7}[fw]
    rm_t, rv_t = torch_train(a["x"], p, meta["torch_momentum"])
    x = a["x"]
    _check_running(a["running_mean"], a["running_var"], rm_t, rv_t, p, meta["torch_momentum"],
                   x.size // x.shape[1], by_name(fw).unbiased_running_var)


def test_golden_files_are_from_the_frameworks():
    metas = [_golden(p.stem)[2] for p in sorted(GOLDEN.glob("*.npz"))]
    assert {(m["framework"], m["version"].split(".")[0]) for m in metas} >= {("tf_fused", "2"),
                                                                            ("paddle", "3")}


def test_golden_tf_small_eps_is_not_floored():
    """Measured: TF 2.21's ``fused_batch_norm`` uses an eps below 1.001e-5 as given (earlier
    wrappers floored it at 1.001e-5 for cuDNN). A model saved with such an eps and run by this
    TF ports correctly with ``min_eps=0``, not with the old floor."""
    a, p, meta = _golden("tf_fused_small_eps")
    no_floor = replace(TF_FUSED, min_eps=0.0)
    r = convert(*(p[k] for k in KEYS), source=no_floor, target="pytorch", source_eps=meta["eps"])
    assert ratio(torch_eval(a["x"], params(r), r.eps), a["y"], p, meta["eps"]) <= 1.0
    old_floor = replace(TF_FUSED, min_eps=1.001e-5)
    floored = convert(*(p[k] for k in KEYS), source=old_floor, target="pytorch", source_eps=meta["eps"])
    assert ratio(torch_eval(a["x"], params(floored), floored.eps), a["y"], p,
                 meta["eps"]) > 10


# -- live TF and Paddle, where their reference venvs exist (make test-all, make test-reference) ---

#: framework -> (its venv, the adapter in tests.conformance that runs it there, kwargs, channel axis)
REFERENCE = {"tf_fused": ("tf", "adapters_tf:tf_fused", {"api": "v1"}, -1),
             "paddle": ("paddle", "adapters_paddle:functional", {}, 1)}


@pytest.fixture(scope="module", params=sorted(REFERENCE))
def reference(request):
    """``(framework, its BatchNormImpl run in its own venv, channel axis)``; skips without the venv
    (an error under ``BNREF_REQUIRE_REFERENCE=1``)."""
    from tests.conformance.remote import remote_impl, start_worker

    venv, builder, kwargs, axis = REFERENCE[request.param]
    worker = start_worker(venv, {"TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        yield request.param, remote_impl(worker, builder, **kwargs), axis
    finally:
        worker.close()


@pytest.mark.reference
def test_golden_files_are_what_the_live_framework_gives(reference):
    """The pinned framework, run live, reproduces every golden file it made, so the golden tests
    above hold for it: both ports' inference outputs, the naive port, one training step."""
    fw, impl, axis = reference
    a, p, meta = _golden(f"{fw}_to_pytorch")
    assert ratio(_run_eval(impl, axis, a["x"], p, meta["source_eps"]), a["y"], p, meta["source_eps"]) <= 1.0
    a, p, meta = _golden(f"pytorch_to_{fw}")  # tgt_*: what convert returns (test_golden_pytorch_to_framework)
    tgt = {k: a[f"tgt_{k}"] for k in KEYS}
    assert ratio(_run_eval(impl, axis, a["x"], tgt, meta["eps"]), a["y"], p, meta["source_eps"]) <= 1.0
    naive_eps = by_name(fw).eps if meta["target_eps"] is None else meta["target_eps"]
    assert ratio(_run_eval(impl, axis, a["x"], p, naive_eps), a["y_naive"], p, meta["source_eps"]) <= 1.0
    if fw == "tf_fused":  # the file that says TF no longer floors eps (TF_FUSED.min_eps = 0)
        a, p, meta = _golden("tf_fused_small_eps")
        assert ratio(_run_eval(impl, axis, a["x"], p, meta["eps"]), a["y"], p, meta["eps"]) <= 1.0
    a, p, meta = _golden(f"{fw}_train")
    x = np.ascontiguousarray(np.moveaxis(a["x"], 1, axis))
    _, rm, rv = impl.train(x, *(p[k] for k in KEYS), eps=1e-3, momentum=meta["momentum"], axis=axis)
    # the golden statistics as the reference (unbiased=True: compared as they are)
    _check_running(np.asarray(rm), np.asarray(rv), a["running_mean"], a["running_var"], p,
                   meta["momentum"], x.size // x.shape[axis], True)
