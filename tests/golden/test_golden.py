"""bnref against framework outputs saved by ``tests/golden/generate.py`` (no framework needed)."""

import json
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import bnref
from bnref.conventions import by_name
from bnref.testing import BatchNormImpl, BNCase, Tolerance, assert_within, check_case

HERE = Path(__file__).resolve().parent
FILES = sorted((HERE / "data").glob("*.npz"))
BN_FILES = [f for f in FILES if "precise_mean" not in np.load(f).files]
PRECISE_FILES = [f for f in FILES if f not in BN_FILES]


def _load(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("meta_")}
        meta = {k[5:]: z[k].item() for k in z.files if k.startswith("meta_")}
    for k in filter(None, meta.get("bfloat16", "").split(",")):  # stored as their uint16 bits
        arrays[k] = arrays[k].view(ml_dtypes.bfloat16)
    return arrays, meta


def _stored_impl(a):
    """A BatchNormImpl that answers with what the framework returned for these inputs."""
    train = (lambda *_, **__: (a["y_train"], a["new_running_mean"], a["new_running_var"])) \
        if "y_train" in a else None
    ev = (lambda *_, **__: a["y_eval"]) if "y_eval" in a else None
    bw = (lambda *_, **__: (a["dx"], a["dscale"], a["dbias"])) if "dx" in a else None
    return BatchNormImpl(train=train, eval=ev, backward=bw)


def _check(path, conv_override=None):
    a, meta = _load(path)
    conv = conv_override or by_name(meta["convention"])
    conv = replace(conv, eps=float(meta["eps"]), min_eps=0.0)
    case = BNCase(x=a["x"], scale=a["scale"], bias=a["bias"], running_mean=a["running_mean"],
                  running_var=a["running_var"], dy=a["dy"], axis=int(meta["axis"]))
    return check_case(_stored_impl(a), conv, case, Tolerance.for_dtype(a["x"].dtype),
                      momentum=float(meta["momentum"]))


def test_fixtures_and_versions_present():
    versions = json.loads((HERE / "versions.json").read_text())
    frameworks = {_load(f)[1]["framework"] for f in FILES}
    assert {"PyTorch", "fvcore", "Flax", "Keras 3 (JAX)", "ONNX", "onnxruntime", "TensorFlow",
            "tf-keras 2", "Keras 3 (TensorFlow)", "Keras 3 (torch)", "PaddlePaddle", "MXNet"} <= frameworks
    assert {"torch", "fvcore", "flax", "jax", "keras", "onnx", "onnxruntime", "tf:tensorflow",
            "tf:tf-keras", "paddle:paddlepaddle", "mxnet:mxnet"} <= set(versions)


@pytest.mark.parametrize("path", BN_FILES, ids=lambda p: p.stem)
def test_batch_norm_fixture(path):
    worst = _check(path)
    assert worst and all(r <= 1.0 for r in worst.values())


@pytest.mark.parametrize("path", PRECISE_FILES, ids=lambda p: p.stem)
def test_precise_bn_fixture(path):
    a, meta = _load(path)
    p = bnref.PreciseBN(meta["estimator"])
    for i in range(sum(k.startswith("batch_") for k in a)):
        p.update_from_array(a[f"batch_{i}"], axis=int(meta["axis"]))
    tol = Tolerance.for_dtype(a["precise_mean"].dtype)
    assert_within("precise mean", a["precise_mean"], p.mean, np.abs(p.mean) + np.sqrt(p.var), tol)
    assert_within("precise var", a["precise_var"], p.var, p.var + p.mean**2, tol)
    # the other estimator does not fit: the fixture tells them apart
    other = p.with_estimator({"population": "mean_of_variances"}.get(meta["estimator"], "population"))
    with pytest.raises(AssertionError, match="precise var"):
        assert_within("precise var", a["precise_var"], other.var, other.var + other.mean**2, tol)


def test_fixtures_can_fail():
    """The PyTorch fixture rejects a convention with a biased running variance (and the Keras
    fixture one with PyTorch's Bessel correction): the golden check has teeth."""
    torch_file = HERE / "data" / "torch_functional_float32.npz"
    with pytest.raises(AssertionError, match="running_var"):
        _check(torch_file, replace(by_name("pytorch"), unbiased_running_var=False))
    keras_file = HERE / "data" / "keras_bn_float32.npz"
    with pytest.raises(AssertionError, match="running_var"):
        _check(keras_file, replace(by_name("keras"), unbiased_running_var=True))


@pytest.mark.parametrize(("name", "convention", "wrong"), [
    ("tf_keras2_fused_float32", "tf_keras2", {"unbiased_running_var": False}),
    ("tf_fused_raw_float32", "tf_fused", {"momentum_weights": "running"}),
    ("paddle_functional_nhwc_float32", "paddle", {"unbiased_running_var": True}),
    ("mxnet_operator_float32", "mxnet", {"momentum_weights": "batch"}),
])
def test_reference_fixtures_can_fail(name, convention, wrong):
    """The frameworks run in their own environments (make test-reference) are checked here
    without them; each fixture rejects the convention mistake it could hide."""
    with pytest.raises(AssertionError, match="running_(var|mean)"):
        _check(HERE / "data" / f"{name}.npz", replace(by_name(convention), **wrong))
