"""Build the *collection model*: selected BNs normalize with their own batch statistics.

For a selected BN with input ``X`` of shape ``(N, C, *spatial)`` the rewrite inserts, before
the (kept) BN node::

    t      = ReduceMean(X, axes=g1); t = ReduceMean(t, axes=g2) ...    # per sample, in stages
    m      = ReduceMean(t, axes=[0])                                   # batch mean, (1, C, 1, ..)
    D      = X - m
    t      = sum of D² over g1; t = ReduceMean(t, axes=g2) ...         # MatMul or ReduceSumSquare
    v      = ReduceMean(t, axes=[0]) / |g1|                            # biased batch variance
    Y      = BatchNormalization(X, scale, bias, m, v)                  # inference kernel

and adds ``m``, ``v`` (as ``(C,)``) and ``Shape(X)`` as graph outputs, so only vectors of
length C leave the runtime. The formula is training-mode BN (eps inside the square root,
biased variance); it never uses ``training_mode=1``, which onnxruntime's CUDA provider refuses
from opset 14 and whose CPU kernel writes the running statistics into its (possibly shared)
inputs. The numerical decisions:

* two passes (mean first, then squared deviations) avoid the cancellation of E[x²]−E[x]²
  (a channel with a large offset, or a constant channel, whose variance must come out 0);
* staged reduction keeps every float32 accumulation short: onnxruntime's float32 reductions
  accumulate in float32, with a relative error per row of ~1e-7 at 4096 values but ~5e-5
  (biased) at 2.6·10⁵ and ~0.7 at 10⁸. The spatial axes are grouped, innermost first, into
  stages of at most :data:`STAGE_LIMIT` values (``g1``, ``g2``, ...), then the batch axis;
  a longer static axis is split by a Reshape (see :func:`plan_reduction`). Each stage then
  errs by ~1e-7 relative (measured: ≤ 3e-7 at 1.7·10⁷ values per channel, offset 1e3).
  Where the shape does not allow that (unknown rank, one dynamic or unsplittable long axis)
  the statistics accumulate in float64 instead, at about twice the cost of that BN's
  statistics.

The cost on onnxruntime's CPU provider (profiled): the statistics are three passes over X (a
ReduceMean, the Sub, the sum of squares); BatchNormalization is one more. ReduceSumSquare has
no vectorized path (~4x a ReduceMean), so rows of at least :data:`MATMUL_MIN_ROW` values get
their sums of squares from a batched MatMul of D by its transpose, which onnxruntime fuses into
a vectorized FusedMatMul. Most of the remaining gap to plain inference is not the statistics
but the lost Conv+BN fold: with run-time mean/var the BN cannot join the NCHWc convolution, so
each BN input is reordered out of and back into the blocked layout and Relu/Add run unfused.

float16 inputs are cast to float32 for the reductions and the normalization (squares of
float16 activations above ~256 overflow float16), and the result cast back; bfloat16 is
refused (onnxruntime's CPU build has no bfloat16 kernels). BNs that are not selected stay in
inference mode. Graph outputs of the collection model are only the statistics, so
onnxruntime drops nodes after the last selected BN.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_tools.errors import ModelError
from onnx_tools.graph import (
    BatchNormInfo,
    UniqueNamer,
    batchnorms_in_subgraphs,
    domain_opset,
    find_batchnorms,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatOutputs:
    """Graph output names carrying one BN's batch statistics: mean, variance, ``Shape(X)``."""

    mean: str
    var: str
    shape: str


@dataclass
class CollectionModel:
    """The rewritten model and an explicit map from each BN to the outputs added for it.

    ``outputs`` maps BN key (output tensor name) to its :class:`StatOutputs`, so results are
    never paired by parsing names.
    """

    model: onnx.ModelProto
    bns: list[BatchNormInfo]
    outputs: dict[str, StatOutputs]

    @property
    def output_names(self) -> list[str]:
        """All statistics outputs, in BN order."""
        names: list[str] = []
        for out in self.outputs.values():
            names += [out.mean, out.var, out.shape]
        return names


def select_batchnorms(
    bns: list[BatchNormInfo], include: str | None = None, exclude: str | None = None
) -> list[BatchNormInfo]:
    """BNs whose node or output name matches ``include`` and not ``exclude`` (``re.search``)."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as err:
        raise ModelError(f"invalid --include/--exclude regular expression: {err}") from err

    def hit(pattern: re.Pattern[str] | None, bn: BatchNormInfo) -> bool:
        return pattern is not None and bool(
            pattern.search(bn.node_name) or pattern.search(bn.output)
        )

    chosen = [bn for bn in bns if (inc is None or hit(inc, bn)) and not hit(exc, bn)]
    return chosen


def upgrade_old_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a runnable copy of an opset < 7 model (onnxruntime has no BN-6 kernel)."""
    opset = domain_opset(model)
    if opset >= 7:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, 7)
    except Exception as exc:  # the converter raises plain RuntimeError/ConvertError
        raise ModelError(
            f"the model uses opset {opset}, which onnxruntime cannot run, and onnx's "
            f"version converter could not upgrade it to opset 7: {exc}"
        ) from exc
    logger.info("converted opset %d to opset 7 for collection", opset)
    return converted


def _reduce(op: str, x: str, out: str, axes: list[int], opset: int, namer: UniqueNamer,
            inits: list[TensorProto], keepdims: int = 1) -> onnx.NodeProto:
    """Make a Reduce node; ``axes`` is an attribute before opset 18 (ReduceSum: 13)."""
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_as_input:
        axes_name = namer(f"{out}_axes")
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        return helper.make_node(op, [x, axes_name], [out], name=namer(out), keepdims=keepdims)
    return helper.make_node(op, [x], [out], name=namer(out), axes=axes, keepdims=keepdims)


#: Most values one float32 accumulation may cover (see the module docstring): onnxruntime's
#: float32 ReduceMean/ReduceSumSquare are exact to ~1e-7..1e-6 relative per row up to here.
STAGE_LIMIT = 4096

#: Rows at least this long get their sums of squares from MatMul instead of ReduceSumSquare.
MATMUL_MIN_ROW = 512

#: A long static axis is split into rows of a divisor of its length; below this row length
#: the split is not worth it and the BN's statistics are accumulated in float64 instead.
MIN_SPLIT = 64


@dataclass(frozen=True)
class ReductionPlan:
    """How the statistics of one BN input ``(N, C, *spatial)`` are reduced.

    ``reshape``: Reshape target (``0`` copies a dimension) that splits one long static axis,
    or None. ``stages``: groups of axes (of the reshaped input), innermost first, reduced one
    after another per sample before the batch axis. ``row``: number of values in the first
    stage when static (None: taken from ``Shape`` at run time). ``wide``: accumulate in
    float64 because no float32 staging bounds the error (unknown rank, a dynamic single
    spatial axis, or a long axis that cannot be split).
    """

    reshape: tuple[int, ...] | None
    stages: tuple[tuple[int, ...], ...]
    row: int | None
    wide: bool = False


def _largest_divisor(n: int, limit: int) -> int:
    return max(k for k in range(1, min(n, limit) + 1) if n % k == 0)


def plan_reduction(dims: list[int | None] | None, limit: int = STAGE_LIMIT) -> ReductionPlan:
    """Plan a staged per-channel reduction for a BN input with dimensions ``dims``.

    ``dims`` are the input's dimensions (``None`` where dynamic; ``dims=None`` when even the
    rank is unknown). Spatial axes are grouped from the innermost outwards while the product
    of a group stays ``<= limit``; a dynamic axis is a group of its own (its length is unknown
    but one image axis is short); a static axis longer than ``limit`` is split into
    ``(d / k, k)`` with ``k`` the largest divisor ``<= limit``. Where none of that bounds the
    float32 accumulation (rank unknown, rank 3 with a dynamic axis, a long axis that splits
    badly or is followed by dynamic axes) the plan is ``wide`` (float64, over ``(N, C, -1)``).
    """
    wide = ReductionPlan((0, 0, -1), ((2,),), None, wide=True)
    if dims is None or len(dims) < 2:
        return wide
    rank = len(dims)
    if rank == 2:
        return ReductionPlan(None, (), None)
    spatial = list(dims[2:])
    if rank == 3 and spatial[0] is None:
        return wide  # e.g. a 1-D signal of unknown, possibly very long, length
    reshape = None
    long_axes = [i for i, d in enumerate(spatial) if d is not None and d > limit]
    if long_axes:
        if len(long_axes) > 1:
            return wide
        i = long_axes[0]
        d = int(spatial[i] or 0)
        k = _largest_divisor(d, limit)
        after = spatial[i + 1:]
        if k < MIN_SPLIT or d // k > limit or any(a is None for a in after):
            return wide
        reshape = (0, 0, *([0] * i), -1, k, *after)
        spatial = [*spatial[:i], d // k, k, *after]
    stages: list[tuple[int, ...]] = []
    group: list[int] = []
    size = 1
    for axis in range(len(spatial) + 1, 1, -1):
        d = spatial[axis - 2]
        if d is None:
            if group:
                stages.append(tuple(sorted(group)))
            stages.append((axis,))
            group, size = [], 1
            continue
        if group and size * d > limit:
            stages.append(tuple(sorted(group)))
            group, size = [], 1
        group.append(axis)
        size *= d
    if group:
        stages.append(tuple(sorted(group)))
    first = [spatial[a - 2] for a in stages[0]]
    row = int(np.prod(first)) if all(d is not None for d in first) else None
    return ReductionPlan(reshape, tuple(stages), row)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    return {vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]}


def _type_and_dims(vi: onnx.ValueInfoProto | None) -> tuple[int | None, list[int | None] | None]:
    if vi is None or not vi.type.HasField("tensor_type"):
        return None, None
    tt = vi.type.tensor_type
    elem = tt.elem_type or None
    if not tt.HasField("shape"):
        return elem, None
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tt.shape.dim]
    return elem, dims


def _input_info(
    model: onnx.ModelProto, bns: list[BatchNormInfo]
) -> dict[str, tuple[int | None, list[int | None] | None]]:
    """Element type and dimensions of each BN input X (shape inference where needed)."""
    wanted = {bn.input for bn in bns}
    infos = _value_infos(model)
    info = {name: _type_and_dims(infos.get(name)) for name in wanted}
    if any(t is None or d is None for t, d in info.values()):
        try:
            inferred = _value_infos(onnx.shape_inference.infer_shapes(model))
        except Exception:  # custom domains and models over 2 GB defeat shape inference
            logger.debug("shape inference failed", exc_info=True)
            inferred = {}
        for name in wanted:
            elem, dims = info[name]
            elem2, dims2 = _type_and_dims(inferred.get(name))
            info[name] = (elem or elem2, dims if dims is not None else dims2)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for bn in bns:
        elem, dims = info[bn.input]
        if elem is None:
            elem = inits.get(bn.input)
        if elem is None and bn.values.get("scale") is not None:
            elem = helper.np_dtype_to_tensor_dtype(bn.values["scale"].dtype)
        info[bn.input] = (elem, dims)
    return info


class _Emitter:
    """Append nodes for one BN; every name comes from the model-wide :class:`UniqueNamer`."""

    def __init__(self, base: str, opset: int, namer: UniqueNamer, inits: list[TensorProto]) -> None:
        self.base, self.opset, self.namer, self.inits = base, opset, namer, inits
        self.nodes: list[onnx.NodeProto] = []

    def node(self, op: str, inputs: list[str], tag: str, **attrs: object) -> str:
        out = self.namer(f"{self.base}_{tag}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.namer(out), **attrs))
        return out

    def reduce(self, op: str, x: str, axes: tuple[int, ...] | list[int], tag: str) -> str:
        out = self.namer(f"{self.base}_{tag}")
        self.nodes.append(_reduce(op, x, out, list(axes), self.opset, self.namer, self.inits))
        return out

    def const(self, value: np.ndarray, tag: str) -> str:
        name = self.namer(f"{self.base}_{tag}")
        self.inits.append(numpy_helper.from_array(value, name))
        return name


def _emit_statistics(em: _Emitter, x: str, plan: ReductionPlan, ctype: int,
                     flat: str) -> tuple[str, str]:
    """Emit the staged two-pass batch mean and biased variance of ``x``; return (C,) names."""
    if plan.reshape is not None:
        x = em.node("Reshape", [x, em.const(np.array(plan.reshape, np.int64), "rows_shape")],
                    "rows")
    t = x
    for k, axes in enumerate(plan.stages):
        t = em.reduce("ReduceMean", t, axes, f"mean_s{k}")
    m = em.reduce("ReduceMean", t, [0], "mean_b")
    # Squared deviations from the batch mean, not E[x²]−E[x]²: no cancellation.
    d = em.node("Sub", [x, m], "dev")
    if not plan.stages:  # (N, C): a short batch axis only
        v = em.reduce("ReduceMean", em.node("Mul", [d, d], "dev2"), [0], "var")
    else:
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
            t = em.node("MatMul", [d_row, d_col], "ss_s0")
        else:
            t = em.reduce("ReduceSumSquare", d, first, "ss_s0")
        for k, axes in enumerate(plan.stages[1:], 1):
            t = em.reduce("ReduceMean", t, axes, f"ss_s{k}")
        t = em.reduce("ReduceMean", t, [0], "ss_b")
        if plan.row is not None:
            row = em.const(np.array(plan.row, helper.tensor_dtype_to_np_dtype(ctype)), "row")
        else:
            dims = em.node("Shape", [x], "rows_dims")
            idx = em.const(np.array(plan.stages[0], np.int64), "row_axes")
            count = em.reduce("ReduceProd", em.node("Gather", [dims, idx], "row_dims"), [0],
                              "row_count")
            row = em.node("Cast", [count], "row", to=ctype)
        v = em.node("Div", [t, row], "var")
    mean = em.node("Reshape", [m, flat], "batch_mean")
    var = em.node("Reshape", [v, flat], "batch_var")
    return mean, var


def build_collection_model(
    model: onnx.ModelProto,
    *,
    include: str | None = None,
    exclude: str | None = None,
    base_dir: str | None = None,
    stage_limit: int = STAGE_LIMIT,
) -> CollectionModel:
    """Rewrite the selected BNs of ``model`` (not modified) into training-mode form.

    ``stage_limit`` is the longest float32 accumulation (:func:`plan_reduction`).
    Raises :class:`ModelError` for a model without (selected) BN, a BN inside an If/Loop/Scan
    body, a BN with training_mode=1 or spatial=0, extra BN outputs that something reads, or
    bfloat16 inputs.
    """
    nested = batchnorms_in_subgraphs(model)
    if nested:
        raise ModelError(
            "BatchNormalization inside a control-flow body is not supported: "
            + "; ".join(nested[:5])
            + (" ..." if len(nested) > 5 else "")
        )
    work = upgrade_old_opset(model)
    all_bns = find_batchnorms(work, base_dir)
    if not all_bns:
        raise ModelError(f"the model has no BatchNormalization node: {EXPORT_ADVICE_SHORT}")
    bns = select_batchnorms(all_bns, include, exclude)
    if not bns:
        names = ", ".join(bn.label for bn in all_bns[:8])
        raise ModelError(
            f"--include/--exclude select none of the {len(all_bns)} BatchNormalization "
            f"nodes ({names}{' ...' if len(all_bns) > 8 else ''})"
        )
    opset = domain_opset(work)
    out = onnx.ModelProto()
    out.CopyFrom(work)
    graph = out.graph
    namer = UniqueNamer(out)
    info = _input_info(out, bns)
    consumers = {n for node in graph.node for n in node.input}
    consumers |= {o.name for o in graph.output}

    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    inits: list[TensorProto] = []
    outputs: dict[str, StatOutputs] = {}
    ctypes: dict[str, int] = {}
    flat_const = namer("bnref_flat_shape")
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), flat_const))

    for bn in bns:
        node = graph.node[bn.index]
        if bn.training_mode:
            raise ModelError(
                f"BatchNormalization {bn.label!r} is exported in training mode; export the "
                "model in inference mode (model.eval())"
            )
        if bn.spatial == 0:
            raise ModelError(
                f"BatchNormalization {bn.label!r} has spatial=0 (per-activation statistics), "
                "which is not supported"
            )
        used_extra = [o for o in bn.extra_outputs if o in consumers]
        if used_extra:
            raise ModelError(
                f"BatchNormalization {bn.label!r} has extra outputs read by other nodes: "
                f"{', '.join(used_extra)}"
            )
        elem, dims = info[bn.input]
        if elem == TensorProto.BFLOAT16:
            raise ModelError(
                f"BatchNormalization {bn.label!r} runs in bfloat16; onnxruntime's CPU build has "
                "no bfloat16 kernels for it. Convert the model to float32 or float16"
            )
        if elem not in (None, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            raise ModelError(
                f"BatchNormalization {bn.label!r} has input type "
                f"{TensorProto.DataType.Name(elem)}; expected float, float16 or double"
            )
        half = elem == TensorProto.FLOAT16
        # The type the BN node normalizes in, and the type the statistics accumulate in.
        ntype = TensorProto.DOUBLE if elem == TensorProto.DOUBLE else TensorProto.FLOAT
        plan = plan_reduction(dims, stage_limit)
        ctype = TensorProto.DOUBLE if plan.wide else ntype
        if plan.wide and ntype != TensorProto.DOUBLE:
            logger.info("BatchNormalization %r: statistics accumulate in float64 (shape %s)",
                        bn.label, dims)
        em = _Emitter(namer(f"bnref_{len(outputs)}"), opset, namer, inits)
        x = bn.input
        if half:
            # float16 squares overflow above ~256: reduce and normalize in float32.
            x = em.node("Cast", [x], "x32", to=TensorProto.FLOAT)
        xs = x if ctype == ntype else em.node("Cast", [x], "x64", to=ctype)
        mean, var = _emit_statistics(em, xs, plan, ctype, flat_const)
        shape = em.node("Shape", [bn.input], "shape")
        bn_mean, bn_var = mean, var
        if ctype != ntype:
            bn_mean = em.node("Cast", [mean], "mean_n", to=ntype)
            bn_var = em.node("Cast", [var], "var_n", to=ntype)
        nodes = em.nodes
        if half:
            # Normalize in float32 with float32 copies of scale/bias, cast Y back to float16.
            scale32 = em.node("Cast", [node.input[1]], "scale32", to=TensorProto.FLOAT)
            bias32 = em.node("Cast", [node.input[2]], "bias32", to=TensorProto.FLOAT)
            y32 = namer(f"{em.base}_y32")
            bn_node = onnx.NodeProto()
            bn_node.CopyFrom(node)
            del bn_node.input[:]
            bn_node.input.extend([x, scale32, bias32, bn_mean, bn_var])
            del bn_node.output[:]
            bn_node.output.append(y32)
            nodes.append(bn_node)
            nodes.append(helper.make_node("Cast", [y32], [node.output[0]],
                                          name=namer(f"{em.base}_y16"), to=TensorProto.FLOAT16))
            new_nodes[bn.index] = nodes
        else:
            node.input[3] = bn_mean
            node.input[4] = bn_var
            del node.output[1:]
            new_nodes[bn.index] = [*nodes, node]
        stat = StatOutputs(mean, var, shape)
        ctypes[bn.key] = ctype
        outputs[bn.key] = stat

    rebuilt: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        if i in new_nodes:
            rebuilt.extend(new_nodes[i])
        else:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(inits)
    del graph.output[:]
    for key, stat in outputs.items():
        graph.output.append(helper.make_tensor_value_info(stat.mean, ctypes[key], None))
        graph.output.append(helper.make_tensor_value_info(stat.var, ctypes[key], None))
        graph.output.append(helper.make_tensor_value_info(stat.shape, TensorProto.INT64, None))
    # Stale shape annotations of rewired BN outputs would be wrong for float16; drop them all.
    del graph.value_info[:]
    if out.ir_version < 4:
        # IR < 4 wants every initializer listed as a graph input; the collection model only
        # lives in memory, so declare the IR version that allows the added constants.
        out.ir_version = 4
    return CollectionModel(out, bns, outputs)


EXPORT_ADVICE_SHORT = (
    "it was probably folded into Conv/Gemm at export (run `bnref-onnx inspect` for how to "
    "export with BN kept)"
)
