"""Shared helpers for the bnref-onnx tests.

The expected statistics never come from the tool's own code path: :func:`reference_collect`
runs the model with ``onnx.reference.ReferenceEvaluator`` with every BN switched to ONNX's
training mode (``training_mode=1``, opset >= 14), reads each BN input tensor, and aggregates
it in float64 with ``bnref``; :func:`stored_stats` reads the mean/var a model holds by
evaluating the tensors the BN node reads (so Constant/Identity/initializer all work alike).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import bnref

ROOT = Path(__file__).resolve().parents[2]

CNN_TEXT = """
<ir_version: {ir}, opset_import: ["" : {opset}]>
cnn (float[N,3,6,6] x) => (float[N,5] y) {{
  c1 = Conv<pads=[1,1,1,1]>(x, w1)
  b1 = BatchNormalization<epsilon=0.001>(c1, s1, o1, m1, v1)
  r1 = Relu(b1)
  c2 = Conv<pads=[1,1,1,1]>(r1, w2)
  b2 = BatchNormalization(c2, s2, o2, m2, v2)
  r2 = Relu(b2)
  p = GlobalAveragePool(r2)
  f = Flatten(p)
  g = Gemm(f, w3, gb)
  y = BatchNormalization(g, s3, o3, m3, v3)
}}
"""


def cnn_initializers(seed: int = 0, c1: int = 4, c2: int = 6) -> dict[str, np.ndarray]:
    """Weights for CNN_TEXT; stored statistics deliberately stale (zeros/ones)."""
    rng = np.random.default_rng(seed)
    f = np.float32
    return {
        "w1": rng.normal(size=(c1, 3, 3, 3)).astype(f),
        "s1": rng.uniform(0.5, 2, c1).astype(f), "o1": rng.normal(size=c1).astype(f),
        "m1": np.zeros(c1, f), "v1": np.ones(c1, f),
        "w2": (rng.normal(size=(c2, c1, 3, 3)) * 0.3).astype(f),
        "s2": rng.uniform(0.5, 2, c2).astype(f), "o2": rng.normal(size=c2).astype(f),
        "m2": np.full(c2, 0.1, f), "v2": np.full(c2, 2.0, f),
        "w3": rng.normal(size=(c2, 5)).astype(f), "gb": np.zeros(5, f),
        "s3": rng.uniform(0.5, 2, 5).astype(f), "o3": rng.normal(size=5).astype(f),
        "m3": np.zeros(5, f), "v3": np.ones(5, f),
    }


def make_model(text: str, initializers: dict[str, np.ndarray], **fmt) -> onnx.ModelProto:
    """Parse ONNX text (formatted with ``fmt``) and attach initializers."""
    model = onnx.parser.parse_model(text.format(**fmt) if fmt else text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    return model


def cnn_model(opset: int = 15, ir: int = 8, seed: int = 0) -> onnx.ModelProto:
    model = make_model(CNN_TEXT, cnn_initializers(seed), opset=opset, ir=ir)
    onnx.checker.check_model(model)
    return model


def cnn_data(n: int = 40, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3, 6, 6)) * 1.5 + 0.5).astype(np.float32)


def _modern_opset(m: onnx.ModelProto) -> None:
    """Raise opset < 15 to 15 (same BN semantics; the reference BN-6/7 kernels are broken)."""
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < 15:
            imp.version = 15
            m.ir_version = max(m.ir_version, 8)
    for node in m.graph.node:
        for a in list(node.attribute):
            if node.op_type == "BatchNormalization" and a.name in ("is_test", "spatial"):
                node.attribute.remove(a)


def _training_copy(model: onnx.ModelProto, keys: list[str] | None) -> tuple[onnx.ModelProto, dict]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _modern_opset(m)
    taps = {}
    del m.graph.output[:]
    for node in m.graph.node:
        if node.op_type != "BatchNormalization" or (keys and node.output[0] not in keys):
            continue
        node.attribute.extend([helper.make_attribute("training_mode", 1)])
        for a in list(node.attribute):
            if a.name in ("momentum", "is_test", "spatial"):
                node.attribute.remove(a)
        node.attribute.extend([helper.make_attribute("momentum", 0.0)])
        del node.output[1:]
        node.output.extend([node.output[0] + "__rm", node.output[0] + "__rv"])
        taps[node.output[0]] = node.input[0]
        m.graph.output.append(helper.make_tensor_value_info(node.input[0], 0, None))
    return m, taps


def reference_collect(
    model: onnx.ModelProto, x, batch_size: int, keys: list[str] | None = None,
    input_name: str = "x",
) -> dict[str, bnref.PreciseBN]:
    """PreciseBN per BN (by output name) from ReferenceEvaluator's training-mode forward."""
    m, taps = _training_copy(model, keys)
    ev = ReferenceEvaluator(m)
    out = {k: bnref.PreciseBN() for k in taps}
    n = (len(x) // batch_size) * batch_size
    for start in range(0, n, batch_size):
        feed = {input_name: x[start:start + batch_size]}
        values = ev.run([taps[k] for k in taps], feed)
        for k, v in zip(taps, values, strict=True):
            out[k].update(bnref.Moments.from_array(np.asarray(v, np.float64), axis=1))
    return out


def stored_stats(model: onnx.ModelProto | str, feed: dict) -> dict[str, tuple[np.ndarray, ...]]:
    """(mean, var, scale, bias) each BN reads, evaluated by ReferenceEvaluator."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _modern_opset(m)
    del m.graph.output[:]
    names = {}
    for node in m.graph.node:
        if node.op_type == "BatchNormalization":
            names[node.output[0]] = [node.input[3], node.input[4], node.input[1], node.input[2]]
            for n in names[node.output[0]]:
                m.graph.output.append(helper.make_tensor_value_info(n, 0, None))
    flat = [n for v in names.values() for n in v]
    values = dict(zip(flat, ReferenceEvaluator(m).run(flat, feed), strict=True))
    return {k: tuple(values[n] for n in v) for k, v in names.items()}


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: str | os.PathLike) -> list[str]:
    """Every path below ``folder`` (recursive): a leftover temporary file anywhere shows up."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_clean_failure(rc, err, code, needle, folder, before, model=None, digest=None) -> None:
    """The promises on any failure: exit ``code``, exactly one error (or interrupt) line
    containing ``needle``, no traceback, nothing left in ``folder``, the input model unchanged."""
    assert rc == code, err
    lines = [ln for ln in err.splitlines() if ln.startswith(("bnref-onnx: error", "bnref-onnx: interrupted"))]
    assert len(lines) == 1, err
    assert needle in lines[0], err
    assert "Traceback" not in err
    assert listing(folder) == before, "partial output or temporary files left behind"
    if model is not None:
        assert file_digest(model) == digest, "input model modified"


def write_cnn_files(folder: Path, n: int = 40) -> tuple[Path, Path]:
    """A CNN model file and a calibration .npy in ``folder``."""
    model_path = folder / "model.onnx"
    onnx.save(cnn_model(), model_path)
    data_path = folder / "calib.npy"
    np.save(data_path, cnn_data(n=n))
    return model_path, data_path


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``bnref-onnx`` in-process; return (exit status, stdout, stderr)."""
    from onnx_tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors and --version
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def assert_stats_close(model, reference: dict[str, bnref.PreciseBN], feed, *,
                       estimator="population", bessel=False, rtol=2e-5, keys=None):
    """Compare what ``model`` stores with the reference aggregation."""
    stored = stored_stats(model, feed)
    for key, p in reference.items():
        if keys is not None and key not in keys:
            continue
        p = p.with_estimator(estimator, bessel)
        mean, var = stored[key][0], stored[key][1]
        std = np.sqrt(p.var)
        np.testing.assert_allclose(np.asarray(mean, np.float64), p.mean, rtol=0,
                                   atol=rtol * std.max() + 1e-7)
        np.testing.assert_allclose(np.asarray(var, np.float64), p.var, rtol=rtol)
