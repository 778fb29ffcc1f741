"""``unfold``: identity at inference, exact by depth, equivalent to the BN-kept twin.

The twin is built here without torch: a BN-kept model K (three Conv-BN layers, the third in
a residual Add, then a squeeze-and-excitation gate and a Gemm head), recalibrated on source
data A (K_A), folded in NumPy (W' = W * g / sqrt(v + eps), b' = (b - mu) * g / sqrt(v + eps)
+ beta) into F. Independent expectations:

* closed form: the output of a folded Conv is z = a * x + c with a = g / sqrt(v + eps) and
  c = beta - a * mu, so with K_A's population statistics of x on A, z's are mean beta and
  variance g^2 v / (v + eps): what unfold must insert at every depth (a one-pass estimate
  leaves depth >= 2 off);
* equivalence: recalibrating the unfolded model on target data B gives the outputs that
  recalibrating K_A on B gives (eps tiny, so eps' = a^2 eps does not matter).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_tools as ot
from onnx_tools.errors import ModelError, OptionError, OutputError
from tests.onnx_tools.helpers import file_digest, make_model, run_cli

ort = pytest.importorskip("onnxruntime")

EPS = 1e-9  # the twin's BN epsilon: a^2 * eps is negligible, so eps' = EPS is exact enough

KEPT = """
<ir_version: 8, opset_import: ["" : 15]>
kept (float[N,3,8,8] x) => (float[N,4] y) {{
  c1 = Conv<pads=[1,1,1,1]>(x, w1)
  b1 = BatchNormalization<epsilon={eps}>(c1, g1, be1, m1, v1)
  r1 = Relu(b1)
  c2 = Conv<pads=[1,1,1,1]>(r1, w2)
  b2 = BatchNormalization<epsilon={eps}>(c2, g2, be2, m2, v2)
  r2 = Relu(b2)
  c3 = Conv(r2, w3)
  b3 = BatchNormalization<epsilon={eps}>(c3, g3, be3, m3, v3)
  a3 = Add(b3, r2)
  r3 = Relu(a3)
  p = GlobalAveragePool(r3)
  e1 = Conv(p, we1, eb1)
  e2 = Relu(e1)
  e3 = Conv(e2, we2, eb2)
  e4 = Sigmoid(e3)
  s = Mul(r3, e4)
  q = GlobalAveragePool(s)
  f = Flatten(q)
  y = Gemm(f, wf, bf)
}}
"""
LAYERS = (("c1", "w1", "1"), ("c2", "w2", "2"), ("c3", "w3", "3"))


def kept_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    f = np.float32
    init = {"w1": rng.normal(size=(6, 3, 3, 3)), "w2": rng.normal(size=(6, 6, 3, 3)) * 0.3,
            "w3": rng.normal(size=(6, 6, 1, 1)) * 0.5, "we1": rng.normal(size=(2, 6, 1, 1)),
            "eb1": rng.normal(size=2), "we2": rng.normal(size=(6, 2, 1, 1)),
            "eb2": rng.normal(size=6), "wf": rng.normal(size=(6, 4)), "bf": rng.normal(size=4)}
    for k in "123":
        init |= {f"g{k}": rng.uniform(0.5, 2, 6), f"be{k}": rng.normal(size=6),
                 f"m{k}": np.zeros(6), f"v{k}": np.ones(6)}  # stale: recalibrated below
    return make_model(KEPT, {k: np.asarray(v, f) for k, v in init.items()}, eps=EPS)


FOLDED = """
<ir_version: 8, opset_import: ["" : 15]>
folded (float[N,3,8,8] x) => (float[N,4] y) {
  c1 = Conv<pads=[1,1,1,1]>(x, w1, bias1)
  r1 = Relu(c1)
  c2 = Conv<pads=[1,1,1,1]>(r1, w2, bias2)
  r2 = Relu(c2)
  c3 = Conv(r2, w3, bias3)
  a3 = Add(c3, r2)
  r3 = Relu(a3)
  p = GlobalAveragePool(r3)
  e1 = Conv(p, we1, eb1)
  e2 = Relu(e1)
  e3 = Conv(e2, we2, eb2)
  e4 = Sigmoid(e3)
  s = Mul(r3, e4)
  q = GlobalAveragePool(s)
  f = Flatten(q)
  y = Gemm(f, wf, bf)
}
"""


def fold(kept: onnx.ModelProto) -> onnx.ModelProto:
    """Fold each Conv-BN of ``kept`` in NumPy, as exporters do (W', b')."""
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in kept.graph.initializer}
    out = {n: init[n] for n in ("we1", "eb1", "we2", "eb2", "wf", "bf")}
    for _conv, w, k in LAYERS:
        a = init[f"g{k}"] / np.sqrt(init[f"v{k}"] + EPS)
        out[w] = init[w] * a[:, None, None, None]
        out[f"bias{k}"] = init[f"be{k}"] - a * init[f"m{k}"]
    return make_model(FOLDED, {n: v.astype(np.float32) for n, v in out.items()})


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("twin")
    rng = np.random.default_rng(5)
    a = (rng.normal(size=(96, 3, 8, 8)) * rng.uniform(0.5, 1.5, (96, 1, 1, 1))).astype(np.float32)
    b = (a[rng.permutation(96)] * 0.4 + 0.7).astype(np.float32)  # contrast + brightness shift
    ka = ot.recalibrate(kept_model(), a, batch_size=16).model
    folded = fold(ka)
    onnx.save(folded, folder / "folded.onnx")
    np.save(folder / "a.npy", a)
    np.save(folder / "b.npy", b)
    return folder, ka, folded, a, b


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_sites_and_depths(twin):
    _, _, folded, a, _ = twin
    result = ot.unfold(folded, a, batch_size=16, bn_eps=EPS)
    assert [s.output for s in result.sites] == ["c1", "c2", "c3"]  # not the gate, not the head
    assert {bn.key: bn.depth for bn in result.inserted} == {"c1": 1, "c2": 2, "c3": 3}
    assert result.depth == 3


def test_identity_at_inference(twin):
    _, _, folded, a, b = twin
    unfolded = ot.unfold(folded, a, batch_size=16).model
    for x in (a[:20], b[:20], np.random.default_rng(9).normal(size=(7, 3, 8, 8)).astype(np.float32) * 30):
        ref = _run(folded, x)
        np.testing.assert_allclose(_run(unfolded, x), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_statistics_match_the_closed_form_at_every_depth(twin):
    """Inserted mean = beta, var = g^2 v / (v + eps) of K_A, at depth 1, 2 and 3."""
    _, ka, folded, a, _ = twin
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in ka.graph.initializer}
    result = ot.unfold(folded, a, batch_size=16, bn_eps=EPS)
    for conv, _w, k in LAYERS:
        mean, var = result.statistics[conv]
        g, v = init[f"g{k}"], init[f"v{k}"]
        np.testing.assert_allclose(mean, init[f"be{k}"], rtol=0, atol=2e-5 * np.sqrt(g**2).max())
        np.testing.assert_allclose(var, g**2 * v / (v + EPS), rtol=5e-5)


def test_recalibrating_the_unfolded_model_equals_recalibrating_the_kept_twin(twin):
    _, ka, folded, a, b = twin
    unfolded = ot.unfold(folded, a, batch_size=16, bn_eps=EPS).model
    adapted_u = ot.recalibrate(unfolded, b, batch_size=16).model
    adapted_k = ot.recalibrate(ka, b, batch_size=16).model
    ref, got = _run(adapted_k, b), _run(adapted_u, b)
    unadapted = _run(folded, b)
    scale = np.sqrt((ref**2).mean())
    assert np.abs(unadapted - ref).max() > 0.05 * scale  # adaptation changes the outputs
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)
    # and in one call: recalibrate(FOLDED, B, source=A)
    once = ot.recalibrate(folded, b, source=a, batch_size=16, bn_eps=EPS).model
    np.testing.assert_allclose(_run(once, b), ref, rtol=0, atol=1e-4 * scale)


def test_nothing_else_changes(twin):
    """The contract: one BN per site, four new tensors each, metadata; all else as it was."""
    _, _, folded, a, _ = twin
    unfolded = ot.unfold(folded, a, batch_size=16).model
    before = {t.name: t for t in folded.graph.initializer}
    after = {t.name: t for t in unfolded.graph.initializer}
    assert all(after[n] == t for n, t in before.items())
    assert len(after) == len(before) + 4 * 3
    kinds = [n.op_type for n in unfolded.graph.node]
    assert kinds.count("BatchNormalization") == 3
    old = [(n.op_type, list(n.input), n.name) for n in folded.graph.node]
    new = [(n.op_type, list(n.input), n.name) for n in unfolded.graph.node if n.op_type != "BatchNormalization"]
    assert [o[::2] for o in old] == [n[::2] for n in new]
    assert unfolded.graph.output == folded.graph.output and unfolded.graph.input == folded.graph.input
    props = {p.key: p.value for p in unfolded.metadata_props}
    assert props["bnref.unfold.sites"] == "3" and props["bnref.unfold.depth"] == "3"
    assert props["bnref.unfold.bn_eps"] == repr(1e-5)


def test_inserted_bns_fuse_at_inference(twin, tmp_path):
    """onnxruntime folds each inserted BN into its Conv: the optimized graph has no BN."""
    _, _, folded, a, _ = twin
    unfolded = ot.unfold(folded, a, batch_size=16).model
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(unfolded.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "opt.onnx")
    assert not [n for n in optimized.graph.node if n.op_type == "BatchNormalization"]


def test_sites_override(twin):
    _, _, folded, a, _ = twin
    sites = ot.find_sites(folded, sites_exclude="^c2$")
    assert [s.output for s in sites] == ["c1", "c3"]
    sites = ot.find_sites(folded, sites_exclude=".", sites_include="^e3$")
    assert [s.output for s in sites] == ["e3"]
    assert [s.output for s in ot.find_sites(folded, linear_sites=True)] == ["c1", "c2", "c3"]  # head
    with pytest.raises(OptionError, match="sites_include"):
        ot.find_sites(folded, sites_include="(")


def test_errors(twin, tmp_path):
    folder, ka, folded, a, _ = twin
    with pytest.raises(OptionError, match="bn_eps"):
        ot.unfold(folded, a, bn_eps=0)
    with pytest.raises(OptionError, match="read only once"):
        ot.unfold(folded, iter([{"x": a[:16]}]), waves=False)
    with pytest.raises(OptionError, match="shard"):
        ot.unfold(folded, a, shard=(0, 2))
    with pytest.raises(ModelError, match="no folded layer"):
        ot.unfold(ka, a)  # BN kept: nothing to unfold
    with pytest.raises(OptionError, match="source"):
        ot.recalibrate(folded, a, bn_eps=1e-3)
    with pytest.raises(OutputError):
        ot.unfold(str(folder / "folded.onnx"), str(folder / "a.npy"), output=str(folder / "a.npy"))


def test_cli(twin, tmp_path):
    folder, _, _, _, _ = twin
    model = str(folder / "folded.onnx")
    digest = file_digest(model)
    rc, out, err = run_cli("inspect", model)
    assert rc == 0 and "3 layer(s) without BN" in out and "bnref-onnx unfold" in out
    rc, out, err = run_cli("unfold", model, "--data", str(folder / "a.npy"), "-o",
                           str(tmp_path / "u.onnx"), "--batch-size", "16")
    assert rc == 0, err
    assert "inserted 3 BatchNormalization(s)" in out
    assert len(ot.inspect_model(str(tmp_path / "u.onnx"))) == 3
    rc, out, err = run_cli("recalibrate", model, "--data", str(folder / "b.npy"), "--source",
                           str(folder / "a.npy"), "-o", str(tmp_path / "r.onnx"), "--batch-size", "16")
    assert rc == 0, err
    rc, _, err = run_cli("recalibrate", model, "--data", str(folder / "b.npy"), "--bn-eps", "1e-3",
                         "-o", str(tmp_path / "x.onnx"))
    assert rc == 1 and "--source" in err
    rc, _, err = run_cli("unfold", model, "--data", str(folder / "a.npy"), "-o", str(folder / "a.npy"))
    assert rc == 1 and "data" in err
    rc, _, err = run_cli("recalibrate", model, "--data", str(folder / "b.npy"), "--source",
                         str(folder / "a.npy"), "-o", str(folder / "a.npy"))
    assert rc == 1 and "source data" in err
    assert file_digest(model) == digest


def test_waves_read_a_one_shot_reader_once(twin):
    """The waves read the source once: a generator of feeds works, and gives the same result."""
    _, _, folded, a, _ = twin
    from_array = ot.unfold(folded, a, batch_size=16)
    from_generator = ot.unfold(folded, ({"x": a[i:i + 16]} for i in range(0, len(a), 16)), batch_size=16)
    for key, (mean, var) in from_array.statistics.items():
        np.testing.assert_allclose(from_generator.statistics[key][0], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(from_generator.statistics[key][1], var, rtol=1e-6)


def test_waves_equal_passes_and_leave_nothing_behind(twin, tmp_path):
    """The cached waves (default) and D passes from the inputs give the same statistics."""
    _, _, folded, a, _ = twin
    waves = ot.unfold(folded, a, batch_size=16, bn_eps=EPS, cache_dir=tmp_path)
    passes = ot.unfold(folded, a, batch_size=16, bn_eps=EPS, waves=False)
    assert waves.depth == passes.depth == 3
    for key, (mean, var) in passes.statistics.items():
        np.testing.assert_allclose(waves.statistics[key][0], mean, rtol=1e-6, atol=1e-6 * np.sqrt(var.max()))
        np.testing.assert_allclose(waves.statistics[key][1], var, rtol=1e-6)
    assert waves.cache_peak_bytes > 0 and passes.cache_peak_bytes == 0
    assert list(tmp_path.iterdir()) == []  # the activation cache is removed
    assert waves.source_fingerprint == passes.source_fingerprint


def test_cache_removed_when_a_wave_fails(twin, tmp_path, monkeypatch):
    _, _, folded, a, _ = twin
    import onnx_tools.unfolding.wave_run as wave_run

    real = wave_run.run_batch
    calls = []

    def failing(session, names, feed, index):
        calls.append(index)
        if len(calls) == 9:  # in the second wave, with the first wave's activations cached here
            cache = [p for p in tmp_path.iterdir() if p.name.startswith("bnref-unfold-")]
            assert len(cache) == 1 and any(cache[0].iterdir())
            raise KeyboardInterrupt
        return real(session, names, feed, index)

    monkeypatch.setattr(wave_run, "run_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        ot.unfold(folded, a, batch_size=16, cache_dir=tmp_path)
    assert len(calls) == 9
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_across_the_waves(twin, capsys):
    _, _, folded, a, _ = twin
    ot.unfold(folded, a, batch_size=16, progress=True)
    assert "unfold" in capsys.readouterr().err  # tqdm's bar: 6 batches x 3 waves


@pytest.mark.parametrize("command", ["collect", "recalibrate"])
def test_every_command_on_a_folded_model_points_at_unfold(twin, tmp_path, command):
    folder = twin[0]
    rc, _, err = run_cli(command, str(folder / "folded.onnx"), "--data", str(folder / "a.npy"),
                         "-o", str(tmp_path / "out.npz"))
    assert rc == 1 and "bnref-onnx unfold" in err and "Traceback" not in err
