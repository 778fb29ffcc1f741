"""The model fingerprint a STATS file carries, so statistics are applied to their own model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import onnx


def _attr_signature(attr: onnx.AttributeProto) -> Any:
    """Attribute content without tensor values (statistics may live in Constant nodes)."""
    if attr.type == onnx.AttributeProto.TENSOR:
        return ["tensor", attr.t.data_type, list(attr.t.dims)]
    if attr.type == onnx.AttributeProto.GRAPH:
        return ["graph", _graph_signature(attr.g)]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return ["graphs", [_graph_signature(g) for g in attr.graphs]]
    if attr.type in (onnx.AttributeProto.TENSORS, onnx.AttributeProto.SPARSE_TENSOR):
        return ["tensors"]
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
    return value


def _graph_signature(graph: onnx.GraphProto) -> list[Any]:
    return [
        [
            [n.domain, n.op_type, n.name, list(n.input), list(n.output),
             sorted([a.name, _attr_signature(a)] for a in n.attribute)]
            for n in graph.node
        ],
        sorted([t.name, t.data_type, list(t.dims)] for t in graph.initializer),
        [i.name for i in graph.input],
        [o.name for o in graph.output],
    ]


def model_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph structure: nodes, names, attributes, tensor shapes, opsets.

    Statistic *values* are left out (initializer contents and Constant values), so collecting
    and then applying on the same model agree, while any other graph is told apart.
    """
    sig = [
        sorted([o.domain, o.version] for o in model.opset_import),
        _graph_signature(model.graph),
    ]
    text = json.dumps(sig, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
