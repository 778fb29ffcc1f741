"""Build the *collection model*: selected BNs normalize with their own batch statistics.

For a selected BN with input ``X`` of shape ``(N, C, *spatial)`` the rewrite inserts, before
the (kept) BN node::

    Xr     = Reshape(X, [0, 0, -1])                         # (N, C, S), S = prod(spatial)
    m_s    = ReduceMean(Xr, axes=[2])                       # per-sample channel means
    m      = ReduceMean(m_s, axes=[0])                      # batch mean, (1, C, 1)
    D      = Xr - m
    v      = ReduceMean(ReduceSumSquare(D, axes=[2]), axes=[0]) / S   # biased variance
    Y      = BatchNormalization(X, scale, bias, m, v)       # inference kernel, batch stats

and adds ``m``, ``v`` (as ``(C,)``) and ``Shape(Xr)`` as graph outputs, so only vectors of
length C leave the runtime. The formula is training-mode BN (eps inside the square root,
biased variance); it never uses ``training_mode=1``, which onnxruntime's CUDA provider refuses
from opset 14 and whose CPU kernel writes the running statistics into its (possibly shared)
inputs. Two decisions keep the float32 statistics accurate:

* two passes (mean first, then squared deviations) avoid the cancellation of E[x²]−E[x]²;
* the hierarchical reduction (spatial axis per sample, then batch) keeps every float32
  accumulation short: onnxruntime's float32 ReduceMean accumulates in float32 and loses
  ~0.7 relative accuracy at 10⁸ values per channel, but is exact to ~1e-7 at 10⁷.

float16 inputs are cast to float32 for the reductions and the normalization, and the result
cast back; bfloat16 is refused (onnxruntime's CPU build has no bfloat16 kernels). BNs that are
not selected stay in inference mode. Graph outputs of the collection model are only the
statistics, so onnxruntime drops nodes after the last selected BN.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_tools.errors import ModelError
from onnx_tools.graph import (
    BatchNormInfo,
    batchnorms_in_subgraphs,
    domain_opset,
    find_batchnorms,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatOutputs:
    """Graph output names carrying one BN's batch statistics."""

    mean: str
    var: str
    shape: str


@dataclass
class CollectionModel:
    """The rewritten model and an explicit map from each added output to its BN.

    ``outputs`` maps BN key (output tensor name) to its :class:`StatOutputs`; ``owner`` maps
    every added output name back to the BN key, so results are never paired by parsing names.
    """

    model: onnx.ModelProto
    bns: list[BatchNormInfo]
    outputs: dict[str, StatOutputs]
    owner: dict[str, str] = field(default_factory=dict)

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


class _Namer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        graph = model.graph
        for node in graph.node:
            self.used.update(node.input)
            self.used.update(node.output)
            self.used.add(node.name)
        self.used.update(t.name for t in graph.initializer)
        self.used.update(v.name for v in graph.input)
        self.used.update(v.name for v in graph.output)
        self.used.update(v.name for v in graph.value_info)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _reduce(op: str, x: str, out: str, axes: list[int], opset: int, namer: _Namer,
            inits: list[TensorProto], keepdims: int = 1) -> onnx.NodeProto:
    """Make a Reduce node; ``axes`` is an attribute before opset 18 (ReduceSum: 13)."""
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_as_input:
        axes_name = namer(f"{out}_axes")
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        return helper.make_node(op, [x, axes_name], [out], name=namer(out), keepdims=keepdims)
    return helper.make_node(op, [x], [out], name=namer(out), axes=axes, keepdims=keepdims)


def _elem_type(model: onnx.ModelProto, name: str) -> int | None:
    graph = model.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.name == name and vi.type.HasField("tensor_type"):
            return vi.type.tensor_type.elem_type or None
    for init in graph.initializer:
        if init.name == name:
            return init.data_type
    return None


def _input_types(model: onnx.ModelProto, bns: list[BatchNormInfo]) -> dict[str, int | None]:
    """Element type of each BN input X, via shape inference where the graph does not say."""
    wanted = {bn.input for bn in bns}
    types = {name: _elem_type(model, name) for name in wanted}
    if any(t is None for t in types.values()):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            types = {name: types[name] or _elem_type(inferred, name) for name in wanted}
        except Exception:  # custom domains can defeat shape inference
            logger.debug("shape inference failed", exc_info=True)
    for bn in bns:
        if types[bn.input] is None:
            scale = bn.values.get("scale")
            if scale is not None:
                types[bn.input] = helper.np_dtype_to_tensor_dtype(scale.dtype)
    return types


def build_collection_model(
    model: onnx.ModelProto,
    *,
    include: str | None = None,
    exclude: str | None = None,
    base_dir: str | None = None,
) -> CollectionModel:
    """Rewrite the selected BNs of ``model`` (not modified) into training-mode form.

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
    namer = _Namer(out)
    types = _input_types(out, bns)
    consumers = {n for node in graph.node for n in node.input}
    consumers |= {o.name for o in graph.output}

    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    inits: list[TensorProto] = []
    outputs: dict[str, StatOutputs] = {}
    owner: dict[str, str] = {}
    ctypes: dict[str, int] = {}
    shape_const = namer("bnref_ncs_shape")
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), shape_const))
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
        elem = types.get(bn.input)
        if elem == TensorProto.BFLOAT16:
            raise ModelError(
                f"BatchNormalization {bn.label!r} runs in bfloat16; onnxruntime's CPU build has "
                "no bfloat16 kernels for it. Convert the model to float32 or float16"
            )
        half = elem == TensorProto.FLOAT16
        ctype = TensorProto.DOUBLE if elem == TensorProto.DOUBLE else TensorProto.FLOAT
        if elem not in (None, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            raise ModelError(
                f"BatchNormalization {bn.label!r} has input type "
                f"{TensorProto.DataType.Name(elem)}; expected float, float16 or double"
            )
        base = namer(f"bnref_{len(outputs)}")
        nodes: list[onnx.NodeProto] = []
        x = bn.input
        if half:
            x32 = namer(f"{base}_x32")
            nodes.append(helper.make_node("Cast", [x], [x32], name=namer(x32),
                                          to=TensorProto.FLOAT))
            x = x32
        xr = namer(f"{base}_xr")
        nodes.append(helper.make_node("Reshape", [x, shape_const], [xr], name=namer(xr)))
        ms = namer(f"{base}_sample_mean")
        nodes.append(_reduce("ReduceMean", xr, ms, [2], opset, namer, inits))
        m3 = namer(f"{base}_mean3")
        nodes.append(_reduce("ReduceMean", ms, m3, [0], opset, namer, inits))
        d = namer(f"{base}_dev")
        nodes.append(helper.make_node("Sub", [xr, m3], [d], name=namer(d)))
        ss = namer(f"{base}_sample_ss")
        nodes.append(_reduce("ReduceSumSquare", d, ss, [2], opset, namer, inits))
        ssm = namer(f"{base}_ss_mean")
        nodes.append(_reduce("ReduceMean", ss, ssm, [0], opset, namer, inits))
        shape = namer(f"{base}_shape")
        nodes.append(helper.make_node("Shape", [xr], [shape], name=namer(shape)))
        s_idx = namer(f"{base}_s_index")
        inits.append(numpy_helper.from_array(np.array(2, dtype=np.int64), s_idx))
        s_int = namer(f"{base}_s")
        nodes.append(helper.make_node("Gather", [shape, s_idx], [s_int], name=namer(s_int)))
        s_f = namer(f"{base}_s_float")
        nodes.append(helper.make_node("Cast", [s_int], [s_f], name=namer(s_f), to=ctype))
        v3 = namer(f"{base}_var3")
        nodes.append(helper.make_node("Div", [ssm, s_f], [v3], name=namer(v3)))
        mean = namer(f"{base}_batch_mean")
        nodes.append(helper.make_node("Reshape", [m3, flat_const], [mean], name=namer(mean)))
        var = namer(f"{base}_batch_var")
        nodes.append(helper.make_node("Reshape", [v3, flat_const], [var], name=namer(var)))

        if half:
            # Normalize in float32 with float32 copies of scale/bias, cast Y back to float16.
            scale32 = namer(f"{base}_scale32")
            bias32 = namer(f"{base}_bias32")
            nodes.append(helper.make_node("Cast", [node.input[1]], [scale32],
                                          name=namer(scale32), to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Cast", [node.input[2]], [bias32],
                                          name=namer(bias32), to=TensorProto.FLOAT))
            y32 = namer(f"{base}_y32")
            bn_node = onnx.NodeProto()
            bn_node.CopyFrom(node)
            del bn_node.input[:]
            bn_node.input.extend([x, scale32, bias32, mean, var])
            del bn_node.output[:]
            bn_node.output.append(y32)
            nodes.append(bn_node)
            nodes.append(helper.make_node("Cast", [y32], [node.output[0]],
                                          name=namer(f"{base}_y16"), to=TensorProto.FLOAT16))
            new_nodes[bn.index] = nodes
        else:
            node.input[3] = mean
            node.input[4] = var
            del node.output[1:]
            new_nodes[bn.index] = [*nodes, node]
        stat = StatOutputs(mean, var, shape)
        ctypes[bn.key] = ctype
        outputs[bn.key] = stat
        for name in (mean, var, shape):
            owner[name] = bn.key

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
        graph.output.append(helper.make_tensor_value_info(stat.shape, TensorProto.INT64, [3]))
    # Stale shape annotations of rewired BN outputs would be wrong for float16; drop them all.
    del graph.value_info[:]
    if out.ir_version < 4:
        # IR < 4 wants every initializer listed as a graph input; the collection model only
        # lives in memory, so declare the IR version that allows the added constants.
        out.ir_version = 4
    return CollectionModel(out, bns, outputs, owner)


EXPORT_ADVICE_SHORT = (
    "it was probably folded into Conv/Gemm at export (run `bnref-onnx inspect` for how to "
    "export with BN kept)"
)
