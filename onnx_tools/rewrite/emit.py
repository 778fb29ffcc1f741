"""Emit the nodes that compute one BN input's batch statistics and normalize with them.

Two routes. On onnxruntime's CPU provider, within the bounds of
:func:`~onnx_tools.rewrite.plan.training_kernel_fits`, :func:`emit_training_kernel` turns the
BN into onnxruntime's own training-mode kernel, which computes the two-pass batch mean and
biased variance and normalizes in one node instead of about ten (0.78-0.95x the primitive
route's time on BN inputs up to 10^6 values on 2 cores, ``benchmarks/bench_graph.py``).
Everywhere else (CUDA, which refuses training mode from opset 14; float16; inputs too large
for its one thread or its float32 sums) :func:`emit_statistics` and
:func:`emit_normalization` build the statistics from primitive operators. For a BN input
``X`` of shape ``(N, C, *spatial)`` and its :class:`ReductionPlan`::

    t      = ReduceMean(X, axes=g1); t = ReduceMean(t, axes=g2) ...    # per sample, in stages
    m      = ReduceMean(float64(t), axes=[0])                          # batch mean, (1, C, 1, ..)
    D      = X - m
    t      = sum of D² over g1; t = ReduceMean(t, axes=g2) ...         # MatMul or ReduceSumSquare
    v      = ReduceMean(float64(t), axes=[0]) / |g1|                   # biased batch variance
    Y      = BatchNormalization(X, scale, bias, m, v)                  # inference kernel

Two passes (mean first, then squared deviations) avoid the cancellation of E[x²]−E[x]² (a
channel with a large offset, or a constant channel, whose variance must come out 0).
ReduceSumSquare has no vectorized path on onnxruntime's CPU provider (~4x a ReduceMean), so
rows of at least :data:`~onnx_tools.rewrite.plan.MATMUL_MIN_ROW` values get their sums of
squares from a batched MatMul of D by its transpose, which onnxruntime fuses into a
vectorized FusedMatMul. float16 inputs are cast to float32 for the reductions and the
normalization (squares of float16 activations above ~256 overflow float16), and Y is cast
back.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_tools.graph import UniqueNamer
from onnx_tools.rewrite.plan import MATMUL_MIN_ROW, ReductionPlan


def reduce_node(op: str, x: str, out: str, axes: list[int], opset: int, namer: UniqueNamer,
                inits: list[TensorProto], keepdims: int = 1) -> onnx.NodeProto:
    """Make a Reduce node; ``axes`` is an attribute before opset 18 (ReduceSum: 13)."""
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_as_input:
        axes_name = namer(f"{out}_axes")
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        return helper.make_node(op, [x, axes_name], [out], name=namer(out), keepdims=keepdims)
    return helper.make_node(op, [x], [out], name=namer(out), axes=axes, keepdims=keepdims)


class Emitter:
    """Append nodes for one BN; every name comes from the model-wide :class:`UniqueNamer`.

    ``nodes`` collects the BN's new nodes in order; constants go to the shared ``inits``, new
    graph inputs to ``inputs`` with their values in ``feeds``.
    """

    def __init__(self, base: str, opset: int, namer: UniqueNamer, inits: list[TensorProto]) -> None:
        self.base, self.opset, self.namer, self.inits = base, opset, namer, inits
        self.nodes: list[onnx.NodeProto] = []
        #: New graph inputs and the constant values collection feeds them.
        self.inputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}

    def node(self, op: str, inputs: list[str], tag: str, **attrs: object) -> str:
        """Append ``op(inputs)`` and return its (fresh) output name."""
        out = self.namer(f"{self.base}_{tag}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.namer(out), **attrs))
        return out

    def reduce(self, op: str, x: str, axes: tuple[int, ...] | list[int], tag: str) -> str:
        """Append a Reduce node over ``axes`` (keepdims) in this opset's form."""
        out = self.namer(f"{self.base}_{tag}")
        self.nodes.append(reduce_node(op, x, out, list(axes), self.opset, self.namer, self.inits))
        return out

    def const(self, value: np.ndarray, tag: str) -> str:
        """Add ``value`` as a new initializer and return its name."""
        name = self.namer(f"{self.base}_{tag}")
        self.inits.append(numpy_helper.from_array(value, name))
        return name


def _row_sum_of_squares(em: Emitter, d: str, plan: ReductionPlan, ctype: int) -> str:
    first = plan.stages[0]
    if ctype == TensorProto.FLOAT and (plan.row or 0) >= MATMUL_MIN_ROW:
        # Row sums of squares as a batched dot product D_row · D_rowᵀ: onnxruntime fuses
        # MatMul+Transpose into a vectorized FusedMatMul, while its ReduceSumSquare has no
        # vectorized path (~2.5x slower at rows of 1024, faster below ~256 values).
        view = em.const(np.array([*[0] * first[0], 1, -1], np.int64), "row_view")
        d_row = em.node("Reshape", [d, view], "dev_row")
        rank = first[0] + 2
        perm = [*range(rank - 2), rank - 1, rank - 2]
        d_col = em.node("Transpose", [d_row], "dev_col", perm=perm)
        return em.node("MatMul", [d_row, d_col], "ss_s0")
    return em.reduce("ReduceSumSquare", d, first, "ss_s0")


def _row_length(em: Emitter, x: str, plan: ReductionPlan, ctype: int) -> str:
    if plan.row is not None:
        return em.const(np.array(plan.row, helper.tensor_dtype_to_np_dtype(ctype)), "row")
    dims = em.node("Shape", [x], "rows_dims")
    idx = em.const(np.array(plan.stages[0], np.int64), "row_axes")
    count = em.reduce("ReduceProd", em.node("Gather", [dims, idx], "row_dims"), [0], "row_count")
    return em.node("Cast", [count], "row", to=ctype)


def emit_statistics(em: Emitter, x: str, plan: ReductionPlan, ctype: int,
                    flat: str) -> tuple[str, str]:
    """Emit the staged two-pass batch mean and biased variance of ``x``; return float64 (C,).

    The per-sample stages accumulate in ``ctype``; the last step, over the first axis, always
    in float64: that axis is the batch only as far as shape inference can tell, and after a
    ``Reshape(-1, C)`` or a fold of time into the batch it may hold 10^5 rows, where a float32
    sum of per-sample means with an offset loses the mean (and through it the variance). The
    per-sample results are small, so this costs a few casts of (N, C) values.
    """
    if plan.reshape is not None:
        x = em.node("Reshape", [x, em.const(np.array(plan.reshape, np.int64), "rows_shape")],
                    "rows")
    t = x
    for k, axes in enumerate(plan.stages):
        t = em.reduce("ReduceMean", t, axes, f"mean_s{k}")
    wide = TensorProto.DOUBLE
    m = em.reduce("ReduceMean", _as(em, t, ctype, wide, "mean_w"), [0], "mean_b")
    # Squared deviations from the batch mean, not E[x²]−E[x]²: no cancellation.
    d = em.node("Sub", [x, _as(em, m, wide, ctype, "mean_c")], "dev")
    if not plan.stages:  # (N, C): the first axis only (plan_reduction makes this plan wide)
        d2 = _as(em, em.node("Mul", [d, d], "dev2"), ctype, wide, "dev2_w")
        v = em.reduce("ReduceMean", d2, [0], "var")
    else:
        t = _row_sum_of_squares(em, d, plan, ctype)
        for k, axes in enumerate(plan.stages[1:], 1):
            t = em.reduce("ReduceMean", t, axes, f"ss_s{k}")
        t = em.reduce("ReduceMean", _as(em, t, ctype, wide, "ss_w"), [0], "ss_b")
        v = em.node("Div", [t, _row_length(em, x, plan, wide)], "var")
    mean = em.node("Reshape", [m, flat], "batch_mean")
    var = em.node("Reshape", [v, flat], "batch_var")
    return mean, var


def _as(em: Emitter, x: str, have: int, want: int, tag: str) -> str:
    """``x`` cast from type ``have`` to ``want`` (itself when they are the same)."""
    return x if have == want else em.node("Cast", [x], tag, to=want)


def emit_normalization(em: Emitter, node: onnx.NodeProto, x: str, mean: str, var: str,
                       half: bool) -> None:
    """Append the BN ``node`` itself, now reading ``mean``/``var`` (the batch statistics).

    For float16 (``half``) it normalizes the float32 ``x`` with float32 copies of scale/bias
    and casts Y back, keeping the original output name; otherwise ``node`` is rewired in place
    (its extra training outputs dropped).
    """
    if not half:
        node.input[3] = mean
        node.input[4] = var
        del node.output[1:]
        em.nodes.append(node)
        return
    scale32 = em.node("Cast", [node.input[1]], "scale32", to=TensorProto.FLOAT)
    bias32 = em.node("Cast", [node.input[2]], "bias32", to=TensorProto.FLOAT)
    y32 = em.namer(f"{em.base}_y32")
    bn_node = onnx.NodeProto()
    bn_node.CopyFrom(node)
    del bn_node.input[:]
    bn_node.input.extend([x, scale32, bias32, mean, var])
    del bn_node.output[:]
    bn_node.output.append(y32)
    em.nodes.append(bn_node)
    em.nodes.append(helper.make_node("Cast", [y32], [node.output[0]],
                                     name=em.namer(f"{em.base}_y16"), to=TensorProto.FLOAT16))


def emit_training_kernel(em: Emitter, node: onnx.NodeProto, elem: int, channels: int,
                         opset: int) -> tuple[str, str]:
    """Make ``node`` onnxruntime's training-mode BN; return its (batch mean, biased variance).

    The node keeps X, scale and bias, normalizes with the batch statistics and returns them as
    its running outputs: with ``momentum=0`` the kernel's ``old * momentum + batch * (1 -
    momentum)`` is the batch statistic itself (biased variance: it divides by ``n``). Its
    mean/var inputs become fresh graph inputs (zeros, in :attr:`Emitter.feeds`), never the
    model's own tensors: those may hold NaN/Inf after a diverged run (and ``0 * NaN`` is NaN),
    may be graph inputs nobody feeds, and the CPU kernel declares its running outputs aliases
    of them while onnxruntime merges equal initializers (a fresh export's var is its scale;
    onnxruntime issue 29790). From opset 14 ``training_mode=1`` selects training; before, the
    extra outputs do (all four of them).
    """
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    stale = []
    for role in ("mean", "var"):
        name = em.namer(f"{em.base}_unused_{role}")
        em.feeds[name] = np.zeros(channels, np_type)
        em.inputs.append(helper.make_tensor_value_info(name, elem, [channels]))
        stale.append(name)
    node.input[3], node.input[4] = stale
    kept = [a for a in node.attribute if a.name not in ("momentum", "training_mode")]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute("momentum", 0.0))
    if opset >= 14:
        node.attribute.append(helper.make_attribute("training_mode", 1))
    mean, var = em.namer(f"{em.base}_batch_mean"), em.namer(f"{em.base}_batch_var")
    del node.output[1:]
    node.output.extend([mean, var])
    if opset < 14:  # BN-7..9 allow 1 or 5 outputs; the saved mean/inverse std go unread
        node.output.extend([em.namer(f"{em.base}_saved_mean"), em.namer(f"{em.base}_saved_std")])
    em.nodes.append(node)
    return mean, var
