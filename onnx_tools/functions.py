"""BatchNormalization inside model-local functions: found, collected, written back at call sites.

torch.onnx's ``export_modules_as_functions`` exports each module instance as a call of a
function of the model; a BN inside reads its scale, bias, mean and var through the function's
inputs, which each call site feeds from the main graph. So:

* collection runs :func:`onnx.inliner.inline_local_functions`'s inlined copy of the model
  (:attr:`FunctionBatchNorms.inlined`), where each call site's BN is a node of the main graph;
  its output name (the inliner's, deterministic) is the BN's key in STATS files;
* the statistics are written back where they live: the call site's mean/var inputs, resolved
  in the original main graph like any BN input (a tensor another reader shares, e.g. one fed to
  two call sites or a TorchScript ``Identity(weight)`` alias, gets its own new tensor, wired to
  that call site only). The model's nodes and functions are otherwise untouched.

Refused (:attr:`FunctionBatchNorms.unsupported`, each naming the function): a BN whose mean or
var is not a function input (the statistics live in the function body, shared by every call
site), a function input that the body reads elsewhere too, and a BN in a function called from
another function (not from the main graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import onnx
import onnx.inliner

from onnx_tools.batchnorms import ROLE_INDEX, BatchNormInfo, find_batchnorms
from onnx_tools.graph import GraphIndex


@dataclass
class FunctionBatchNorms:
    """The BNs of a model's local functions, one per call site (see the module docstring)."""

    inlined: onnx.ModelProto | None = None
    batchnorms: list[BatchNormInfo] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _why_unsupported(function: onnx.FunctionProto, bn: onnx.NodeProto) -> str | None:
    formal = list(function.input)
    for role in ("mean", "var"):
        name = bn.input[ROLE_INDEX[role]]
        if name not in formal:
            return (f"its {role} lives in the function body, not at a call site (writing "
                    "into a function body, or specializing it per call site, is not supported)")
        readers = sum(list(n.input).count(name) for n in function.node)
        if readers > 1 or name in function.output:
            return f"the function reads its {role} input elsewhere too"
    return None


def _expanded_bns(model: onnx.ModelProto, functions: dict) -> list[tuple[int | None, object]]:
    """Per BN of the inlined main graph, in node order: ``(call index, (function, bn))``.

    ``call index`` is None for a BN of the main graph itself. The inliner expands each call in
    place, its body in order, so the k-th BN of the inlined graph is the k-th of this list.
    """
    order: list[tuple[int | None, object]] = []

    def expand(function: onnx.FunctionProto, call: int) -> None:
        for node in function.node:
            if _is_bn(node):
                order.append((call, (function, node)))
            elif (node.domain, node.op_type) in functions:
                expand(functions[(node.domain, node.op_type)], call)

    for i, node in enumerate(model.graph.node):
        if _is_bn(node):
            order.append((None, node))
        elif (node.domain, node.op_type) in functions:
            expand(functions[(node.domain, node.op_type)], i)
    return order


def function_batchnorms(model: onnx.ModelProto, base_dir: str | None) -> FunctionBatchNorms:
    """Find the BNs of ``model``'s local functions (empty when none holds a BN)."""
    functions = {(f.domain, f.name): f for f in model.functions}
    if not any(_is_bn(n) for f in model.functions for n in f.node):
        return FunctionBatchNorms()
    inlined = onnx.inliner.inline_local_functions(model)
    found = find_batchnorms(inlined, base_dir)
    order = _expanded_bns(model, functions)
    if len(order) != len(found):  # never seen: the inliner expanded something else
        return FunctionBatchNorms(inlined, [], [
            f"the inlined model has {len(found)} BatchNormalization nodes where its functions "
            f"and main graph hold {len(order)}: their call sites cannot be matched"])
    index = GraphIndex(model)
    result = FunctionBatchNorms(inlined)
    for bn, (call, origin) in zip(found, order, strict=True):
        if call is None:
            continue
        function, node = origin
        call_node = model.graph.node[call]
        where = (f"function {function.domain}.{function.name} (called by "
                 f"{call_node.name or call_node.output[0]}) > {node.name or node.output[0]}")
        why = ("not called from the main graph" if (call_node.domain, call_node.op_type)
               != (function.domain, function.name) else _why_unsupported(function, node))
        if why:
            result.unsupported.append(f"{where}: {why}")
            continue
        positions = {role: list(function.input).index(node.input[k])
                     for role, k in ROLE_INDEX.items() if node.input[k] in function.input}
        sources = {role: index.resolve(call, pos) for role, pos in positions.items()}
        sources = {**bn.sources, **sources}
        values = {role: index.value(src, base_dir) if role in positions else bn.values[role]
                  for role, src in sources.items()}
        result.batchnorms.append(replace(bn, index=call, sources=sources, values=values,
                                         call_inputs=positions, function=where))
    return result
