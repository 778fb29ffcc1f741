"""Where the collection graph's time goes, and what each attempt to keep fusions buys.

The collection model (BNs normalizing with their batch statistics, reduced in-graph) costs more
than plain inference for two reasons: the BN can no longer be folded into the Conv before it
(and with it go the NCHWc Conv+BN+Add+Relu fusions of onnxruntime's CPU optimizer), and the
statistics themselves take passes over every BN input. This benchmark separates the two with
onnxruntime's own profiler (time per operator type, per batch) and measures, side by side in
one run, graph variants:

* ``plain``: the exported model (BN folded: the floor);
* ``unfolded``: each BN's mean/var fed at run time, so nothing folds: the floor for any graph
  that normalizes with statistics computed at run time;
* ``collect``: the collection model bnref-onnx builds for a CPU session: onnxruntime's own
  training-mode BatchNormalization kernel (one node) for BN inputs up to 2^20 values per
  batch, the primitive route for larger ones; ``collect_all_training_kernel``: the kernel for
  every BN;
* ``collect_primitive``: the primitive-operator collection model (the CUDA route, and the CPU
  route before this benchmark: staged ReduceMean, Sub, batched MatMul or ReduceSumSquare,
  inference-mode BN; about ten nodes per BN);
* ``*_extended``: the same at ``ORT_ENABLE_EXTENDED`` (no NCHWc layout, so no reorders, but
  plain NCHW convolutions);
* variants of the primitive route that try to keep more of the inference graph's fusions:
  ``primitive_muladd``: the BN node replaced by the per-channel form ``Y = D * s + b'`` on the
  deviations ``D = X - m`` the variance already computed (``s = scale / sqrt(v + eps)``);
  ``primitive_bn_dev``: the BN node reading ``D`` with a zero mean (``X`` dies earlier);
  ``primitive_mul_sum``: rows shorter than 512 values summing their squares by
  ``ReduceSum(D * D)`` instead of ReduceSumSquare; ``primitive_rss_all``: every row by
  ReduceSumSquare (no batched MatMul); ``primitive_mean_mm``: the per-sample means by a MatMul
  with a ``1/HW`` column, like the sums of squares.

A size sweep times the two routes alone (forced) on two Conv-BN-Relu blocks of growing size:
the numbers behind :data:`onnx_tools.rewrite.plan.TRAINING_KERNEL_MAX_VALUES`.

Models: the ResNet-like CNN of ``bench_recalibrate.py`` (3x32x32), and with ``--models``
torchvision's ResNet-18 and MobileNetV3-small (224x224, random weights, BN kept at export;
needs torchvision), each with the variants that apply. Every variant's statistics are compared
with ``collect_primitive``'s (largest relative difference).
Usage: ``python benchmarks/bench_graph.py [--models resnet_like resnet18 mobilenet_v3_small]``
writes ``benchmarks/results/graph.json``; ``--markdown`` prints the README tables from it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_images import _cpu_model  # noqa: E402
from bench_recalibrate import _batches, build_torch_resnet, export, unfolded  # noqa: E402

from onnx_tools.rewrite import build_collection_model  # noqa: E402


def session(model: onnx.ModelProto, level: str = "all", profile: str | None = None):
    """An onnxruntime CPU session with bnref-onnx's options at optimization ``level``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


# ---- graph variants ------------------------------------------------------------------------

def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _rewritten_bns(graph: onnx.GraphProto):
    """(index, BN node, Sub node giving D = X - m) of each BN the primitive rewrite made."""
    subs = {n.input[0]: n for n in graph.node if n.op_type == "Sub" and "_dev" in n.output[0]}
    for i, node in enumerate(graph.node):
        if node.op_type == "BatchNormalization" and node.input[0] in subs:
            yield i, node, subs[node.input[0]]


def _rebuild(graph: onnx.GraphProto, replace: dict[int, list[onnx.NodeProto]]) -> None:
    if not replace:  # a variant that matches nothing would be timed as the unchanged graph
        raise RuntimeError("graph variant found nothing to rewrite")
    nodes = [m for i, n in enumerate(graph.node) for m in replace.get(i, [n])]
    del graph.node[:]
    graph.node.extend(nodes)


def muladd(model: onnx.ModelProto) -> onnx.ModelProto:
    """BN -> ``D * (scale / sqrt(v + eps)) + bias`` on the deviations D already computed."""
    graph = model.graph
    replace = {}
    for i, bn, sub in list(_rewritten_bns(graph)):
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        p = bn.output[0]
        c4 = f"{p}_c4"
        graph.initializer.append(numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), c4))
        graph.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), f"{p}_eps"))
        replace[i] = [
            helper.make_node("Add", [bn.input[4], f"{p}_eps"], [f"{p}_ve"]),
            helper.make_node("Sqrt", [f"{p}_ve"], [f"{p}_sd"]),
            helper.make_node("Div", [bn.input[1], f"{p}_sd"], [f"{p}_s"]),
            helper.make_node("Reshape", [f"{p}_s", c4], [f"{p}_s4"]),
            helper.make_node("Reshape", [bn.input[2], c4], [f"{p}_b4"]),
            helper.make_node("Mul", [sub.output[0], f"{p}_s4"], [f"{p}_ds"]),
            helper.make_node("Add", [f"{p}_ds", f"{p}_b4"], [bn.output[0]]),
        ]
    _rebuild(graph, replace)
    return model


def bn_on_dev(model: onnx.ModelProto) -> onnx.ModelProto:
    """The BN node reads D = X - m with a zero mean."""
    graph = model.graph
    replace = {}
    for i, bn, sub in list(_rewritten_bns(graph)):
        p = bn.output[0]
        graph.initializer.append(numpy_helper.from_array(np.array(0, np.float32), f"{p}_0"))
        zeros = helper.make_node("Mul", [bn.input[3], f"{p}_0"], [f"{p}_zeros"])  # (C,) zeros
        bn.input[0] = sub.output[0]
        bn.input[3] = f"{p}_zeros"
        replace[i] = [zeros, bn]
    _rebuild(graph, replace)
    return model


def sumsq_variant(model: onnx.ModelProto, route: str) -> onnx.ModelProto:
    """Rows' sums of squares by another route: ``"mul_sum"`` gives the rows shorter than 512
    values (ReduceSumSquare in bnref-onnx) ``ReduceSum(D * D)`` instead, ``"rss"`` gives
    the long rows (MatMul in bnref-onnx) ReduceSumSquare too."""
    graph = model.graph
    prod = _producers(graph)
    replace, drop = {}, set()
    for i, node in enumerate(graph.node):
        if not node.output[0].endswith("_ss_s0"):
            continue
        if node.op_type == "MatMul" and route == "rss":
            d_row = prod[node.input[0]]  # Reshape(D, [0, 0, 1, -1])
            axes = f"{node.output[0]}_axes"
            graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
            replace[i] = [helper.make_node("ReduceSumSquare", [d_row.input[0], axes],
                                           node.output, keepdims=1)]
            drop |= {id(d_row), id(prod[node.input[1]])}
        elif node.op_type == "ReduceSumSquare" and route == "mul_sum":
            sq = f"{node.output[0]}_sq"
            axes = node.input[1] if len(node.input) > 1 else f"{node.output[0]}_axes"
            if len(node.input) == 1:  # opset < 18: axes attribute (ReduceSum: input from 13)
                values = next(a.ints for a in node.attribute if a.name == "axes")
                graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), axes))
            replace[i] = [helper.make_node("Mul", [node.input[0], node.input[0]], [sq]),
                          helper.make_node("ReduceSum", [sq, axes], node.output, keepdims=1)]
    _rebuild(graph, replace)
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    return model


def mean_by_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """The per-sample means over H*W by MatMul with a ``1/HW`` column (for rows >= 512)."""
    graph = model.graph
    shapes = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    replace = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "ReduceMean" or not node.output[0].endswith("_mean_s0"):
            continue
        dims = [d.dim_value for d in shapes[node.input[0]].type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[2] * dims[3] < 512:
            continue
        hw = dims[2] * dims[3]
        p = node.output[0]
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 1, -1], np.int64),
                                                         f"{p}_view"))
        graph.initializer.append(numpy_helper.from_array(np.full((hw, 1), 1 / hw, np.float32),
                                                         f"{p}_col"))
        replace[i] = [helper.make_node("Reshape", [node.input[0], f"{p}_view"], [f"{p}_row"]),
                      helper.make_node("MatMul", [f"{p}_row", f"{p}_col"], [p])]
    _rebuild(graph, replace)
    return model


# ---- profiling ------------------------------------------------------------------------------

def profile_ops(model: onnx.ModelProto, feeds_for, batches: list[np.ndarray], level: str,
                outputs=None) -> dict[str, float]:
    """Milliseconds per batch by operator type, from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model, level, profile=os.path.join(tmp, "p"))
        for t in batches:
            sess.run(outputs, feeds_for(t))
        path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
    totals: collections.Counter = collections.Counter()
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            totals[ev["args"]["op_name"]] += ev["dur"] / 1000.0
    return {op: ms / len(batches) for op, ms in totals.most_common()}


def fresh_sessions(graphs: dict, batches: list[np.ndarray], rounds: int, input_name: str) -> dict:
    """Wall and process-CPU seconds per graph over ``batches``, a new session each round.

    One session keeps its memory for life, and two sessions of the same model differ by up to
    ~20% here (where their buffers landed), so every round builds every session anew (not
    timed, one warm-up batch) and the graphs' order rotates each round. Returns the medians
    and the medians of the within-round ratios to ``plain`` (the noise of a shared machine
    moves whole rounds; a ratio within one round cancels most of it).
    """
    names = list(graphs)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, level, outs, extra = graphs[name]
            sess = session(model, level)
            sess.run(outs, {input_name: batches[0], **extra})
            t0, c0 = time.perf_counter(), time.process_time()
            for t in batches:
                sess.run(outs, {input_name: t, **extra})
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            del sess
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {wall[k][-1]:.2f}" for k in names),
              flush=True)

    def ratios(times: dict[str, list[float]]) -> dict[str, float]:
        return {k: statistics.median(a / b for a, b in zip(v, times["plain"], strict=True))
                for k, v in times.items()}

    return {"seconds": {k: statistics.median(v) for k, v in wall.items()},
            "cpu_seconds": {k: statistics.median(v) for k, v in cpu.items()},
            "ratio_to_plain": ratios(wall), "cpu_ratio_to_plain": ratios(cpu)}


STEADY = ("collect", "collect_all_training_kernel", "collect_primitive")


def steady_routes(graphs: dict, batches: list[np.ndarray], reps: int, input_name: str) -> dict:
    """The collection routes with their sessions kept alive, as one ``recalibrate`` run keeps
    its session: ``reps`` interleaved repetitions over ``batches`` (order rotating); medians of
    the within-repetition ratios to the primitive route. Steadier than :func:`fresh_sessions`,
    whose new sessions also time where their first buffers landed."""
    sessions = {k: session(graphs[k][0], graphs[k][1]) for k in STEADY}
    for k in STEADY:
        sessions[k].run(graphs[k][2], {input_name: batches[0], **graphs[k][3]})
    times: dict[str, list[float]] = {k: [] for k in STEADY}
    for r in range(reps):
        for k in STEADY[r % 3:] + STEADY[:r % 3]:
            t0 = time.perf_counter()
            for t in batches:
                sessions[k].run(graphs[k][2], {input_name: t, **graphs[k][3]})
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(a / b for a, b in zip(v, times["collect_primitive"], strict=True))
            for k, v in times.items()}


def max_rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest difference of the statistics ``a`` from ``b``, each (mean, var, shape) per BN.

    Means are compared on the scale of the BN's largest standard deviation (a mean near 0 is
    known only to that scale), variances normwise (``max|a - b| / max|b|``).
    """
    worst = 0.0
    for i in range(0, len(b), 3):
        (ma, va), (mb, vb) = a[i:i + 2], b[i:i + 2]
        std = max(float(np.sqrt(np.max(vb))), 1e-30)
        worst = max(worst, float(np.max(np.abs(ma - mb))) / std,
                    float(np.max(np.abs(va - vb))) / max(float(np.max(vb)), 1e-30))
    return worst


#: Models: (input shape per sample, samples, batch size, variants measured besides the floors).
MODELS = {
    "resnet_like": ((3, 32, 32), 1024, 64, ("primitive_muladd", "primitive_bn_dev",
                                            "primitive_mul_sum", "primitive_rss_all",
                                            "primitive_mean_mm")),
    "resnet18": ((3, 224, 224), 192, 64, ("primitive_muladd", "primitive_mul_sum")),
    "mobilenet_v3_small": ((3, 224, 224), 256, 64, ("primitive_muladd", "primitive_mul_sum")),
}


def _load(name: str, tmp: Path) -> tuple[onnx.ModelProto, str]:
    """The exported model (BN kept) and its input name."""
    if name == "resnet_like":
        path = tmp / "resnet.onnx"
        export(build_torch_resnet(), path)
        return onnx.load(path), "x"
    from bench_images import export_models

    path, _ = export_models(tmp, (name,))[name]
    return onnx.load(path), "input"


def _all_training_kernel(model: onnx.ModelProto, batch: int):
    """The collection model with the training kernel wherever it is exact, whatever the size."""
    from onnx_tools.rewrite import plan as plan_mod

    saved, plan_mod.TRAINING_KERNEL_MAX_VALUES = plan_mod.TRAINING_KERNEL_MAX_VALUES, 2**40
    try:
        return build_collection_model(model, training_kernel=True, batch_size=batch)
    finally:
        plan_mod.TRAINING_KERNEL_MAX_VALUES = saved


def _graphs(base: onnx.ModelProto, batch: int, variants: tuple[str, ...]) -> dict:
    """name -> (model, optimization level, outputs, extra feeds)."""
    cm = build_collection_model(base, training_kernel=True, batch_size=batch)
    every = _all_training_kernel(base, batch)
    prim = build_collection_model(base)
    unf, unf_feeds = unfolded(base)
    names = cm.output_names

    def copy_prim() -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(prim.model)
        return m

    make = {"primitive_muladd": lambda: muladd(copy_prim()),
            "primitive_bn_dev": lambda: bn_on_dev(copy_prim()),
            "primitive_mul_sum": lambda: sumsq_variant(copy_prim(), "mul_sum"),
            "primitive_rss_all": lambda: sumsq_variant(copy_prim(), "rss"),
            "primitive_mean_mm": lambda: mean_by_matmul(copy_prim())}
    graphs = {
        "plain": (base, "all", None, {}),
        "plain_extended": (base, "extended", None, {}),
        "unfolded": (unf, "all", None, unf_feeds),
        "collect": (cm.model, "all", names, cm.feeds),
        "collect_extended": (cm.model, "extended", names, cm.feeds),
        "collect_all_training_kernel": (every.model, "all", every.output_names, every.feeds),
        "collect_primitive": (prim.model, "all", prim.output_names, {}),
        "collect_primitive_extended": (prim.model, "extended", prim.output_names, {}),
    }
    graphs.update({v: (make[v](), "all", prim.output_names, {}) for v in variants})
    return graphs


def run_model(name: str, rounds: int, tmp: Path, samples: int | None = None) -> dict:
    """Time, profile and cross-check every graph of one model."""
    shape, default_samples, batch, variants = MODELS[name]
    base, input_name = _load(name, tmp)
    rng = np.random.default_rng(0)
    batches = _batches(rng.standard_normal((samples or default_samples, *shape), dtype=np.float32),
                       batch)
    graphs = _graphs(base, batch, variants)
    reference, diffs = None, {}
    for key, (model, level, outs, extra) in sorted(graphs.items(), key=lambda kv: kv[0] != "collect_primitive"):
        if outs is not None:
            sess = session(model, level)
            got = [a for t in batches[:2] for a in sess.run(outs, {input_name: t, **extra})]
            reference = reference if reference is not None else got
            diffs[key] = max_rel_diff(got, reference)
    print(f"{name}: {len(batches)} batches of {batch}", flush=True)
    res = fresh_sessions(graphs, batches, rounds, input_name)
    res["steady_ratio_to_primitive"] = steady_routes(graphs, batches[:2], 3 * rounds, input_name)
    profiles = {}
    for key in ("plain", "unfolded", "collect", "collect_primitive"):
        model, level, outs, extra = graphs[key]
        profiles[key] = profile_ops(model, lambda t, e=extra: {input_name: t, **e}, batches,
                                    level, outs)
    bns = sum(1 for n in base.graph.node if n.op_type == "BatchNormalization")
    return {"model": name, "batchnorms": bns, "input": list(shape), "samples": len(batches) * batch,
            "batch_size": batch, "rounds": rounds, **res,
            "stats_max_rel_diff_vs_primitive": diffs, "profile_ms_per_batch": profiles}


#: The size sweep: (channels, height = width) of Conv-BN-Relu pairs, batch 64.
SWEEP = ((16, 8), (32, 16), (64, 16), (64, 32), (64, 56), (32, 112))


def _pair_model(c: int, h: int) -> onnx.ModelProto:
    """Two Conv(3x3)-BN-Relu blocks on (N, c, h, h): the unit the routes differ on."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 15]>
    pair (float[N,{c},{h},{h}] x) => (float[N,{c},{h},{h}] y) {{
      c1 = Conv<pads=[1,1,1,1]>(x, w1)
      b1 = BatchNormalization(c1, s, o, m, v)
      r1 = Relu(b1)
      c2 = Conv<pads=[1,1,1,1]>(r1, w2)
      b2 = BatchNormalization(c2, s, o, m, v)
      y = Relu(b2)
    }}"""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    f = np.float32
    model.graph.initializer.extend([
        numpy_helper.from_array((rng.normal(size=(c, c, 3, 3)) * 0.1).astype(f), "w1"),
        numpy_helper.from_array((rng.normal(size=(c, c, 3, 3)) * 0.1).astype(f), "w2"),
        numpy_helper.from_array(np.ones(c, f), "s"), numpy_helper.from_array(np.zeros(c, f), "o"),
        numpy_helper.from_array(np.zeros(c, f), "m"), numpy_helper.from_array(np.ones(c, f), "v")])
    return model


def size_sweep(rounds: int, batch: int = 64) -> list[dict]:
    """Training kernel vs primitive route on Conv-BN-Relu pairs of growing size (forced routes).

    Both sessions stay alive; each round runs each route ``reps`` times back to back, the
    order alternating; the ratio is the median of the within-round ratios.
    """
    out = []
    for c, h in SWEEP:
        model = _pair_model(c, h)
        x = np.random.default_rng(1).standard_normal((batch, c, h, h), dtype=np.float32)
        cms = {False: build_collection_model(model), True: _all_training_kernel(model, batch)}
        sessions = {k: session(cm.model) for k, cm in cms.items()}
        for k, cm in cms.items():
            sessions[k].run(cm.output_names, {"x": x, **cm.feeds})
        reps = max(3, int(2e8 // (batch * c * h * h * 40)))
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for k in ((False, True) if r % 2 else (True, False)):
                t0 = time.perf_counter()
                for _ in range(reps):
                    sessions[k].run(cms[k].output_names, {"x": x, **cms[k].feeds})
                times[k].append((time.perf_counter() - t0) / reps)
        ratio = statistics.median(a / b for a, b in zip(times[True], times[False], strict=True))
        out.append({"channels": c, "size": h, "values_per_batch": batch * c * h * h,
                    "primitive_ms": 1e3 * statistics.median(times[False]),
                    "training_kernel_ms": 1e3 * statistics.median(times[True]),
                    "ratio": ratio})
        print(f"  sweep {batch}x{c}x{h}x{h}: training kernel / primitive {ratio:.2f}", flush=True)
    return out


def run(models: list[str], rounds: int, samples: int | None) -> dict:
    import onnxruntime

    machine = {"cpu": _cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
               "onnxruntime": onnxruntime.__version__,
               "load_average_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_model(m, rounds, Path(tmp), samples) for m in models]
    sweep = size_sweep(max(rounds, 9))
    machine["load_average_at_end"] = list(os.getloadavg())
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine, "models": results,
            "size_sweep": sweep}


LABELS = {
    "plain": "plain inference (BN folded into Conv: the floor)",
    "plain_extended": "plain inference, no NCHWc (`ORT_ENABLE_EXTENDED`)",
    "unfolded": "BN mean/var as run-time inputs (no fold, no statistics)",
    "collect": "**collection model as bnref-onnx builds it for the CPU**",
    "collect_extended": "the same, no NCHWc",
    "collect_all_training_kernel": "collection model, training kernel for every BN",
    "collect_primitive": "collection model, primitive operators only (CUDA's; CPU before)",
    "collect_primitive_extended": "the same, no NCHWc",
    "primitive_muladd": "primitive, BN as `D * s + b'` on the deviations",
    "primitive_bn_dev": "primitive, BN reading the deviations with mean 0",
    "primitive_mul_sum": "primitive, short rows' squares by `ReduceSum(D * D)`",
    "primitive_rss_all": "primitive, every row by ReduceSumSquare (no MatMul)",
    "primitive_mean_mm": "primitive, per-sample means by MatMul",
}


def _model_table(r: dict) -> list[str]:
    lines = [f"**{r['model']}** ({r['batchnorms']} BN, {r['samples']} samples of "
             f"{'x'.join(map(str, r['input']))}, batch {r['batch_size']}, {r['rounds']} rounds):",
             "", "| graph | × plain (wall) | × plain (CPU) | stats vs primitive (max rel.) |",
             "|---|---:|---:|---:|"]
    for key, ratio in r["ratio_to_plain"].items():
        d = r["stats_max_rel_diff_vs_primitive"].get(key)
        lines.append(f"| {LABELS.get(key, key)} | {ratio:.2f} | {r['cpu_ratio_to_plain'][key]:.2f} | "
                     f"{'—' if d is None else f'{d:.1e}'} |")
    steady = r.get("steady_ratio_to_primitive")
    if steady:
        lines += ["", f"Sessions kept alive (as in one `recalibrate` run; {3 * r['rounds']} interleaved "
                  "repetitions of 2 batches), time over the primitive route: as built for the CPU "
                  f"**{steady['collect']:.2f}**, training kernel for every BN "
                  f"{steady['collect_all_training_kernel']:.2f}."]
    prof = r["profile_ms_per_batch"]
    ops = sorted({op for p in prof.values() for op in p},
                 key=lambda op: -max(p.get(op, 0.0) for p in prof.values()))
    lines += ["", "onnxruntime profiler, ms per batch by operator (kernel time):", "",
              "| operator | " + " | ".join(f"`{k}`" for k in prof) + " |",
              "|---|" + "---:|" * len(prof)]
    for op in ops:
        cells = [f"{p[op]:.1f}" if op in p else "" for p in prof.values()]
        if max(p.get(op, 0.0) for p in prof.values()) >= 0.05:
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"**{sum(p.values()):.1f}**" for p in prof.values()) + " |")
    return lines


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Measured {res['date'][:10]} on {m['cpu']} ({m['cpus']} CPUs, shared; load average "
             f"{m['load_average_at_start'][0]:.2f} at start, {m['load_average_at_end'][0]:.2f} at the end), "
             f"onnxruntime {m['onnxruntime']}. `session.run` only, a new session per graph and round, "
             "order rotating; medians of the within-round ratios to plain inference (lower is better).",
             ""]
    for r in res["models"]:
        lines += _model_table(r) + [""]
    sweep = res.get("size_sweep", [])
    if sweep:
        lines += ["Training kernel against the primitive route, forced, on two Conv-BN-Relu blocks "
                  "(batch 64; the default route uses the kernel up to 2^20 values per BN input):", "",
                  "| BN input | values per batch | primitive ms | training kernel ms | ratio |",
                  "|---|---:|---:|---:|---:|"]
        for w in sweep:
            lines.append(f"| 64x{w['channels']}x{w['size']}x{w['size']} | {w['values_per_batch']:,} | "
                         f"{w['primitive_ms']:.2f} | {w['training_kernel_ms']:.2f} | **{w['ratio']:.2f}** |")
    return "\n".join(lines).rstrip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet_like"], choices=list(MODELS))
    ap.add_argument("--samples", type=int, default=None, help="samples per model (default: its own)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--output", default=str(ROOT / "benchmarks/results/graph.json"))
    ap.add_argument("--markdown", action="store_true", help="print the README tables and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.output).read_text())))
        return
    res = run(args.models, args.rounds, args.samples)
    Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()
