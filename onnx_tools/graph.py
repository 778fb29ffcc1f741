"""Find BatchNormalization nodes in an ONNX model and where their tensors live.

An exported model stores a BN's scale, bias, running mean and running variance in one of
several ways, and :func:`find_batchnorms` resolves each of them to a :class:`TensorSource`:

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
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_tools.errors import ModelError

logger = logging.getLogger(__name__)

#: Index of each BatchNormalization input, by role.
ROLES = ("scale", "bias", "mean", "var")
_ROLE_INDEX = {"scale": 1, "bias": 2, "mean": 3, "var": 4}

#: How to keep BN in an export; printed when a model has none.
EXPORT_ADVICE = (
    "it was probably folded into the preceding Conv/Gemm at export. Export with BN kept: "
    "torch.onnx.export(..., dynamo=False, training=torch.onnx.TrainingMode.PRESERVE) or "
    "do_constant_folding=False; the dynamo exporter with optimize=False; onnxsim with "
    "--skip-fuse-bn; tf2onnx without its conv-BN fusion optimizer"
)


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


@dataclass
class BatchNormInfo:
    """One BatchNormalization node of the main graph, as :func:`find_batchnorms` sees it."""

    index: int
    node_name: str
    input: str
    output: str
    opset: int
    epsilon: float
    momentum: float
    channels: int | None
    sources: dict[str, TensorSource]
    values: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)
    training_mode: bool = False
    extra_outputs: tuple[str, ...] = ()
    spatial: int = 1

    @property
    def key(self) -> str:
        """Stable identifier used in STATS files and reports: the BN's output tensor name."""
        return self.output

    @property
    def label(self) -> str:
        """Name for messages: the node name, else the output name."""
        return self.node_name or self.output

    def summary(self) -> dict[str, float | None]:
        """Summary of the stored statistics (None where they are not stored in the model)."""
        mean, var = self.values.get("mean"), self.values.get("var")
        out: dict[str, float | None] = {
            "mean_abs_mean": None,
            "var_min": None,
            "var_mean": None,
            "var_max": None,
        }
        if mean is not None:
            out["mean_abs_mean"] = float(np.mean(np.abs(mean.astype(np.float64))))
        if var is not None:
            v = var.astype(np.float64)
            out.update(var_min=float(v.min()), var_mean=float(v.mean()), var_max=float(v.max()))
        return out

    def to_dict(self) -> dict:
        """JSON-ready description (``inspect --json``)."""
        return {
            "node": self.node_name,
            "output": self.output,
            "input": self.input,
            "channels": self.channels,
            "epsilon": self.epsilon,
            "momentum": self.momentum,
            "opset": self.opset,
            "training_mode": self.training_mode,
            "storage": {
                role: {
                    "kind": src.kind,
                    "tensor": src.name,
                    "storage": src.storage,
                    "identity_chain": len(src.chain),
                    "shared_with": list(src.shared_with),
                }
                for role, src in self.sources.items()
            },
            "stats": self.summary(),
        }


def domain_opset(model: onnx.ModelProto, domain: str = "") -> int:
    """Opset version imported for ``domain`` (``""`` and ``ai.onnx`` are the same)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and domain in ("", "ai.onnx"):
            return int(imp.version)
        if imp.domain == domain:
            return int(imp.version)
    raise ModelError(f"model does not import the ONNX domain {domain!r}")


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
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
        for sub in _subgraphs(node):
            used |= _names_used_in(sub)
    used.update(o.name for o in graph.output)
    return used


def _bn_in_subgraphs(graph: onnx.GraphProto, path: str = "") -> Iterator[str]:
    for node in graph.node:
        for sub in _subgraphs(node):
            where = f"{path}{node.op_type} {node.name or '(unnamed)'} > "
            for inner in sub.node:
                if inner.op_type == "BatchNormalization" and inner.domain in ("", "ai.onnx"):
                    yield f"{where}{inner.name or inner.output[0]}"
            yield from _bn_in_subgraphs(sub, where)


def batchnorms_in_subgraphs(model: onnx.ModelProto) -> list[str]:
    """Names (with their If/Loop/Scan path) of BN nodes inside control-flow bodies."""
    return list(_bn_in_subgraphs(model.graph))


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
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
            for sub in _subgraphs(node):
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
            if _constant_value(graph.node[prod]) is not None:
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
            return _constant_value(self.model.graph.node[src.constant_node])
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


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _channels(index: GraphIndex, node: onnx.NodeProto, values: dict) -> int | None:
    for role in ROLES:
        v = values.get(role)
        if v is not None and v.ndim == 1:
            return int(v.shape[0])
    for tensor_name in node.input[1:5]:
        init = index.initializers.get(tensor_name)
        if init is not None and len(init.dims) == 1:
            return int(init.dims[0])
    return None


def find_batchnorms(model: onnx.ModelProto, base_dir: str | None = None) -> list[BatchNormInfo]:
    """All BatchNormalization nodes of the main graph, in node order, with their sources."""
    opset = domain_opset(model)
    index = GraphIndex(model)
    found: list[BatchNormInfo] = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 5 or not all(node.input[:5]):
            raise ModelError(f"BatchNormalization {node.name or i!r} does not have 5 inputs")
        sources = {role: index.resolve(i, _ROLE_INDEX[role]) for role in ROLES}
        values = {role: index.value(src, base_dir) for role, src in sources.items()}
        training = bool(_attr(node, "training_mode", 0))
        if opset < 7:
            training = not bool(_attr(node, "is_test", 0))
        extra = tuple(o for o in node.output[1:] if o)
        found.append(
            BatchNormInfo(
                index=i,
                node_name=node.name,
                input=node.input[0],
                output=node.output[0],
                opset=opset,
                epsilon=float(_attr(node, "epsilon", 1e-5)),
                momentum=float(_attr(node, "momentum", 0.9)),
                channels=_channels(index, node, values),
                sources=sources,
                values=values,
                training_mode=training,
                extra_outputs=extra,
                spatial=int(_attr(node, "spatial", 1)),
            )
        )
    return found
