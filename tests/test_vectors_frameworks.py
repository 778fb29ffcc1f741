"""Real frameworks against the vectors: the tolerances fit them, the hard cases find their traps.

PyTorch (float64, float32, float16), Keras 3 and Flax linen without fast variance (float32)
pass every case; PyTorch refuses one value per channel in training mode (its own error). Flax's
default ``use_fast_variance=True`` (``E[x^2] - E[x]^2`` in float32) fails ``large_mean`` and
nothing ordinary. (Keras and Flax compile every shape: those two are behind ``slow``.)
"""

import os
from pathlib import Path

import numpy as np
import pytest

import bnref.vectors as bv
from tests.vectors_reader import reader as R

torch = pytest.importorskip("torch")
os.environ.setdefault("KERAS_BACKEND", "jax")

from tests.conformance import adapters  # noqa: E402

pytestmark = pytest.mark.frameworks


def _run(impl, case, a):
    """Every quantity ``impl`` gives for the case, in its own dtype, as float64."""
    dt = np.dtype(case["dtype"])
    b = {k: a[k].astype(dt) for k in case["inputs"] if k != "precise_x"}
    ax, eps = case["axis"], case["eps"]
    out = {"y_eval": impl.eval(b["x"], b["scale"], b["bias"], b["running_mean"], b["running_var"],
                               eps=eps, axis=ax)}
    if case["values_per_channel"] > 1:  # PyTorch: "Expected more than 1 value per channel"
        y, rm, rv = impl.train(b["x"], b["scale"], b["bias"], b["running_mean"].copy(),
                               b["running_var"].copy(), eps=eps, momentum=case["momentum"], axis=ax)
        dx, ds, db = impl.backward(b["x"], b["scale"], b["bias"], b["dy"], eps=eps, axis=ax)
        out.update(y_train=y, new_running_mean=rm, new_running_var=rv, dx=dx, dscale=ds, dbias=db)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _failures(root: Path, manifest: dict, convention: str, dtype: str, impl, monkeypatch):
    monkeypatch.setattr(R, "compute", lambda case, a: _run(impl, case, a))
    failures = []
    for case in manifest["cases"]:
        if (case["convention"]["name"], case["dtype"]) != (convention, dtype):
            continue
        case = dict(case, expected={q: s for q, s in case["expected"].items() if not q.startswith("precise")})
        if case["values_per_channel"] == 1:
            case["expected"] = {q: s for q, s in case["expected"].items() if q == "y_eval"}
        failures += R.check_case(root, case, manifest["tolerance"]["tiny"])[1]
    return failures


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors") / "fw"
    return root, bv.generate(root, ["pytorch", "keras", "flax"], ["float64", "float32", "float16"])


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_pytorch_passes(vectors, monkeypatch, dtype):
    assert _failures(*vectors, "pytorch", dtype, adapters.torch_functional(), monkeypatch) == []


@pytest.mark.slow  # ~15 s: Keras jit-compiles every shape
def test_keras_passes(vectors, monkeypatch):
    pytest.importorskip("keras")
    assert _failures(*vectors, "keras", "float32", adapters.keras_bn(), monkeypatch) == []


@pytest.mark.slow
def test_flax_passes_without_fast_variance(vectors, monkeypatch):
    pytest.importorskip("flax")
    assert _failures(*vectors, "flax", "float32", adapters.flax_linen(False), monkeypatch) == []


def test_flax_fast_variance_fails_large_mean(vectors, monkeypatch):
    pytest.importorskip("flax")
    failures = _failures(*vectors, "flax", "float32", adapters.flax_linen(True), monkeypatch)
    cases = {f.split(":")[0] for f in failures}
    assert "flax-float32-large_mean" in cases and cases <= {"flax-float32-large_mean",
                                                            "flax-float32-tiny_variance"}
    assert any("large_mean: y_train:" in f for f in failures)
