"""Insert an identity BatchNormalization after each site, and set its statistics.

Each inserted BN reads the site's output under a new name (``<output>/unfold_in``) and
writes the site's original output name, so every consumer, value_info and graph output
stays as it was. Its four tensors are new initializers (Constant nodes in IR < 4 models)
of the weights' element type, so onnxruntime can fold it back into the Conv at inference:

* running mean ``m`` and variance ``v``: the population statistics of the site's output;
* scale ``sqrt(v + eps')`` and bias ``m``: at inference ``scale * (z - m) / sqrt(v + eps')
  + bias = z`` for every input, whatever ``m`` and ``v`` are.

In training mode the BN normalizes with its batch statistics and maps them back with
``scale`` and ``bias``, so a BN's output depends on its statistics; :func:`depths` gives the
order in which they are exact (:mod:`onnx_tools.unfolding.run`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_tools.graph import UniqueNamer, domain_opset
from onnx_tools.unfolding.sites import Site

#: Inserted BN tensors, by role (BatchNormalization input order after X).
ROLES = ("scale", "bias", "mean", "var")


@dataclass
class InsertedBN:
    """A BN ``unfold`` inserted: its node, its tensors by role, and its depth.

    ``key`` is the BN's output, the site's original output name (what STATS files, reports
    and ``--include`` see); ``depth`` counts the inserted BNs on the longest path from the
    graph inputs to this one, itself included.
    """

    site: Site
    node_name: str
    key: str
    input: str
    tensors: dict[str, str]
    depth: int = 0


def _values(m: np.ndarray, v: np.ndarray, eps: float, dtype: np.dtype) -> dict[str, np.ndarray]:
    m64, v64 = np.asarray(m, np.float64), np.asarray(v, np.float64)
    return {
        "scale": np.sqrt(v64 + eps).astype(dtype),
        "bias": m64.astype(dtype),
        "mean": m64.astype(dtype),
        "var": v64.astype(dtype),
    }


def _bn_node(model: onnx.ModelProto, site: Site, name: str, x: str,
             tensors: dict[str, str], eps: float) -> onnx.NodeProto:
    attrs: dict = {"epsilon": float(eps)}
    if domain_opset(model) < 7:
        attrs["is_test"] = 1  # BN-6 defaults to training mode
    return helper.make_node("BatchNormalization", [x, *(tensors[r] for r in ROLES)],
                            [site.output], name=name, **attrs)


def insert_batchnorms(model: onnx.ModelProto, sites: list[Site], eps: float) -> tuple[onnx.ModelProto, list[InsertedBN]]:
    """A copy of ``model`` with an identity BN after each site (placeholder m = 0, v = 1)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    namer = UniqueNamer(out)
    graph = out.graph
    constants = out.ir_version < 4  # IR < 4: initializers must also be graph inputs
    after: dict[int, list[onnx.NodeProto]] = {}
    inserted: list[InsertedBN] = []
    for site in sites:
        node = graph.node[site.index]
        x = namer(f"{site.output}/unfold_in")
        node.output[0] = x
        base = site.node_name or site.output
        dtype = helper.tensor_dtype_to_np_dtype(site.elem)
        c = site.channels
        values = _values(np.zeros(c), np.ones(c), eps, dtype)
        tensors = {}
        extra: list[onnx.NodeProto] = []
        for role in ROLES:
            tensors[role] = namer(f"{base}/unfold_bn.{role}")
            tensor = numpy_helper.from_array(values[role], tensors[role])
            if constants:
                extra.append(helper.make_node("Constant", [], [tensors[role]], value=tensor,
                                              name=namer(f"{tensors[role]}/Constant")))
            else:
                graph.initializer.append(tensor)
        bn_name = namer(f"{base}/unfold_bn")
        after[site.index] = [*extra, _bn_node(out, site, bn_name, x, tensors, eps)]
        inserted.append(InsertedBN(site, bn_name, site.output, x, tensors))
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    _set_depths(out, inserted)
    return out, inserted


def _set_depths(model: onnx.ModelProto, inserted: list[InsertedBN]) -> None:
    """Each inserted BN's depth: 1 + the deepest inserted BN upstream (node order is topological)."""
    by_key = {bn.key: bn for bn in inserted}
    level: dict[str, int] = {}
    for node in model.graph.node:
        inputs = [level.get(n, 0) for n in node.input if n]
        here = max(inputs, default=0)
        bn = by_key.get(node.output[0]) if node.op_type == "BatchNormalization" else None
        if bn is not None and node.input[0] == bn.input:
            bn.depth = here + 1
            here = bn.depth
        for out in node.output:
            if out:
                level[out] = here


def set_statistics(model: onnx.ModelProto, bns: list[InsertedBN], stats: dict[str, tuple[np.ndarray, np.ndarray]],
                   eps: float) -> None:
    """Write mean/var (and scale = sqrt(var + eps), bias = mean) of the BNs in ``stats``."""
    tensors = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for bn in bns:
        if bn.key not in stats:
            continue
        mean, var = stats[bn.key]
        dtype = helper.tensor_dtype_to_np_dtype(bn.site.elem)
        for role, value in _values(mean, var, eps, dtype).items():
            name = bn.tensors[role]
            new = numpy_helper.from_array(value, name)
            if name in tensors:
                tensors[name].CopyFrom(new)
            else:
                for attr in constants[name].attribute:
                    if attr.name == "value":
                        attr.t.CopyFrom(new)
