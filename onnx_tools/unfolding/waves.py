"""Unfold in waves: each part of the network runs once, its outputs cached for the next.

Exact depth handling needs a BN's statistics before anything below it can be collected
(:mod:`onnx_tools.unfolding.run`). Running the network from its inputs once per depth
recomputes the upper layers D times; instead the network is cut by *level* (the number of
inserted BNs above a tensor) into waves:

* wave k holds the nodes whose outputs have level k (for k >= 1 these start at the inserted
  BNs of depth k, which now have their final statistics and run in training mode), plus the
  inserted BNs of depth k + 1 as statistics-only nodes: the collection rewrite
  (:func:`~onnx_tools.rewrite.build_collection_model`) returns their batch mean and variance
  exactly as ``recalibrate`` computes them;
* its inputs are the data batches (wave 0) or tensors cached by earlier waves; it writes the
  tensors later waves read (:attr:`WavePlan.cached`) to ``.npy`` files per batch in a
  temporary folder, memory-mapped when read back, and deletes each once no later wave needs
  it.

Only the nodes the inserted BNs' inputs depend on run at all; constants (initializers,
Constant nodes and what is computed from them alone) are copied into each wave that reads
them. The batches are those of the first wave, kept as they were (training-mode BN depends on
the batch), so the statistics equal those of D passes up to float rounding.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnx_tools.graph import GraphIndex, constant_tensors, subgraphs
from onnx_tools.unfolding.insert import InsertedBN


@dataclass
class WavePlan:
    """Wave ``k``: node indices (graph order) it runs, what it reads and caches.

    ``stats``: keys of the inserted BNs (depth k + 1) whose statistics it collects;
    ``inputs``: tensors it reads (graph inputs in wave 0, cached tensors after);
    ``cached``: tensors it produces that later waves read; ``release``: cached tensors no
    wave after this one reads (deleted once it ran); ``constants``: the nodes computing the
    constants it reads from other constants; ``initializers``: those it reads.
    """

    k: int
    nodes: list[int]
    stats: list[str]
    inputs: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    constants: list[int] = field(default_factory=list)
    initializers: set[str] = field(default_factory=set)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads, those its subgraphs read from the outer scope included."""
    names = {n for n in node.input if n}
    for sub in subgraphs(node):
        for inner in sub.node:
            names |= _reads(inner)
    return names


def _levels(model: onnx.ModelProto, inserted: list[InsertedBN]) -> dict[str, int]:
    """Level of every tensor: the deepest inserted BN above it (its own output included)."""
    depth = {bn.key: bn.depth for bn in inserted}
    level: dict[str, int] = {}
    for node in model.graph.node:
        here = max((level.get(n, 0) for n in _reads(node)), default=0)
        if node.op_type == "BatchNormalization" and node.output[0] in depth:
            here = depth[node.output[0]]
        for out in node.output:
            if out:
                level[out] = here
    return level


def _needed(model: onnx.ModelProto, index: GraphIndex, targets: set[str], const: set[str]) -> set[int]:
    """Indices of the non-constant nodes ``targets`` depend on."""
    needed: set[int] = set()
    stack = [t for t in targets if t not in const]
    seen = set(stack)
    while stack:
        producer = index.producer.get(stack.pop())
        if producer is None or producer in needed:
            continue
        needed.add(producer)
        for name in _reads(model.graph.node[producer]):
            if name not in seen and name not in const:
                seen.add(name)
                stack.append(name)
    return needed


def plan_waves(model: onnx.ModelProto, inserted: list[InsertedBN]) -> list[WavePlan]:
    """The waves 0 .. D-1 of ``model`` (with ``inserted`` BNs, depths set)."""
    index = GraphIndex(model)
    const = constant_tensors(model, index)
    level = _levels(model, inserted)
    bn_nodes = {index.producer[bn.key]: bn for bn in inserted}
    needed = _needed(model, index, {bn.input for bn in inserted}, const)
    depth = max(bn.depth for bn in inserted)
    waves = [WavePlan(k, [], []) for k in range(depth)]
    for i in sorted(needed):
        node = model.graph.node[i]
        k = level[node.output[0]]
        if k < depth:
            waves[k].nodes.append(i)
    for i, bn in bn_nodes.items():
        waves[bn.depth - 1].nodes.append(i)  # statistics only, in the wave above it
        waves[bn.depth - 1].stats.append(bn.key)
    later: set[str] = set()  # tensors read by waves after the current one
    for wave in reversed(waves):
        wave.nodes.sort()
        produced = {o for i in wave.nodes if i not in bn_nodes or bn_nodes[i].depth == wave.k
                    for o in model.graph.node[i].output if o}
        reads = {n for i in wave.nodes for n in _reads(model.graph.node[i])}
        wave.constants = _constant_nodes(model, index, (reads & const) - set(index.initializers))
        wave.initializers = (reads | {n for i in wave.constants for n in _reads(model.graph.node[i])}
                             ) & set(index.initializers)
        reads -= const
        wave.inputs = sorted(reads - produced)
        wave.cached = sorted(produced & later)
        later = (later - produced) | set(wave.inputs)
    held: set[str] = set()
    for k, wave in enumerate(waves):
        held |= set(wave.cached) | (set(wave.inputs) if k == 0 else set())
        after = {n for w in waves[k + 1:] for n in w.inputs}
        wave.release = sorted(held - after)
        held -= set(wave.release)
    return waves


def _constant_nodes(model: onnx.ModelProto, index: GraphIndex, names: set[str]) -> list[int]:
    """Nodes computing the constants ``names`` from other constants (graph order)."""
    out: set[int] = set()
    stack = list(names)
    while stack:
        producer = index.producer.get(stack.pop())
        if producer is not None and producer not in out:
            out.add(producer)
            stack.extend(_reads(model.graph.node[producer]))
    return sorted(out)


def wave_model(model: onnx.ModelProto, wave: WavePlan, inputs: dict[str, onnx.ValueInfoProto],
               ) -> onnx.ModelProto:
    """A model running ``wave``'s nodes on its inputs; outputs: the tensors it caches.

    ``inputs``: the declared type of each input (the graph input's, or one made from the
    cached arrays). The initializers are read from ``model`` now: they hold the statistics
    written so far.
    """
    graph = helper.make_graph(
        [model.graph.node[i] for i in wave.constants + wave.nodes], f"wave{wave.k}",
        [inputs[name] for name in wave.inputs],
        [helper.make_empty_tensor_value_info(name) for name in wave.cached],
        [t for t in model.graph.initializer if t.name in wave.initializers],
    )
    out = helper.make_model(graph, opset_imports=model.opset_import, ir_version=max(model.ir_version, 4))
    out.functions.extend(model.functions)
    return out


def value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    """A declared input for cached ``array``: its type and dims, the first one symbolic.

    The first axis gets a name of its own: it is the batch only where the model says so, and
    the collection rewrite bounds float32 sums by the batch only where it knows.
    """
    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
    return helper.make_tensor_value_info(name, elem, [f"{name}.d0", *array.shape[1:]])


class ActivationCache:
    """Cached tensors per batch as ``.npy`` files in a temporary folder (memory-mapped reads).

    ``peak_bytes`` is the most the folder held at once. The folder is removed on close.
    """

    def __init__(self, folder: str | None = None) -> None:
        self.root = tempfile.mkdtemp(prefix="bnref-unfold-", dir=folder)
        self.files: dict[tuple[str, int], str] = {}
        self.written = 0  # files ever written: their names, never reused
        self.bytes = 0
        self.peak_bytes = 0

    def put(self, name: str, batch: int, array: np.ndarray) -> None:
        """Store one batch of one tensor."""
        path = os.path.join(self.root, f"{self.written}.npy")
        self.written += 1
        np.save(path, np.ascontiguousarray(array))
        self.files[(name, batch)] = path
        self.bytes += os.path.getsize(path)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def get(self, name: str, batch: int) -> np.ndarray:
        """One batch of one tensor, memory-mapped."""
        return np.load(self.files[(name, batch)], mmap_mode="r")

    def release(self, name: str, batches: int) -> None:
        """Delete every batch of ``name``."""
        for b in range(batches):
            path = self.files.pop((name, b), None)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.bytes -= os.path.getsize(path)
                    os.unlink(path)

    def close(self) -> None:
        """Remove the folder and everything in it."""
        shutil.rmtree(self.root, ignore_errors=True)
