"""issue 19 items 4 and 10: no non-finite number is ever written; JSON output is strict.

* A prior (``--prior-strength``) on a model whose stored statistics hold NaN/Inf (a diverged
  run) or a negative variance: those channels take the new statistics alone, the others the
  blend, with a note; every tensor written is finite and no NumPy warning escapes.
* Whatever the route (apply_stats with any STATS, save_stats), a non-finite value to write is
  an error before anything is written.
* ``inspect --json``, ``--report`` and ``compare --json`` parse with a strict parser: NaN/Inf
  become ``null``, and the top-level ``"non_finite"`` list names each by its JSON Pointer.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import bnref
import onnx_tools as ot
from tests.onnx_tools.helpers import (
    CNN_TEXT,
    cnn_data,
    cnn_initializers,
    listing,
    make_model,
    run_cli,
)

#: BN key -> (mean initializer, var initializer) in CNN_TEXT.
STORAGE = {"b1": ("m1", "v1"), "b2": ("m2", "v2"), "y": ("m3", "v3")}
BAD = [np.nan, np.inf, -np.inf]


def _strict(text: str):
    def refuse(token):
        raise AssertionError(f"non-JSON token {token} in output")
    return json.loads(text, parse_constant=refuse)


def _resolve(document, pointer: str):
    node = document
    assert pointer.startswith("/")
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _initializers(model) -> dict[str, np.ndarray]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def clean_stats():
    """STATS collected on the clean CNN (they apply to a corrupted copy: same fingerprint)."""
    model = make_model(CNN_TEXT, cnn_initializers(), opset=15, ir=8)
    return ot.collect(model, cnn_data(40), batch_size=8)


@st.composite
def corruptions(draw):
    """Which stored mean/var channels get which bad value (NaN, +-Inf, negative variance)."""
    init = cnn_initializers()
    chosen = draw(st.lists(st.tuples(st.sampled_from(sorted(STORAGE)), st.booleans(),
                                     st.integers(0, 3), st.sampled_from([*BAD, -1.0])),
                           min_size=1, max_size=4), label="corruptions")
    for key, is_var, channel, value in chosen:
        name = STORAGE[key][1 if is_var else 0]
        if value == -1.0 and not is_var:
            value = np.nan
        init[name][channel] = value
    return init


@settings(max_examples=25, deadline=None)
@given(init=corruptions(), n0=st.sampled_from([1.0, 10.0, 1e6]))
def test_prior_on_non_finite_stored_statistics(clean_stats, init, n0):
    model = make_model(CNN_TEXT, init, opset=15, ir=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NumPy RuntimeWarning fails the test
        result = ot.apply_stats(model, clean_stats, prior_strength=n0)
    written = _initializers(result.model)
    n = clean_stats.num_samples
    for key, (mean_name, var_name) in STORAGE.items():
        new = clean_stats.precise(key)
        old_m, old_v = init[mean_name].astype(np.float64), init[var_name].astype(np.float64)
        bad = ~np.isfinite(old_m) | ~np.isfinite(old_v) | (old_v < 0)
        w = n0 / (n0 + n)
        with np.errstate(all="ignore"):
            want_m = np.where(bad, new.mean, w * old_m + (1 - w) * new.mean)
            want_v = np.where(bad, new.var, w * old_v + (1 - w) * new.var)
        for name, want in ((mean_name, want_m), (var_name, want_v)):
            assert np.isfinite(written[name]).all(), name
            np.testing.assert_allclose(written[name], want, rtol=2e-6, atol=1e-6)
        notes = [s for s in result.report.meta["notes"] if f"{key!r}" in s]
        assert len(notes) == (1 if bad.any() else 0)
        if bad.any():
            assert f"in {int(bad.sum())} of {bad.size} channel(s)" in notes[0]


def test_cli_prior_on_a_diverged_model(tmp_path):
    init = cnn_initializers()
    init["m1"][0], init["v2"][1], init["v3"][:] = np.nan, np.inf, np.nan
    model = tmp_path / "diverged.onnx"
    onnx.save(make_model(CNN_TEXT, init, opset=15, ir=8), model)
    np.save(tmp_path / "x.npy", cnn_data(40))
    code, out, err = run_cli("recalibrate", model, "--data", tmp_path / "x.npy", "-o",
                             tmp_path / "o.onnx", "--batch-size", "8", "--prior-strength", "64",
                             "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "RuntimeWarning" not in err and "Traceback" not in err
    assert err.count("take the new statistics alone") == 3
    assert all(np.isfinite(v).all() for v in _initializers(tmp_path / "o.onnx").values())
    report = _strict((tmp_path / "r.json").read_text())
    assert report["non_finite"], "the drift of the diverged channels is undefined: named"
    for pointer in report["non_finite"]:
        assert _resolve(report, pointer) is None


def _poisoned(stats: ot.CollectedStats, key: str) -> ot.CollectedStats:
    state = stats.bns[key].precise.state_dict()
    state["mean"] = state["mean"].copy()
    state["mean"][0] = np.nan
    stats.bns[key].precise = bnref.PreciseBN.from_state_dict(state, stats.estimator,
                                                             stats.bessel)
    return stats


def test_non_finite_statistics_are_never_written(tmp_path, clean_stats):
    model = make_model(CNN_TEXT, cnn_initializers(), opset=15, ir=8)
    good = tmp_path / "good.npz"
    ot.save_stats(clean_stats, good)
    stats = _poisoned(ot.load_stats(good), "b2")
    before = listing(tmp_path)
    with pytest.raises(ot.StatsError, match="not finite"):
        ot.save_stats(stats, tmp_path / "bad.npz")
    assert listing(tmp_path) == before
    with pytest.raises(ot.ModelError, match=r"non-finite value\(s\); nothing written"):
        ot.apply_stats(model, stats)
    # A STATS file edited by hand to hold a NaN: the CLI refuses, writes nothing.
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["bn1/mean"] = arrays["bn1/mean"].copy()
    arrays["bn1/mean"][0] = np.nan
    np.savez(tmp_path / "edited.npz", **arrays)
    onnx.save(model, tmp_path / "m.onnx")
    before = listing(tmp_path)
    code, _, err = run_cli("apply", tmp_path / "m.onnx", tmp_path / "edited.npz", "-o",
                           tmp_path / "o.onnx")
    assert code == 1 and "non-finite" in err and "Traceback" not in err
    assert listing(tmp_path) == before


@pytest.fixture
def warnings_are_errors():
    """A NumPy RuntimeWarning escaping a command fails the test (pytest would hide it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_inspect_and_compare_json_are_strict(tmp_path, warnings_are_errors):
    init = cnn_initializers()
    init["m1"][:] = np.nan  # every output of this model is NaN
    init["v2"][0] = np.inf
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(make_model(CNN_TEXT, init, opset=15, ir=8), bad)
    onnx.save(make_model(CNN_TEXT, cnn_initializers(), opset=15, ir=8), good)
    np.save(tmp_path / "x.npy", cnn_data(8))
    code, out, err = run_cli("inspect", bad, "--json")
    assert code == 0, err
    doc = _strict(out)
    assert set(doc["non_finite"]) == {"/batchnorms/0/stats/mean_abs_mean",
                                      "/batchnorms/1/stats/var_mean",
                                      "/batchnorms/1/stats/var_max"}
    assert all(_resolve(doc, p) is None for p in doc["non_finite"])
    code, out, err = run_cli("compare", good, bad, "--data", tmp_path / "x.npy", "--json")
    assert code == 0, err
    doc = _strict(out)
    assert "/max_abs_diff" in doc["non_finite"] and doc["max_abs_diff"] is None
    assert doc["nonfinite_b"] == 8 * 5
    code, out, _ = run_cli("inspect", good, "--json")
    assert _strict(out)["non_finite"] == []


def test_infinities_of_both_signs_raise_no_warning(tmp_path, warnings_are_errors):
    init = cnn_initializers()
    init["v1"][:2], init["m1"][:2] = [np.inf, -np.inf], [np.inf, -np.inf]
    onnx.save(make_model(CNN_TEXT, init, opset=15, ir=8), tmp_path / "infs.onnx")
    for sign in (1, -1):  # outputs +inf and -inf: their difference is NaN
        out = cnn_initializers()
        out["o3"][:] = sign * np.inf
        onnx.save(make_model(CNN_TEXT, out, opset=15, ir=8), tmp_path / f"out{sign}.onnx")
    np.save(tmp_path / "x.npy", cnn_data(16))
    code, text, err = run_cli("inspect", tmp_path / "infs.onnx")
    assert code == 0, err
    code, text, err = run_cli("compare", tmp_path / "out1.onnx", tmp_path / "out-1.onnx",
                              "--data", tmp_path / "x.npy", "--json")
    assert code == 0, err
    assert _strict(text)["max_abs_diff"] is None
    code, _, err = run_cli("recalibrate", tmp_path / "infs.onnx", "--data", tmp_path / "x.npy",
                           "-o", tmp_path / "o.onnx", "--batch-size", "8", "--report",
                           tmp_path / "r.json")
    assert code == 0, err
    assert all(np.isfinite(v).all() for v in _initializers(tmp_path / "o.onnx").values())
    report = _strict((tmp_path / "r.json").read_text())  # --report: strict JSON too
    assert report["non_finite"] and all(_resolve(report, p) is None for p in report["non_finite"])


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(alphabet="ab/~", max_size=3), inner, max_size=4),
    max_leaves=20,
)


@given(document=st.dictionaries(st.text(alphabet="ab/~", max_size=3), _json_values, max_size=5))
def test_strict_dumps_nulls_and_names_every_non_finite_value(document):
    from onnx_tools.jsonout import strict_dumps

    document.pop("non_finite", None)
    parsed = _strict(strict_dumps(document))
    finite_leaves = []

    def walk(a, b, path):
        if isinstance(a, dict):
            for k in a:
                walk(a[k], b[k], f"{path}/{k.replace('~', '~0').replace('/', '~1')}")
        elif isinstance(a, list):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}/{i}")
        elif isinstance(a, float) and not np.isfinite(a):
            assert b is None
            finite_leaves.append(path)
        else:
            assert a == b

    walk(document, {k: v for k, v in parsed.items() if k != "non_finite"}, "")
    assert sorted(parsed["non_finite"]) == sorted(finite_leaves)
    assert all(_resolve(parsed, p) is None for p in parsed["non_finite"])
