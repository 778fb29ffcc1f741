"""Where a tensor of an ONNX graph lives, who reads it, and fresh names for new tensors.

An exported model stores a BN's scale, bias, running mean and running variance in one of
several ways, and :meth:`GraphIndex.resolve` resolves each of them to a :class:`TensorSource`:

``initializer``
    a graph initializer (the common case);
``input``
    a graph input with an initializer default (IR version < 4 lists every initializer as a
    graph input; a user may feed it, so it is reported);
``constant``
    the output of a ``Constant`` node (paddle2onnx, torch ``affine=False``);
``identity``
    an ``Identity`` chain ending at one of the above (TorchScript export of a freshly
    initialized model aliases ``running_var`` to the scale and ``running_mean`` to the bias);
``computed`` / ``fed``
    produced by another node or fed at run time without a default: collection still works,
    but new statistics cannot be written there.

A source is *shared* when anything other than this one BN input reads the stored tensor or
a tensor of its Identity chain (another node, another input of the same BN, a graph output, a
subgraph); :mod:`onnx_tools.apply` never writes into a shared tensor.
"""


from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_tools.errors import ModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSource:
    """Where one BN input tensor is stored.

    ``name`` is the tensor the BN reads; ``storage`` the initializer, graph input or Constant
    output holding its value (equal to ``name`` unless an Identity chain is in between);
    ``constant_node`` the index of the Constant node for kind ``constant``; ``chain`` the
    Identity node indices from storage to BN; ``shared_with`` who else reads the storage or the
    chain (node names, ``output:NAME`` or ``subgraph:NODE``).
    """

    kind: str
    name: str
    storage: str
    constant_node: int | None = None
    chain: tuple[int, ...] = ()
    shared_with: tuple[str, ...] = ()

    @property
    def shared(self) -> bool:
        """True when writing into ``storage`` would change what another reader sees."""
        return bool(self.shared_with)

    @property
    def writable(self) -> bool:
        """True when the value is stored in the model (it can be read and replaced)."""
        return self.kind in ("initializer", "input", "constant")

    def describe(self) -> str:
        """Human-readable one-word-ish location, e.g. ``identity(initializer W), shared``."""
        text = self.kind
        if self.chain:
            text = f"identity({self.kind} {self.storage})"
        if self.shared_with:
            text += f", shared with {', '.join(self.shared_with)}"
        return text

def domain_opset(model: onnx.ModelProto, domain: str = "") -> int:
    """Opset version imported for ``domain`` (``""`` and ``ai.onnx`` are the same)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and domain in ("", "ai.onnx"):
            return int(imp.version)
        if imp.domain == domain:
            return int(imp.version)
    raise ModelError(f"model does not import the ONNX domain {domain!r}")

def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of an If/Loop/Scan (graph-valued attributes) of ``node``."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _names_used_in(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a (sub)graph reads, including implicit outer-scope reads."""
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in subgraphs(node):
            used |= _names_used_in(sub)
    used.update(o.name for o in graph.output)
    return used

def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node (``value``/``value_float(s)``), else None."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
    return None

class GraphIndex:
    """Producer/consumer maps of the main graph, built once per model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.subgraph_readers: dict[str, list[str]] = defaultdict(list)
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for k, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((i, k))
            for sub in subgraphs(node):
                for name in _names_used_in(sub):
                    self.subgraph_readers[name].append(node.name or f"#{i}")

    def node_label(self, i: int) -> str:
        """Node name, or ``#index`` for unnamed nodes."""
        node = self.model.graph.node[i]
        return node.name or f"#{i}"

    def readers(self, name: str) -> list[str]:
        """Everyone reading tensor ``name``: ``(node index, input index)`` labels and outputs."""
        labels = [f"{self.node_label(i)}[{k}]" for i, k in self.consumers.get(name, [])]
        labels += [f"subgraph:{n}" for n in self.subgraph_readers.get(name, [])]
        if name in self.outputs:
            labels.append(f"output:{name}")
        return labels

    def resolve(self, bn_index: int, input_index: int) -> TensorSource:
        """Resolve input ``input_index`` of node ``bn_index`` to its storage."""
        graph = self.model.graph
        name = graph.node[bn_index].input[input_index]
        me = f"{self.node_label(bn_index)}[{input_index}]"
        chain: list[int] = []
        shared: list[str] = []
        current, reader = name, me
        while True:
            others = [r for r in self.readers(current) if r != reader]
            shared.extend(others)
            prod = self.producer.get(current)
            if prod is not None and graph.node[prod].op_type == "Identity" and (
                graph.node[prod].domain in ("", "ai.onnx")
            ):
                chain.insert(0, prod)
                reader = f"{self.node_label(prod)}[0]"
                current = graph.node[prod].input[0]
                continue
            break
        shared_t = tuple(dict.fromkeys(shared))
        if current in self.initializers:
            kind = "input" if current in self.inputs else "initializer"
            return TensorSource(kind, name, current, None, tuple(chain), shared_t)
        prod = self.producer.get(current)
        if prod is not None and graph.node[prod].op_type == "Constant":
            if constant_value(graph.node[prod]) is not None:
                return TensorSource("constant", name, current, prod, tuple(chain), shared_t)
        if current in self.inputs:
            return TensorSource("fed", name, current, None, tuple(chain), shared_t)
        return TensorSource("computed", name, current, None, tuple(chain), shared_t)

    def value(self, src: TensorSource, base_dir: str | None = None) -> np.ndarray | None:
        """Return the stored value of a source (None for ``computed``/``fed``)."""
        if src.kind in ("initializer", "input"):
            tensor = self.initializers[src.storage]
            return numpy_helper.to_array(tensor, base_dir or "")
        if src.kind == "constant":
            assert src.constant_node is not None
            return constant_value(self.model.graph.node[src.constant_node])
        return None

class UniqueNamer:
    """Hands out names not used anywhere in ``model``'s main graph.

    Names are ``base``, ``base_1``, ...; every name returned is reserved, so calls never collide.
    """

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
        """Return a fresh name starting with ``base`` and reserve it."""
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

def attribute(node: onnx.NodeProto, name: str, default):
    """The value of attribute ``name`` of ``node``, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def tensor_dims(vi: onnx.ValueInfoProto | None) -> list[int | str | None] | None:
    """Declared dimensions of a tensor ValueInfo: the one rule for every reader of shapes.

    A positive ``dim_value`` is static (``int``); anything else is symbolic: the
    ``dim_param`` name (``str``) where there is one, else None (``dim_value <= 0``, as
    paddle2onnx writes ``-1``, or nothing set). None as a whole when no shape is declared
    (or ``vi`` is not a tensor).
    """
    if vi is None or not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0
            else (d.dim_param or None) if d.HasField("dim_param") else None
            for d in tt.shape.dim]


def tensor_type_and_dims(vi: onnx.ValueInfoProto | None) -> tuple[int | None, list[int | None] | None]:
    """Element type (``TensorProto`` enum) and dimensions of a ValueInfo (None where unknown).

    A dimension is None unless it has a positive ``dim_value`` (:func:`tensor_dims`); the
    dimension list is None when no shape is declared at all.
    """
    if vi is None or not vi.type.HasField("tensor_type"):
        return None, None
    elem = vi.type.tensor_type.elem_type or None
    dims = tensor_dims(vi)
    return elem, None if dims is None else [d if isinstance(d, int) else None for d in dims]


def constant_tensors(model: onnx.ModelProto, index: GraphIndex | None = None) -> set[str]:
    """Tensors known before any input: initializers, Constant outputs and what only they make.

    The last covers exporters' aliases of deduplicated weights through Identity nodes.
    """
    index = index or GraphIndex(model)
    const = set(index.initializers)
    for node in model.graph.node:
        if node.op_type == "Constant" or (
            any(node.input) and all(n in const for n in node.input if n)
            and not any(True for _ in subgraphs(node))
        ):
            const.update(o for o in node.output if o)
    return const
