"""Where a folded model had its BatchNormalization: the *sites* ``unfold`` inserts BNs at.

An exporter that folds BN into the preceding convolution leaves a Conv whose weights and bias
absorbed the BN; nothing in the graph says which convolutions had one. :func:`find_sites`
decides from the graph's structure, by four rules, each one a pattern of a convolution that
never had a BN:

1. its output is a graph output (a head ends there);
2. it already feeds a BatchNormalization, directly or through operators that do not change
   what a BN sees per channel up to an affine map (Concat, AveragePool, Add, Pad, Reshape,
   Transpose, ...), but no nonlinearity: DenseNet's and pre-activation ResNets' convolutions
   that feed the next layer's BN-ReLU-Conv;
3. its input is *pooled*: derived from a global pooling (GlobalAveragePool, ReduceMean, ...)
   through operators that keep the pooled shape: squeeze-and-excitation gates (MobileNetV3,
   EfficientNet, RegNetY) and classifier convolutions after pooling;
4. its output reaches a graph output through linear or structural operators only (and final
   Softmax/Sigmoid): detection box/score heads, final 1x1 classifier convolutions.

On every torchvision architecture of the test corpus (ResNet-18, MobileNetV3-small,
EfficientNet-B0, DenseNet-121, ShuffleNetV2, RegNetY-400MF, MNASNet) the sites found equal
exactly the convolutions that had a BN in the BN-kept export (``tests/corpus/test_unfold.py``).
A model where the rules are wrong is fixed with ``sites_include`` / ``sites_exclude``
(``--sites-include`` / ``--sites-exclude``), regular expressions on the node or output name:
the sites are the rule's, minus those ``sites_exclude`` matches, plus every candidate
``sites_include`` matches.

Gemm and MatMul (a BN1d folded into a fully connected layer) are candidates only with
``linear_sites`` (``--linear-sites``); rule 3 does not apply to them (a fully connected layer
after pooling is where BN1d sits), and a MatMul only where its output is 2-D (N, C).

Partial folds: a layer followed by element-wise Mul/Add/Sub/Div with per-channel constants
(a BN exported as Mul+Add, or the part of it a simplifier did not fold: onnxsim leaves
Conv -> Add, Conv -> Sub -> Mul -> Add) is a site whose ``through`` names that chain. The
chain is a per-channel affine map, so a BN anywhere on it gives the same recalibrated model
(up to eps'); the BN goes on the layer's own output, where onnxruntime fuses it into the
layer (it fuses none after a Sub, nor after a ConvTranspose's Mul/Add), and the rules look
at the chain's end (rule 2 also passes Mul/Div by constants), as do ``sites_include`` and
``sites_exclude`` (the end is the BN's output name in the BN-kept export).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_tools.errors import OptionError
from onnx_tools.graph import GraphIndex, attribute, constant_tensors, constant_value, tensor_type_and_dims
from onnx_tools.options import arg, checked

#: Convolutions (always candidates) and fully connected layers (with ``linear_sites``).
CONV_OPS = ("Conv", "ConvTranspose")
LINEAR_OPS = ("Gemm", "MatMul")

#: Operators that change what a downstream BN sees per channel by at most an affine map: a
#: convolution reaching a BN through these alone was normalized there, not by a BN of its own.
_AFFINE_PASS = frozenset({
    "Identity", "Concat", "AveragePool", "Pad", "Reshape", "Flatten", "Transpose", "Slice",
    "Split", "Squeeze", "Unsqueeze", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth",
    "Dropout", "Cast", "Add", "Sum", "Sub",
})
#: Operators a head's output passes through on its way to a graph output (rule 4).
_HEAD_PASS = _AFFINE_PASS | {"Softmax", "LogSoftmax", "Sigmoid", "Mul", "Div", "Gather",
                             "Expand", "Tile", "GlobalAveragePool", "ReduceMean"}
#: Operators whose output is pooled over the spatial axes (rule 3).
_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean",
                    "ReduceMax", "ReduceL2", "ReduceSum"})
#: Element-wise operators of a partial fold's per-channel affine chain (Div: divisor constant).
_CHAIN_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
#: BatchNormalization in the default domain.
_BN = "BatchNormalization"


@dataclass(frozen=True)
class Site:
    """One folded layer: a BN goes after node ``index`` (``op_type``) on tensor ``output``.

    ``channels``: output channels, the new BN's length; ``elem``: the weights' element type
    (the inserted BN's tensors take it, so onnxruntime can fold the BN back into the node);
    ``through``: the per-channel Mul/Add/Sub/Div chain of a partial fold after the layer
    (node names, or outputs where unnamed), ending at tensor ``end`` (``output`` if none).
    """

    index: int
    node_name: str
    op_type: str
    output: str
    channels: int
    elem: int
    through: tuple[str, ...] = ()
    end: str = ""

    @property
    def label(self) -> str:
        """Name for messages: the node name, else its output."""
        return self.node_name or self.output

    def to_dict(self) -> dict:
        """JSON-ready (``inspect --json``, provenance)."""
        out = {"node": self.node_name, "op_type": self.op_type, "output": self.output,
               "channels": self.channels}
        if self.through:
            out["through"] = list(self.through)
        return out


def _weight(index: GraphIndex, name: str) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node, maybe behind Identity)."""
    nodes = index.model.graph.node
    producer = index.producer.get(name)
    while producer is not None and nodes[producer].op_type == "Identity":
        name = nodes[producer].input[0]  # exporters alias deduplicated weights
        producer = index.producer.get(name)
    init = index.initializers.get(name)
    if init is not None:
        if init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data:
            return _external_stub(init)
        return onnx.numpy_helper.to_array(init)
    if producer is not None and nodes[producer].op_type == "Constant":
        return constant_value(nodes[producer])
    return None


def _external_stub(init: onnx.TensorProto) -> np.ndarray:
    """An external initializer not loaded: a zero view of its shape and type (all sites need)."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.broadcast_to(np.zeros((), dtype), tuple(init.dims))


def _channels(node: onnx.NodeProto, w: np.ndarray, out_dims: list[int | None] | None) -> int | None:
    """Output channels of a Conv/ConvTranspose/Gemm/MatMul from its weight."""
    if node.op_type == "Conv":
        return int(w.shape[0]) if w.ndim >= 3 else None
    if node.op_type == "ConvTranspose":
        return int(w.shape[1]) * int(attribute(node, "group", 1)) if w.ndim >= 3 else None
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        return int(w.shape[0] if attribute(node, "transB", 0) else w.shape[1])
    if out_dims is None or len(out_dims) != 2:  # MatMul: only (N, K) @ (K, C)
        return None
    return int(w.shape[1])


def _reaches(index: GraphIndex, start: str, through, goal) -> bool:
    """Whether ``goal(node, name)`` holds on a path from ``start`` where ``through`` holds."""
    seen, queue = {start}, deque([start])
    nodes = index.model.graph.node
    while queue:
        name = queue.popleft()
        for i, _slot in index.consumers.get(name, []):
            node = nodes[i]
            if goal(node, name):
                return True
            if through(node, name):
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        queue.append(out)
    return False


def _reaches_output(index: GraphIndex, start: str) -> bool:
    """Rule 4: a path of head operators from ``start`` to a graph output."""
    if start in index.outputs:
        return True
    seen, queue = {start}, deque([start])
    nodes = index.model.graph.node
    while queue:
        name = queue.popleft()
        for i, _slot in index.consumers.get(name, []):
            if nodes[i].op_type not in _HEAD_PASS:
                continue
            for out in nodes[i].output:
                if out in index.outputs:
                    return True
                if out and out not in seen:
                    seen.add(out)
                    queue.append(out)
    return False


def _pooled_tensors(model: onnx.ModelProto, const: set[str]) -> set[str]:
    """Rule 3: tensors derived from a global pooling through shape-keeping operators.

    A node's outputs are pooled when it pools, or when every one of its non-constant inputs
    is pooled (so ``Mul(features, gate)`` is not: the features are not pooled).
    """
    pooled: set[str] = set()
    for node in model.graph.node:
        dynamic = [n for n in node.input if n and n not in const]
        if node.op_type in _POOLS and (node.op_type.startswith("Global")
                                       or attribute(node, "keepdims", 1)):
            pooled.update(node.output)
        elif dynamic and all(n in pooled for n in dynamic):
            pooled.update(node.output)
    return pooled


def _compile(pattern: str | None, what: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise OptionError(f"invalid {arg(what)} regular expression {pattern!r}: {err}") from err


def _per_channel(value: np.ndarray, rank: int, channels: int) -> bool:
    """Whether a constant broadcast against an (N, C, ...) tensor of ``rank`` is per channel."""
    if value.ndim > rank:
        return False
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    return shape[0] == 1 and shape[1] in (1, channels) and all(d == 1 for d in shape[2:])


def _chain(index: GraphIndex, start: str, rank: int, channels: int) -> list[int]:
    """The per-channel affine chain after a layer output: Mul/Add/Sub/Div by constants.

    Followed while the tensor has one reader and is not a graph output (a BN at the chain's
    end then changes nothing any other reader sees), and only for constants that broadcast
    per channel (a per-position constant is not an affine map of a channel's values).
    """
    chain, name, nodes = [], start, index.model.graph.node
    while name not in index.outputs and not index.subgraph_readers.get(name):
        readers = index.consumers.get(name, [])
        if len(readers) != 1:
            break
        i, slot = readers[0]
        node = nodes[i]
        if (node.op_type not in _CHAIN_OPS or node.domain not in ("", "ai.onnx")
                or len(node.input) != 2 or node.input[0] == node.input[1]
                or (node.op_type == "Div" and slot != 0)):
            break
        other = _weight(index, node.input[1 - slot])
        if other is None or not _per_channel(other, rank, channels):
            break
        chain.append(i)
        name = node.output[0]
    return chain


def _candidates(model: onnx.ModelProto, index: GraphIndex, linear_sites: bool,
                out_types: dict[str, tuple]) -> list[Site]:
    """Every Conv/ConvTranspose (and Gemm/MatMul) with a constant float weight."""
    ops = CONV_OPS + (LINEAR_OPS if linear_sites else ())
    found = []
    nodes = model.graph.node
    for i, node in enumerate(nodes):
        if node.op_type not in ops or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = _weight(index, node.input[1])
        if w is None or w.dtype not in (np.float32, np.float16, np.float64):
            continue
        channels = _channels(node, w, out_types.get(node.output[0], (None, None))[1])
        if channels is None:
            continue
        chain = _chain(index, node.output[0], w.ndim if node.op_type in CONV_OPS else 2, channels)
        found.append(Site(i, node.name, node.op_type, node.output[0], channels,
                          int(onnx.helper.np_dtype_to_tensor_dtype(w.dtype)),
                          tuple(nodes[k].name or nodes[k].output[0] for k in chain),
                          nodes[chain[-1] if chain else i].output[0]))
    return found


def _default_rule(index: GraphIndex, site: Site, pooled: set[str], const: set[str]) -> bool:
    node = index.model.graph.node[site.index]
    if site.end in index.outputs:
        return False  # rule 1 (a chain stops at a graph output: the layer's output or its end)

    def affine(n: onnx.NodeProto, name: str) -> bool:  # rule 2's path: per-channel affine ops
        return n.op_type in _AFFINE_PASS or (n.op_type in ("Mul", "Div") and list(
            n.input).count(name) == 1 and all(k == name or k in const for k in n.input))

    if _reaches(index, site.end, affine, lambda n, name: n.op_type == _BN and n.input[0] == name):
        return False  # rule 2
    if site.op_type in CONV_OPS and node.input[0] in pooled:
        return False  # rule 3
    return not _reaches_output(index, site.end)  # rule 4


def _output_types(model: onnx.ModelProto) -> dict[str, tuple]:
    """Element type and dims of every tensor shape inference can type (MatMul needs rank)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  (onnx raises several types; shapes are optional here)
        inferred = model
    g = inferred.graph
    return {vi.name: tensor_type_and_dims(vi) for vi in [*g.value_info, *g.output, *g.input]}


@checked()
def find_sites(
    model: onnx.ModelProto,
    *,
    sites_include: str | None = None,
    sites_exclude: str | None = None,
    linear_sites: bool = False,
) -> list[Site]:
    """The folded layers of ``model`` in node order (see the module docstring for the rules)."""
    inc = _compile(sites_include, "sites_include")
    exc = _compile(sites_exclude, "sites_exclude")
    index = GraphIndex(model)
    out_types = _output_types(model) if linear_sites else {}
    const = constant_tensors(model, index)
    pooled = _pooled_tensors(model, const)
    sites = []
    for site in _candidates(model, index, linear_sites, out_types):
        names = (site.node_name, site.output, site.end)
        chosen = _default_rule(index, site, pooled, const)
        if exc is not None and any(exc.search(n) for n in names if n):
            chosen = False
        if inc is not None and any(inc.search(n) for n in names if n):
            chosen = site.output not in index.outputs and not _feeds_bn(index, site)
        if chosen:
            sites.append(site)
    return sites


def _feeds_bn(index: GraphIndex, site: Site) -> bool:
    """The site's output (or its chain's end) already feeds a BatchNormalization: never a site."""
    return any(index.model.graph.node[i].op_type == _BN and slot == 0
               for name in {site.output, site.end} for i, slot in index.consumers.get(name, []))
