"""Core path: recalibrate/collect/merge/apply/inspect/compare against an independent reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnref
import onnx_tools as ot
from onnx_tools.fingerprint import model_fingerprint
from tests.onnx_tools.helpers import (
    assert_stats_close,
    cnn_data,
    cnn_model,
    file_digest,
    reference_collect,
    run_cli,
    stored_stats,
)

KEYS = ["b1", "b2", "y"]


@pytest.mark.parametrize("estimator", ["population", "mean_of_variances"])
def test_recalibrate_matches_reference(tmp_path, cnn_files, estimator):
    model_path, data_path = cnn_files
    out = tmp_path / "fixed.onnx"
    before = file_digest(model_path)
    code, stdout, stderr = run_cli("recalibrate", model_path, "--data", data_path, "-o", out,
                                   "--batch-size", "16", "--estimator", estimator,
                                   "--provider", "cpu")
    assert code == 0, stderr
    assert file_digest(model_path) == before
    ref = reference_collect(cnn_model(), cnn_data(), 16)
    x = cnn_data()[:2]
    assert_stats_close(str(out), ref, {"x": x}, estimator=estimator)
    # The estimators really differ here (correlated pixels), so the test can tell them apart.
    p = ref["b2"]
    assert not np.allclose(p.with_estimator("population").var,
                           p.with_estimator("mean_of_variances").var, rtol=1e-3)
    assert "shift max" in stdout and "wrote" in stdout
    assert "dropped" in stderr  # 40 samples, batch 16: 8 dropped and reported


def test_recalibrated_model_is_otherwise_unchanged(tmp_path, cnn_files):
    model_path, data_path = cnn_files
    out = tmp_path / "fixed.onnx"
    assert run_cli("recalibrate", model_path, "--data", data_path, "-o", out, "--quiet",
                   "--batch-size", "16")[0] == 0
    a, b = onnx.load(model_path), onnx.load(out)
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == [
        (n.name, n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output
    assert a.opset_import == b.opset_import and a.ir_version == b.ir_version
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    assert set(ia) == set(ib)
    changed = {k for k in ia if ia[k] != ib[k]}
    assert changed == {"m1", "v1", "m2", "v2", "m3", "v3"}
    for k in changed:
        assert ia[k].data_type == ib[k].data_type and ia[k].dims == ib[k].dims
    meta = {p.key: p.value for p in b.metadata_props}
    assert meta["bnref.estimator"] == "population"
    assert meta["bnref.num_samples"] == "32" and meta["bnref.batch_size"] == "16"
    assert meta["bnref.version"] == bnref.__version__
    assert len(meta["bnref.data_fingerprint"]) == 64
    # Only the running statistics changed: the fingerprint without them is the same.
    assert model_fingerprint(a, skip=changed) == model_fingerprint(b, skip=changed)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_bessel_and_prior_strength(tmp_path, cnn_files):
    model_path, data_path = cnn_files
    ref = reference_collect(cnn_model(), cnn_data(), 8)
    x = {"x": cnn_data()[:2]}
    out = tmp_path / "bessel.onnx"
    assert run_cli("recalibrate", model_path, "--data", data_path, "-o", out, "--quiet",
                   "--batch-size", "8", "--bessel")[0] == 0
    assert_stats_close(str(out), ref, x, bessel=True)
    out2 = tmp_path / "prior.onnx"
    assert run_cli("recalibrate", model_path, "--data", data_path, "-o", out2, "--quiet",
                   "--batch-size", "8", "--prior-strength", "40")[0] == 0
    old = stored_stats(cnn_model(), x)
    new = stored_stats(str(out2), x)
    for key, p in ref.items():
        w = 40 / (40 + 40)  # 40 samples, N0 = 40
        np.testing.assert_allclose(new[key][0], w * old[key][0] + (1 - w) * p.mean,
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new[key][1], w * old[key][1] + (1 - w) * p.var, rtol=1e-4)


def test_python_api_does_not_mutate_input():
    model = cnn_model()
    snapshot = model.SerializeToString()
    result = ot.recalibrate(model, cnn_data(), batch_size=20, provider="cpu")
    assert model.SerializeToString() == snapshot
    assert isinstance(result.model, onnx.ModelProto)
    assert [r.key for r in result.report.rows] == KEYS
    ref = reference_collect(cnn_model(), cnn_data(), 20)
    assert_stats_close(result.model, ref, {"x": cnn_data()[:2]})


def test_shards_merge_equals_unsharded(tmp_path, cnn_files):
    model_path, _ = cnn_files
    data = tmp_path / "big.npy"
    np.save(data, cnn_data(n=70, seed=5))
    full = tmp_path / "full.npz"
    assert run_cli("collect", model_path, "--data", data, "-o", full, "--batch-size", "8",
                   "--quiet")[0] == 0
    shards = []
    for i in range(3):
        s = tmp_path / f"s{i}.npz"
        assert run_cli("collect", model_path, "--data", data, "-o", s, "--batch-size", "8",
                       "--shard", f"{i}/3", "--quiet")[0] == 0
        shards.append(s)
    whole = ot.load_stats(full)
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        merged = tmp_path / f"m{''.join(map(str, order))}.npz"
        code, _, err = run_cli("merge", *[shards[i] for i in order], "-o", merged)
        assert code == 0, err
        results.append(ot.load_stats(merged))
    for m in results:
        assert m.num_samples == whole.num_samples == 64 and m.num_batches == 8
        assert m.data_fingerprint == whole.data_fingerprint and m.complete
        for key in KEYS:
            a, b = m.bns[key].precise, whole.bns[key].precise
            for est in ("population", "mean_of_variances"):
                np.testing.assert_allclose(a.with_estimator(est).mean, b.with_estimator(est).mean,
                                           rtol=1e-15, atol=1e-15)
                np.testing.assert_allclose(a.with_estimator(est).var, b.with_estimator(est).var,
                                           rtol=1e-14)
        # Any merge order gives identical bits.
        for key in KEYS:
            assert np.array_equal(m.bns[key].precise.var, results[0].bns[key].precise.var)
    # apply of merged == recalibrate
    out_a, out_b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run_cli("apply", model_path, tmp_path / "m012.npz", "-o", out_a, "--quiet")[0] == 0
    assert run_cli("recalibrate", model_path, "--data", data, "-o", out_b, "--batch-size", "8",
                   "--quiet")[0] == 0
    sa, sb = stored_stats(str(out_a), {"x": cnn_data()[:2]}), stored_stats(str(out_b),
                                                                           {"x": cnn_data()[:2]})
    for key in KEYS:
        np.testing.assert_allclose(sa[key][1], sb[key][1], rtol=1e-6)


def test_merge_refuses_bad_combinations(tmp_path, cnn_files):
    model_path, data_path = cnn_files
    s0, s1 = tmp_path / "s0.npz", tmp_path / "s1.npz"
    assert run_cli("collect", model_path, "--data", data_path, "-o", s0, "--batch-size", "4",
                   "--shard", "0/2", "--quiet")[0] == 0
    assert run_cli("collect", model_path, "--data", data_path, "-o", s1, "--batch-size", "8",
                   "--shard", "1/2", "--quiet")[0] == 0
    code, _, err = run_cli("merge", s0, s1, "-o", tmp_path / "m.npz")
    assert code == 1 and "batch size" in err and not (tmp_path / "m.npz").exists()
    code, _, err = run_cli("merge", s0, s0, "-o", tmp_path / "m.npz")
    assert code == 1 and "twice" in err
    # an incomplete shard set cannot be applied
    code, _, err = run_cli("apply", model_path, s0, "-o", tmp_path / "x.onnx")
    assert code == 1 and "merge all shards" in err and not (tmp_path / "x.onnx").exists()


def test_apply_refuses_stats_of_another_model(tmp_path, cnn_files):
    model_path, data_path = cnn_files
    stats = tmp_path / "s.npz"
    assert run_cli("collect", model_path, "--data", data_path, "-o", stats, "--quiet",
                   "--batch-size", "8")[0] == 0
    other = cnn_model()
    other.graph.node[0].name = "renamed"
    other_path = tmp_path / "other.onnx"
    onnx.save(other, other_path)
    code, _, err = run_cli("apply", other_path, stats, "-o", tmp_path / "o.onnx")
    assert code == 1 and "another model" in err and not (tmp_path / "o.onnx").exists()
    # Another checkpoint of the same graph: its weights shape every BN input, so the
    # statistics are not its statistics (this was accepted once: a silent wrong answer).
    checkpoint = cnn_model(seed=3)
    checkpoint_path = tmp_path / "checkpoint.onnx"
    onnx.save(checkpoint, checkpoint_path)
    code, _, err = run_cli("apply", checkpoint_path, stats, "-o", tmp_path / "c.onnx")
    assert code == 1 and "another model" in err and not (tmp_path / "c.onnx").exists()
    # One weight nudged by one ulp is another model too.
    nudged = cnn_model()
    w = numpy_helper.to_array(nudged.graph.initializer[0]).copy()
    w.flat[0] = np.nextafter(w.flat[0], np.float32(np.inf))
    nudged.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, nudged.graph.initializer[0].name))
    onnx.save(nudged, tmp_path / "nudged.onnx")
    assert run_cli("apply", tmp_path / "nudged.onnx", stats, "-o", tmp_path / "n.onnx")[0] == 1
    # An export of the same weights with another static input size is another model.
    resized = cnn_model()
    resized.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8
    onnx.save(resized, tmp_path / "resized.onnx")
    code, _, err = run_cli("apply", tmp_path / "resized.onnx", stats, "-o", tmp_path / "r.onnx")
    assert code == 1 and "another model" in err
    # The same model with other running statistics (e.g. recalibrated once) is the same model.
    restat = cnn_model()
    for t in restat.graph.initializer:
        if t.name in ("m1", "v1", "m2", "v2", "m3", "v3"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 0.5, t.name))
    onnx.save(restat, tmp_path / "restat.onnx")
    assert run_cli("apply", tmp_path / "restat.onnx", stats, "-o", tmp_path / "ok.onnx",
                   "--quiet")[0] == 0


def test_fingerprint_ignores_storage_only():
    """Equal values stored as raw_data or typed fields hash alike; any value change shows."""
    a = cnn_model()
    b = cnn_model()
    t = b.graph.initializer[0]
    arr = numpy_helper.to_array(t)
    t.ClearField("raw_data")
    t.float_data.extend(arr.ravel().tolist())
    assert not t.HasField("raw_data") and model_fingerprint(a) == model_fingerprint(b)
    c = cnn_model()
    c.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(c.graph.initializer[1]) * 2, c.graph.initializer[1].name))
    assert model_fingerprint(a) != model_fingerprint(c)


def test_collect_estimator_choice_is_applied(tmp_path, cnn_files):
    model_path, data_path = cnn_files
    stats = tmp_path / "s.npz"
    assert run_cli("collect", model_path, "--data", data_path, "-o", stats, "--quiet",
                   "--estimator", "mean_of_variances", "--batch-size", "10")[0] == 0
    report = tmp_path / "r.json"
    out = tmp_path / "o.onnx"
    code, stdout, _ = run_cli("apply", model_path, stats, "-o", out, "--report", report)
    assert code == 0
    ref = reference_collect(cnn_model(), cnn_data(), 10)
    assert_stats_close(str(out), ref, {"x": cnn_data()[:2]}, estimator="mean_of_variances")
    rep = json.loads(report.read_text())
    assert rep["meta"]["estimator"] == "mean_of_variances"
    assert [r["key"] for r in rep["batchnorms"]] == KEYS
    assert all(r["var_ratio_min"] > 0 for r in rep["batchnorms"])


def test_include_exclude(tmp_path, cnn_files):
    model_path, data_path = cnn_files
    out = tmp_path / "o.onnx"
    assert run_cli("recalibrate", model_path, "--data", data_path, "-o", out, "--quiet",
                   "--exclude", "^y$", "--batch-size", "8")[0] == 0
    x = {"x": cnn_data()[:2]}
    old, new = stored_stats(cnn_model(), x), stored_stats(str(out), x)
    np.testing.assert_array_equal(old["y"][1], new["y"][1])
    assert not np.array_equal(old["b1"][1], new["b1"][1])
    # Excluded BN stays in inference mode while the others are collected:
    ref = reference_collect(cnn_model(), cnn_data(), 8, keys=["b1", "b2"])
    assert_stats_close(str(out), ref, x)
    code, _, err = run_cli("recalibrate", model_path, "--data", data_path, "-o", out,
                           "--include", "nothing-matches")
    assert code == 1 and "select none" in err
    code, _, err = run_cli("recalibrate", model_path, "--data", data_path, "-o", out,
                           "--include", "(")
    assert code == 1 and "regular expression" in err


def test_inspect(tmp_path, cnn_files):
    model_path, _ = cnn_files
    code, out, _ = run_cli("inspect", model_path, "--json")
    assert code == 0
    info = json.loads(out)
    bns = info["batchnorms"]
    assert [b["output"] for b in bns] == KEYS
    assert [b["channels"] for b in bns] == [4, 6, 5]
    assert bns[0]["epsilon"] == pytest.approx(1e-3) and bns[1]["momentum"] == pytest.approx(0.9)
    assert bns[1]["storage"]["var"]["kind"] == "initializer"
    assert bns[1]["stats"]["var_mean"] == pytest.approx(2.0)
    code, out, _ = run_cli("inspect", model_path)
    assert code == 0 and "channels 6" in out and "3 BatchNormalization" in out


def test_inspect_no_bn_gives_export_advice(tmp_path):
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[N,3] x) => (float[N,3] y) { y = Relu(x) }""")
    p = tmp_path / "folded.onnx"
    onnx.save(m, p)
    code, out, _ = run_cli("inspect", p)
    assert code == 0 and "folded" in out and "TrainingMode.PRESERVE" in out
    assert "skip-fuse-bn" in out and "optimize=False" in out


def test_compare(tmp_path, cnn_files):
    model_path, data_path = cnn_files
    out = tmp_path / "o.onnx"
    assert run_cli("recalibrate", model_path, "--data", data_path, "-o", out, "--quiet",
                   "--batch-size", "16")[0] == 0
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(40) % 5)
    code, stdout, err = run_cli("compare", model_path, out, "--data", data_path, "--labels",
                                labels, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["num_samples"] == 40 and res["max_abs_diff"] > 0
    assert 0 <= res["top1_agreement"] <= 1 and res["accuracy_a"] is not None
    code, stdout, _ = run_cli("compare", model_path, model_path, "--data", data_path)
    assert code == 0 and "top-1 agreement: 100.00%" in stdout and "max |A - B|: 0" in stdout
    # independent check of accuracy: ReferenceEvaluator on the same inputs
    from onnx.reference import ReferenceEvaluator

    ya = ReferenceEvaluator(onnx.load(model_path)).run(None, {"x": cnn_data()})[0]
    assert res["accuracy_a"] == pytest.approx(np.mean(ya.argmax(1) == np.arange(40) % 5))


def test_compare_never_reports_nan_outputs_as_a_match(tmp_path, cnn_files):
    # Found in review: max(0.0, nan) kept 0.0, so a model emitting NaN compared as identical.
    model_path, data_path = cnn_files
    broken = onnx.load(model_path)
    out_name = broken.graph.output[0].name
    broken.graph.node.append(onnx.helper.make_node("Sqrt", [out_name], ["sqrt_out"], name="sqrt"))
    broken.graph.output[0].name = "sqrt_out"
    broken_path = tmp_path / "broken.onnx"
    onnx.save(broken, broken_path)
    res = ot.compare_models(model_path, broken_path, data_path, provider="cpu")
    assert np.isnan(res.max_abs_diff)
    assert res.nonfinite_a == 0 and res.nonfinite_b > 0
    assert "model B produced" in res.format()


def test_version_and_module_entry():
    import subprocess
    import sys

    code, out, _ = run_cli("--version")
    assert code == 0 and bnref.__version__ in out and "onnxruntime" in out
    from tests.onnx_tools.helpers import ROOT

    proc = subprocess.run([sys.executable, "-m", "onnx_tools", "--version"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "bnref-onnx" in proc.stdout


def test_stats_file_round_trip(tmp_path, cnn_files):
    model_path, data_path = cnn_files
    stats = ot.collect(str(model_path), str(data_path), batch_size=10, provider="cpu")
    ot.save_stats(stats, tmp_path / "s.npz")
    back = ot.load_stats(tmp_path / "s.npz")
    assert back.meta() == stats.meta()
    for key in KEYS:
        for k, v in stats.bns[key].precise.state_dict().items():
            assert np.array_equal(back.bns[key].precise.state_dict()[k], v)
