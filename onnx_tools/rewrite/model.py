"""Assemble the collection model: every selected BN normalizes with its own batch statistics.

:func:`build_collection_model` copies the model, inserts before each selected BN the nodes of
:mod:`onnx_tools.rewrite.emit` (planned by :mod:`onnx_tools.rewrite.plan`), and makes the
graph outputs the per-BN batch mean, biased batch variance (both ``(C,)``) and ``Shape(X)``,
so only vectors of length C leave the runtime and onnxruntime drops the nodes after the last
selected BN. BNs that are not selected stay in inference mode. The result keeps an explicit
map from each BN to its outputs (:class:`CollectionModel`), so results are never paired by
parsing names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_tools.batchnorms import BatchNormInfo, check_supported, find_batchnorms
from onnx_tools.errors import ModelError
from onnx_tools.graph import UniqueNamer, domain_opset
from onnx_tools.options import arg
from onnx_tools.rewrite.emit import (
    Emitter,
    emit_normalization,
    emit_statistics,
    emit_training_kernel,
)
from onnx_tools.rewrite.plan import (
    STAGE_LIMIT,
    TypeAndDims,
    bn_input_shapes,
    plan_reduction,
    training_kernel_fits,
)

logger = logging.getLogger(__name__)

EXPORT_ADVICE_SHORT = (
    "it was probably folded into Conv/Gemm at export (`bnref-onnx inspect` says how to export "
    "with BN kept, and lists the layers `bnref-onnx unfold` would give a BN back)"
)


#: How a BN's statistics are computed (:attr:`StatOutputs.route`).
TRAINING_KERNEL = "training_kernel"  # onnxruntime's CPU training-mode BatchNormalization
PRIMITIVE = "primitive"  # staged ReduceMean / Sub / MatMul, then inference-mode BN


@dataclass(frozen=True)
class StatOutputs:
    """Graph output names carrying one BN's batch statistics: mean, variance, ``Shape(X)``.

    ``route`` says which nodes compute them: :data:`TRAINING_KERNEL` or :data:`PRIMITIVE`.
    """

    mean: str
    var: str
    shape: str
    route: str = PRIMITIVE


@dataclass
class CollectionModel:
    """The rewritten model and an explicit map from each BN to the outputs added for it.

    ``outputs`` maps BN key (output tensor name) to its :class:`StatOutputs`, so results are
    never paired by parsing names; ``input_types`` the element type and dimensions of each
    selected BN's input, by input name, as the rewrite planned them; ``feeds`` the constant
    values of the graph inputs the rewrite added (the training kernel's unused running
    statistics), to pass to every ``session.run`` beside the data.
    """

    model: onnx.ModelProto
    bns: list[BatchNormInfo]
    outputs: dict[str, StatOutputs]
    input_types: dict[str, TypeAndDims] = field(default_factory=dict)
    feeds: dict[str, np.ndarray] = field(default_factory=dict)

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
        raise ModelError(f"invalid {arg('include')}/{arg('exclude')} regular expression: "
                         f"{err}") from err

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


def _runnable_selection(
    model: onnx.ModelProto, bns: list[BatchNormInfo] | None, include: str | None,
    exclude: str | None, base_dir: str | None,
) -> tuple[onnx.ModelProto, list[BatchNormInfo]]:
    """The model onnxruntime can run and its selected BNs (found in *that* model)."""
    check_supported(model)
    work = upgrade_old_opset(model)
    if bns is None or work is not model:  # the converter may renumber nodes: find them anew
        bns = find_batchnorms(work, base_dir)
    if not bns:
        raise ModelError(f"the model has no BatchNormalization node: {EXPORT_ADVICE_SHORT}")
    chosen = select_batchnorms(bns, include, exclude)
    if not chosen:
        names = ", ".join(bn.label for bn in bns[:8])
        raise ModelError(
            f"the {arg('include')}/{arg('exclude')} patterns select none of the {len(bns)} "
            "BatchNormalization "
            f"nodes ({names}{' ...' if len(bns) > 8 else ''})"
        )
    return work, chosen


def _check_supported(bn: BatchNormInfo, elem: int | None, consumers: set[str]) -> None:
    """Refuse what the rewrite cannot express faithfully."""
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


def _training_kernel_applies(bn: BatchNormInfo, info: TypeAndDims, batch_size: int | None) -> bool:
    """The BN can run as onnxruntime's training-mode kernel without losing accuracy."""
    elem, dims = info
    if bn.channels is None or not training_kernel_fits(elem, dims, batch_size):
        return False
    # Its mean/var are fed in X's type; scale/bias must be X's type too (opset 15 allows
    # others; onnxruntime's CPU kernel does not).
    stored = [bn.values.get(role) for role in ("scale", "bias")]
    return all(v is None or v.dtype == helper.tensor_dtype_to_np_dtype(elem) for v in stored)


def _rewrite_bn(em: Emitter, node: onnx.NodeProto, bn: BatchNormInfo, info: TypeAndDims,
                stage_limit: int, flat: str, training_kernel: bool,
                batch_size: int | None) -> tuple[StatOutputs, int]:
    """Emit one BN's statistics and normalization; return its outputs and their type."""
    elem, dims = info
    if training_kernel and _training_kernel_applies(bn, info, batch_size):
        mean, var = emit_training_kernel(em, node, int(elem), int(bn.channels), em.opset)
        shape = em.node("Shape", [bn.input], "shape")
        return StatOutputs(mean, var, shape, TRAINING_KERNEL), int(elem)
    half = elem == TensorProto.FLOAT16
    # The type the BN node normalizes in, and the type the statistics accumulate in.
    ntype = TensorProto.DOUBLE if elem == TensorProto.DOUBLE else TensorProto.FLOAT
    plan = plan_reduction(dims, stage_limit)
    ctype = TensorProto.DOUBLE if plan.wide else ntype
    if plan.wide and plan.stages and ntype != TensorProto.DOUBLE:  # (N, C) is cheap anyway
        logger.info("BatchNormalization %r: statistics accumulate in float64 (shape %s)",
                    bn.label, dims)
    x = bn.input
    if half:
        # float16 squares overflow above ~256: reduce and normalize in float32.
        x = em.node("Cast", [x], "x32", to=TensorProto.FLOAT)
    xs = x if ctype == ntype else em.node("Cast", [x], "x64", to=ctype)
    mean, var = emit_statistics(em, xs, plan, ctype, flat)  # float64
    shape = em.node("Shape", [bn.input], "shape")
    bn_mean, bn_var = mean, var
    if ntype != TensorProto.DOUBLE:
        bn_mean = em.node("Cast", [mean], "mean_n", to=ntype)
        bn_var = em.node("Cast", [var], "var_n", to=ntype)
    emit_normalization(em, node, x, bn_mean, bn_var, half)
    return StatOutputs(mean, var, shape), TensorProto.DOUBLE


def _assemble(out: onnx.ModelProto, new_nodes: dict[int, list[onnx.NodeProto]],
              inits: list[TensorProto], inputs: list[onnx.ValueInfoProto],
              outputs: dict[str, StatOutputs], ctypes: dict[str, int]) -> None:
    """Splice the new nodes and inputs in, replace the graph outputs by the statistics."""
    graph = out.graph
    graph.input.extend(inputs)
    rebuilt: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        rebuilt.extend(new_nodes.get(i, [node]))
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


def build_collection_model(
    model: onnx.ModelProto,
    *,
    include: str | None = None,
    exclude: str | None = None,
    base_dir: str | None = None,
    stage_limit: int = STAGE_LIMIT,
    bns: list[BatchNormInfo] | None = None,
    training_kernel: bool = False,
    batch_size: int | None = None,
) -> CollectionModel:
    """Rewrite the selected BNs of ``model`` (not modified) into training-mode form.

    ``bns``: the model's BNs when the caller already found them (``find_batchnorms``), so
    they are not searched again. ``stage_limit`` is the longest float32 accumulation
    (:func:`~onnx_tools.rewrite.plan.plan_reduction`). ``training_kernel``: the model will
    run on onnxruntime's CPU provider only, so each BN within the bounds of
    :func:`~onnx_tools.rewrite.plan.training_kernel_fits` (for batches of ``batch_size``
    where the model's batch dimension is dynamic) uses onnxruntime's training-mode kernel;
    the rest, and every BN without it, get the primitive-operator route. Raises :class:`ModelError` for a model
    without (selected) BN, a BN inside an If/Loop/Scan body, a BN with training_mode=1 or
    spatial=0, extra BN outputs that something reads, or bfloat16 inputs.
    """
    work, chosen = _runnable_selection(model, bns, include, exclude, base_dir)
    out = onnx.ModelProto()
    out.CopyFrom(work)
    graph = out.graph
    namer = UniqueNamer(out)
    info, batch_first = bn_input_shapes(out, chosen)
    consumers = {n for node in graph.node for n in node.input}
    consumers |= {o.name for o in graph.output}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    inits: list[TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    feeds: dict[str, np.ndarray] = {}
    outputs: dict[str, StatOutputs] = {}
    ctypes: dict[str, int] = {}
    flat = namer("bnref_flat_shape")
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), flat))
    opset = domain_opset(work)
    for bn in chosen:
        _check_supported(bn, info[bn.input][0], consumers)
        em = Emitter(namer(f"bnref_{len(outputs)}"), opset, namer, inits)
        # A first axis not known to be the batch may hold any number of rows: no batch bound.
        batch = batch_size if bn.input in batch_first else None
        stat, ctype = _rewrite_bn(em, graph.node[bn.index], bn, info[bn.input], stage_limit, flat,
                                  training_kernel, batch)
        new_nodes[bn.index] = em.nodes
        inputs += em.inputs
        feeds.update(em.feeds)
        outputs[bn.key], ctypes[bn.key] = stat, ctype
    _assemble(out, new_nodes, inits, inputs, outputs, ctypes)
    routes = [o.route for o in outputs.values()]
    logger.debug("collection model: %d BN(s) by onnxruntime's training-mode kernel, %d by "
                 "primitive operators", routes.count(TRAINING_KERNEL), routes.count(PRIMITIVE))
    return CollectionModel(out, chosen, outputs, info, feeds)
