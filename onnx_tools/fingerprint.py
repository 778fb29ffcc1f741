"""The model fingerprint a STATS file carries, so statistics are applied to their own model.

Collected statistics depend on everything that shapes a BN's input: the graph (nodes, their
attributes, names, opsets), every weight and constant *value*, and the declared input types
and shapes. :func:`model_fingerprint` hashes all of that, except the values of the tensors
the statistics are written into (``skip``: the running mean/var storage of the BNs that were
collected, which normalize with batch statistics during collection and so influence
nothing). A STATS file therefore applies to the model it was collected on, to that model
with other running statistics (e.g. already recalibrated once), and to nothing else: another
checkpoint of the same architecture, or an export with another input size, is refused.

Values are hashed as arrays (dtype, shape, bytes in C order), so the same tensor stored as
``raw_data`` or in typed fields, or in external data, hashes alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

#: Version of the fingerprint scheme (STATS files record it; 1 hashed structure only).
SCHEME = 2


def _tensor_digest(tensor: onnx.TensorProto) -> str:
    arr = np.ascontiguousarray(numpy_helper.to_array(tensor))
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    return h.hexdigest()


def _attr_signature(attr: onnx.AttributeProto, skip_values: bool) -> Any:
    """Attribute content; a tensor attribute by its value's digest unless ``skip_values``."""
    if attr.type == onnx.AttributeProto.TENSOR:
        value = "skipped" if skip_values else _tensor_digest(attr.t)
        return ["tensor", attr.t.data_type, list(attr.t.dims), value]
    if attr.type == onnx.AttributeProto.GRAPH:
        return ["graph", _graph_signature(attr.g, frozenset())]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return ["graphs", [_graph_signature(g, frozenset()) for g in attr.graphs]]
    if attr.type == onnx.AttributeProto.TENSORS:
        return ["tensors", [_tensor_digest(t) for t in attr.tensors]]
    if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        return ["sparse", _tensor_digest(attr.sparse_tensor.values),
                _tensor_digest(attr.sparse_tensor.indices), list(attr.sparse_tensor.dims)]
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
    return value


def _value_info_signature(vi: onnx.ValueInfoProto) -> list[Any]:
    tt = vi.type.tensor_type
    dims = None
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
    return [vi.name, tt.elem_type, dims]


def _graph_signature(graph: onnx.GraphProto, skip: frozenset[str]) -> list[Any]:
    return [
        [
            [n.domain, n.op_type, n.name, list(n.input), list(n.output),
             sorted([a.name, _attr_signature(a, n.op_type == "Constant" and n.output[0] in skip)]
                    for a in n.attribute)]
            for n in graph.node
        ],
        sorted([t.name, t.data_type, list(t.dims), "skipped" if t.name in skip
                else _tensor_digest(t)] for t in graph.initializer),
        [_value_info_signature(i) for i in graph.input],
        [o.name for o in graph.output],
    ]


def model_fingerprint(model: onnx.ModelProto, skip: Iterable[str] = ()) -> str:
    """SHA-256 of the graph, every tensor value, and the declared inputs (module docstring).

    ``skip`` names tensors (initializers or Constant outputs) whose values are left out.
    """
    sig = [
        SCHEME,
        sorted([o.domain, o.version] for o in model.opset_import),
        _graph_signature(model.graph, frozenset(skip)),
    ]
    text = json.dumps(sig, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
