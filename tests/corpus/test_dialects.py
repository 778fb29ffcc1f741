"""paddle2onnx- and tf2onnx-shaped graphs, and real tf2onnx conversions, against the interpreter.

Each case recalibrates over 3 batches of 8 and compares every BN's written mean/var with the
node-by-node interpreter's pooled statistics of the BN inputs (``reference.interpreter_stats``:
upstream BNs in training mode) to ``reference.RTOL`` = 1e-4 (+ 4x the measured rounding
sensitivity; measured worst 5e-7), after checking that the stored statistics were off by
> 100x that. No framework is needed: these run everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.corpus import dialects, needs
from tests.corpus.reference import (
    assert_stats_close,
    assert_stats_differ,
    batchnorm_tensors,
    interpreter_stats,
)

ort = needs.module("onnxruntime")
import onnx_tools as ot  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def _images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_image = rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1))
    return (rng.normal(size=shape) * 1.3 + per_image + 0.2).astype(np.float32)


def check_against_interpreter(model: onnx.ModelProto, data: np.ndarray, batch: int = 8,
                              tmp_path: Path | None = None) -> onnx.ModelProto:
    """Recalibrate ``model`` (written under ``tmp_path`` when given) and compare every BN."""
    batches = [data[i : i + batch] for i in range(0, len(data), batch)]
    ref, slack = interpreter_stats(model, batches)
    before = batchnorm_tensors(model)
    assert set(ref) == set(before) and ref
    for key, (mean, var) in ref.items():
        assert_stats_differ(before[key]["mean"], before[key]["var"], mean, var, key)
    out = None if tmp_path is None else str(tmp_path / "recalibrated.onnx")
    result = ot.recalibrate(model, data, output=out, batch_size=batch, provider="cpu")
    written = result.model if out is None else onnx.load(out)
    after = batchnorm_tensors(written)
    for key, (mean, var) in ref.items():
        assert_stats_close(after[key]["mean"], after[key]["var"], mean, var, key, slack[key])
    sess = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    assert all(np.isfinite(y).all() for y in sess.run(None, {name: data[:batch]}))
    return written


def test_paddle_style_constant_statistics(tmp_path):
    model = dialects.paddle_style()
    onnx.checker.check_model(model)
    written = check_against_interpreter(model, _images((24, 3, 20, 28)), tmp_path=tmp_path)
    # The statistics stay where paddle2onnx put them: Constant nodes, no initializer added;
    # the batch axis keeps its dim_value -1.
    assert not written.graph.initializer
    kinds = {role: src.kind for bn in ot.inspect_model(written) for role, src in bn.sources.items()}
    assert set(kinds.values()) == {"constant"}
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    assert written.opset_import[0].version == 11 and written.ir_version == 7


def test_tf2onnx_style_nhwc_transposes():
    model = dialects.tf2onnx_style()
    onnx.checker.check_model(model)
    check_against_interpreter(model, _images((24, 16, 16, 3)))


@pytest.mark.parametrize("name", ["no_bn_fusion", "unoptimized"])
def test_real_tf2onnx_conversion(name, tmp_path):
    """tf2onnx 1.17 (TF 2.21) conversions of an NHWC FusedBatchNormV3 graph (make_tf2onnx.py)."""
    model = onnx.load(DATA / f"tf2onnx_{name}.onnx")
    assert model.producer_name == "tf2onnx"
    check_against_interpreter(model, _images((24, 16, 16, 3)), tmp_path=tmp_path)


def test_real_tf2onnx_default_folds_batchnorm():
    """With its default optimizers tf2onnx folds BN into Conv: inspect says so and how to avoid it."""
    path = DATA / "tf2onnx_default.onnx"
    description = ot.describe_model(str(path))
    assert description.batchnorms == []
    assert "tf2onnx without its conv-BN fusion optimizer" in description.advice
    # the optimizer to leave out, by name; and Keras 3, whose export has no BN node to keep
    assert "remove_back_to_back" in description.advice and "Keras 3" in description.advice
    with pytest.raises(ot.ModelError, match="no BatchNormalization"):
        ot.recalibrate(str(path), _images((8, 16, 16, 3)), batch_size=8, provider="cpu")


def test_tolerance_check_can_fail():
    """Meta-test of the corpus's comparison: 10x its tolerance off, in either statistic, fails."""
    from tests.corpus.reference import RTOL

    mean, var = np.array([0.5, -2.0, 3.0]), np.array([1.0, 4.0, 1e-12])
    assert_stats_close(mean, var, mean, var, "exact")
    s = var + 1e-3 * var.mean()
    with pytest.raises(AssertionError, match="mean off"):
        assert_stats_close(mean + 10 * RTOL * np.sqrt(s), var, mean, var, "mean")
    with pytest.raises(AssertionError, match="var off"):
        assert_stats_close(mean, var * (1 + 10 * RTOL) + 10 * RTOL * s, mean, var, "var")
    with pytest.raises(AssertionError, match="already match"):
        assert_stats_differ(mean, var, mean, var, "unchanged")
