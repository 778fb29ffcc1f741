"""Plan how each BN input is reduced: staged float32 accumulation, or float64 when unbounded.

onnxruntime's float32 reductions accumulate in float32, with a relative error per row of
~1e-7 at 4096 values but ~5e-5 (biased) at 2.6·10⁵ and ~0.7 at 10⁸. :func:`plan_reduction`
groups the spatial axes, innermost first, into stages of at most :data:`STAGE_LIMIT` values
(``g1``, ``g2``, ...), then the batch axis; a longer static axis is split by a Reshape. Each
stage then errs by ~1e-7 relative (measured: ≤ 3e-7 at 1.7·10⁷ values per channel, offset
1e3). Where the shape does not allow that (unknown rank, one dynamic or unsplittable long
axis) the statistics accumulate in float64 instead (``ReductionPlan.wide``), at about twice
the cost of that BN's statistics.

:func:`bn_input_shapes` finds the element type and dimensions each plan is made from (the
model's value_info, else onnx shape inference), and whether the first axis is the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_tools.batchnorms import BatchNormInfo
from onnx_tools.graph import tensor_dims, tensor_type_and_dims

logger = logging.getLogger(__name__)

#: Most values one float32 accumulation may cover (see the module docstring): onnxruntime's
#: float32 ReduceMean/ReduceSumSquare are exact to ~1e-7..1e-6 relative per row up to here.
STAGE_LIMIT = 4096

#: Rows at least this long get their sums of squares from MatMul instead of ReduceSumSquare.
MATMUL_MIN_ROW = 512

#: A long static axis is split into rows of a divisor of its length; below this row length
#: the split is not worth it and the BN's statistics are accumulated in float64 instead.
MIN_SPLIT = 64

#: Bounds within which onnxruntime's CPU training-mode BatchNormalization kernel accumulates
#: float32 statistics as exactly as the primitive route (see :func:`training_kernel_exact`).
TRAINING_KERNEL_MAX_BATCH = 256
TRAINING_KERNEL_MAX_ROW = STAGE_LIMIT
#: Largest BN input per batch (values) given to that kernel (see :func:`training_kernel_fits`).
TRAINING_KERNEL_MAX_VALUES = 2**20

#: Element type (``TensorProto`` enum or None) and dimensions (None where dynamic; None as a
#: whole when the rank is unknown) of one tensor.
TypeAndDims = tuple[int | None, list[int | None] | None]


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


WIDE = ReductionPlan((0, 0, -1), ((2,),), None, wide=True)


def _largest_divisor(n: int, limit: int) -> int:
    return max(k for k in range(1, min(n, limit) + 1) if n % k == 0)


def _split_long_axis(spatial: list[int | None], limit: int) -> tuple[tuple[int, ...] | None, list[int | None]] | None:
    """Split the one static axis longer than ``limit`` into ``(d / k, k)``; None if impossible.

    Returns ``(reshape target or None, new spatial dims)``.
    """
    long_axes = [i for i, d in enumerate(spatial) if d is not None and d > limit]
    if not long_axes:
        return None, spatial
    if len(long_axes) > 1:
        return None
    i = long_axes[0]
    d = int(spatial[i] or 0)
    k = _largest_divisor(d, limit)
    after = spatial[i + 1:]
    if k < MIN_SPLIT or d // k > limit or any(a is None for a in after):
        return None
    return (0, 0, *([0] * i), -1, k, *after), [*spatial[:i], d // k, k, *after]


def _stages(spatial: list[int | None], limit: int) -> list[tuple[int, ...]]:
    """Group axes ``2 ..`` innermost first while a group's size stays ``<= limit``."""
    stages: list[tuple[int, ...]] = []
    group: list[int] = []
    size = 1
    for axis in range(len(spatial) + 1, 1, -1):
        d = spatial[axis - 2]
        if d is None:  # a dynamic axis is a stage of its own
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
    return stages


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
    if dims is None or len(dims) < 2:
        return WIDE
    if len(dims) == 2:  # (N, C): all of it is the float64 sum over the first axis
        return ReductionPlan(None, (), None, wide=True)
    if len(dims) == 3 and dims[2] is None:
        return WIDE  # e.g. a 1-D signal of unknown, possibly very long, length
    split = _split_long_axis(list(dims[2:]), limit)
    if split is None:
        return WIDE
    reshape, spatial = split
    stages = _stages(spatial, limit)
    first = [spatial[a - 2] for a in stages[0]]
    row = int(np.prod(first)) if all(d is not None for d in first) else None
    return ReductionPlan(reshape, tuple(stages), row)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    return {vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]}


def _first_dim_names(model: onnx.ModelProto) -> set[str]:
    """Names of the symbolic first dimension of the graph inputs that are data (the batch)."""
    inits = {t.name for t in model.graph.initializer}
    names = set()
    for vi in model.graph.input:
        dims = None if vi.name in inits else tensor_dims(vi)
        if dims and isinstance(dims[0], str):
            names.add(dims[0])
    return names


def bn_input_shapes(model: onnx.ModelProto,
                    bns: list[BatchNormInfo]) -> tuple[dict[str, TypeAndDims], set[str]]:
    """Element type and dimensions of each BN input X, and which have the batch as first axis.

    Shape inference runs where the model declares too little. Without a declared type, X is
    taken to have the type of an initializer of that name or of the BN's stored scale. The
    first axis is known to be the batch where it is static (its true size) or carries the
    name of a graph input's first dimension (shape inference passes ``N`` through Conv, BN,
    Relu ...); after a ``Reshape(-1, C)`` or a fold of time into the batch it is unnamed, or
    named otherwise, and may be many times the batch.
    """
    wanted = {bn.input for bn in bns}
    declared = _value_infos(model)
    chosen = {name: declared.get(name) for name in wanted}
    info = {name: tensor_type_and_dims(chosen[name]) for name in wanted}
    if any(t is None or d is None for t, d in info.values()):
        try:
            inferred = _value_infos(onnx.shape_inference.infer_shapes(model))
        except Exception:  # custom domains and models over 2 GB defeat shape inference
            logger.debug("shape inference failed", exc_info=True)
            inferred = {}
        for name in wanted:
            elem, dims = info[name]
            elem2, dims2 = tensor_type_and_dims(inferred.get(name))
            if dims is None and dims2 is not None:
                chosen[name] = inferred[name]
            info[name] = (elem or elem2, dims if dims is not None else dims2)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for bn in bns:
        elem, dims = info[bn.input]
        if elem is None:
            elem = inits.get(bn.input)
        if elem is None and bn.values.get("scale") is not None:
            elem = helper.np_dtype_to_tensor_dtype(bn.values["scale"].dtype)
        info[bn.input] = (elem, dims)
    batch_names = _first_dim_names(model)
    batch_first = set()
    for name in wanted:
        dims = tensor_dims(chosen[name])
        if dims and (isinstance(dims[0], int) or dims[0] in batch_names):
            batch_first.add(name)
    return info, batch_first


def _rows(dims: list[int | None], batch_size: int | None) -> int | None:
    """Length of the first axis: static, else ``batch_size`` (given only where it is the batch)."""
    return dims[0] if dims[0] is not None else batch_size


def training_kernel_exact(elem: int | None, dims: list[int | None] | None,
                          batch_size: int | None) -> bool:
    """Whether onnxruntime's CPU training-mode BN kernel is exact enough for this BN input.

    The kernel sums each (sample, channel) row with Eigen's vectorized float32 sum, then the
    rows of a channel one after another. In float64 that is exact enough at any size. In
    float32 the error of one long accumulation grows with its length, and fastest where the
    values repeat (ReLU zeros, 8-bit pixels: equal terms round alike instead of cancelling):
    at rows of 16384 and 65536 values the kernel's variance was 1.4e-5 and 4.5e-5 off on
    ReLU'd normal data where the primitive route's staged sums stay at 7e-7 and 1.6e-6. Up to
    rows of :data:`STAGE_LIMIT` values (the primitive route's own stage) and batches of
    :data:`TRAINING_KERNEL_MAX_BATCH` the two agree (<= 1e-6 on offset data, 2e-6 on ReLU'd
    data, for both). So float32 needs a known rank, static spatial dimensions within that
    row, and a first axis known to hold at most that many rows (static, else ``batch_size``,
    which the caller passes only where that axis is the batch);
    ``tests/onnx_tools/test_training_kernel.py`` holds the installed onnxruntime to the
    primitive route's accuracy at the corner.
    """
    if elem == onnx.TensorProto.DOUBLE:
        return True
    if elem != onnx.TensorProto.FLOAT or dims is None or len(dims) < 2:
        return False
    spatial = dims[2:]
    if any(d is None for d in spatial) or int(np.prod(spatial, dtype=np.int64)) > TRAINING_KERNEL_MAX_ROW:
        return False
    rows = _rows(dims, batch_size)
    return rows is not None and rows <= TRAINING_KERNEL_MAX_BATCH


def training_kernel_fits(elem: int | None, dims: list[int | None] | None,
                         batch_size: int | None) -> bool:
    """Whether this BN input should run as onnxruntime's CPU training-mode kernel.

    It must be exact enough (:func:`training_kernel_exact`) and small: at most
    :data:`TRAINING_KERNEL_MAX_VALUES` values per batch. The kernel is one node where the
    primitive route has about ten, but it runs on one thread, while the primitive route's
    reductions and subtraction use every intra-op thread. Measured on 2 cores (two Conv-BN-Relu
    blocks, batch 64, the size sweep of ``benchmarks/bench_graph.py``, three runs): the kernel
    takes 0.78-0.83x the primitive route's time at 6.5e4 values, 0.87-0.95x at 5e5-1e6 and
    0.98-1.02x beyond; with more cores the one thread should fall behind on large inputs
    (not measured), where the node overhead it saves is small.
    """
    if dims is None or len(dims) < 2 or not training_kernel_exact(elem, dims, batch_size):
        return False
    rows = _rows(dims, batch_size)
    if rows is None or any(d is None for d in dims[1:]):
        return False
    return int(rows) * int(np.prod(dims[1:], dtype=np.int64)) <= TRAINING_KERNEL_MAX_VALUES
