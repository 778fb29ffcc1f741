"""The independent reference for graphs without a framework at hand, and the tolerance check.

:func:`interpreter_stats` runs the fuzzer's node-by-node interpreter
(``tests.robustness.graphgen.reference_population_stats``: onnx's ReferenceEvaluator for every
non-BN node, NumPy for each BN in training mode) on any single-input model: it renames the
input to the interpreter's ``x`` and names unnamed nodes in a copy, and returns the pooled
mean and biased variance of every BN input by BN output name. Like the fuzzer it runs twice,
in the model's dtype with a one-ulp probe and in float64, and returns the difference as
``slack``: how much float32 rounding upstream can move each statistic in this model.

:func:`assert_stats_close` is the one tolerance of the corpus (see its docstring).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tests.robustness.graphgen import reference_population_stats

#: Relative tolerance. Measured worst over the corpus: 2.5e-5 (regnet_y_400mf; 1.6-1.8e-5 for
#: efficientnet_b0 and shufflenet), and that is float32 propagation through the network, not
#: reduction error: PyTorch's own float32 forward differs from its float64 forward by 2e-5
#: there. Shallow graphs (dialects, wheels) agree to <= 1e-6.
RTOL = 1e-4


def _interpreter_ready(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy with its one graph input named ``x`` and every node named; node -> BN output."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name for t in work.graph.initializer}
    (inp,) = [i for i in work.graph.input if i.name not in inits]
    old, inp.name = inp.name, "x"
    names: dict[str, str] = {}
    for i, node in enumerate(work.graph.node):
        node.name = node.name or f"node_{i}"
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = "x"
        if node.op_type == "BatchNormalization":
            names[node.name] = node.output[0]
    assert len(set(names)) == len(names)
    return work, names


def interpreter_stats(model: onnx.ModelProto, batches: list[np.ndarray]):
    """``({bn output: (mean, var)}, {bn output: (mean slack, var slack)})`` over ``batches``."""
    work, names = _interpreter_ready(model)
    plain = reference_population_stats(work, batches)
    wide = reference_population_stats(work, batches, wide=True)
    stats = {names[k]: v for k, v in plain.items()}
    slack = {names[k]: (np.abs(v[0] - wide[k][0]), np.abs(v[1] - wide[k][1])) for k, v in plain.items()}
    return stats, slack


def batchnorm_tensors(model: onnx.ModelProto) -> dict[str, dict[str, np.ndarray]]:
    """Every BN node's scale/mean/var values (through Identity and Constant), by output name."""
    values = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def resolve(name: str) -> np.ndarray:
        if name in values:
            return numpy_helper.to_array(values[name])
        node = producers[name]
        if node.op_type == "Identity":
            return resolve(node.input[0])
        if node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        raise AssertionError(f"BN statistic {name} is computed by {node.op_type}")

    return {
        n.output[0]: {role: resolve(n.input[k]) for role, k in (("scale", 1), ("mean", 3), ("var", 4))}
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
    }


def assert_stats_close(got_mean, got_var, mean, var, label: str, slack=None, rtol: float = RTOL):
    """Stored statistics equal the reference to float32 reduction error.

    Per channel: ``|mean - ref| <= rtol * sqrt(s)`` and ``|var - ref| <= rtol * s``, where the
    scale ``s = ref var + 1e-3 * (the BN's average ref var)`` keeps near-constant channels (a
    dead ReLU's, variance ~1e-12) from demanding accuracy below the layer's own noise level.
    ``slack`` (from :func:`interpreter_stats`) adds 4x the measured rounding sensitivity.
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    gm, gv = np.asarray(got_mean, np.float64), np.asarray(got_var, np.float64)
    s = var + 1e-3 * var.mean()
    sm, sv = (4 * slack[0], 4 * slack[1]) if slack is not None else (0.0, 0.0)
    err_m = np.abs(gm - mean) - sm
    err_v = np.abs(gv - var) - sv
    assert np.all(err_m <= rtol * np.sqrt(s)), (
        f"{label}: mean off by {np.max(err_m / np.sqrt(s)):.3g} std (tolerance {rtol})")
    assert np.all(err_v <= rtol * s), (
        f"{label}: var off by {np.max(err_v / s):.3g} relative (tolerance {rtol})")


def assert_stats_differ(mean, var, ref_mean, ref_var, label: str, factor: float = 100.0):
    """The statistics before recalibration are far from the reference: the check can fail."""
    s = np.asarray(ref_var, np.float64) + 1e-3 * np.mean(ref_var)
    off_m = np.max(np.abs(np.asarray(mean, np.float64) - ref_mean) / np.sqrt(s))
    off_v = np.max(np.abs(np.asarray(var, np.float64) - ref_var) / s)
    assert max(off_m, off_v) > factor * RTOL, f"{label}: stored stats already match the reference"
