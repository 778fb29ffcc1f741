"""Benchmark bnref-onnx recalibration against plain inference, the naive route and fvcore.

One run, one machine, every route over the same batches; repetitions are interleaved (the
order rotates each round) and medians reported, because the machine is shared and noisy:

* ``plain``: onnxruntime inference of the exported model (same session options as the tool;
  the optimizer folds BN into Conv: the hard floor);
* ``plain_unfolded``: the same inference with every BN's mean/var fed as run-time inputs, so
  nothing folds them (BN, its reorders out of the NCHWc layout and the unfused Relu/Add run as
  in the collection model): separates the cost of losing the fold from the cost of statistics;
* ``collect_graph``: only ``session.run`` of the collection model (the in-graph part);
  ``collect``: the collection loop of ``bnref-onnx`` (training-mode rewrite, in-graph
  reduction, PreciseBN aggregation); ``recalibrate``: the whole job (load, rewrite, session,
  collect, apply, write);
* ``naive``: every BN input returned as a graph output and reduced in NumPy (float64);
* ``fvcore``: ``fvcore.nn.precise_bn.update_bn_stats`` on the PyTorch model in train mode
  (skipped when torch or fvcore is missing), ``torch_update_bn``:
  ``torch.optim.swa_utils.update_bn``, and ``torch_eval``: plain PyTorch inference for scale;
* peak memory (RSS high-water mark and Python/NumPy allocations) as the calibration set grows.

Usage: ``python benchmarks/bench_recalibrate.py [--samples 1024] [--batch-size 64]`` writes
``benchmarks/results/recalibrate.json``; ``--markdown`` prints the README table from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx_tools as ot  # noqa: E402
from onnx_tools.batchnorms import find_batchnorms  # noqa: E402
from onnx_tools.session import make_session  # noqa: E402


def build_torch_resnet():
    import torch

    class Block(torch.nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.c1 = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.b1 = torch.nn.BatchNorm2d(c_out)
            self.c2 = torch.nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.b2 = torch.nn.BatchNorm2d(c_out)
            self.short = None
            if stride != 1 or c_in != c_out:
                self.short = torch.nn.Sequential(
                    torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                    torch.nn.BatchNorm2d(c_out))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu(y + (x if self.short is None else self.short(x)))

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1), Block(64, 128, 2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10))
    return net.eval()


def export(net, path):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 32, 32),), str(path), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "N"}})


def interleaved(runs: dict, rounds: int) -> tuple[dict, dict]:
    """Median wall and process-CPU seconds per route; the route order rotates every round."""
    names = list(runs)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for name in names:
        runs[name]()  # warm-up
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            runs[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {wall[k][-1]:.2f}" for k in names),
              flush=True)
    return ({k: statistics.median(v) for k, v in wall.items()},
            {k: statistics.median(v) for k, v in cpu.items()})


def _batches(x, b):
    return [x[i:i + b] for i in range(0, len(x) // b * b, b)]


def plain_inference(model_path, x, b):
    sess, _ = make_session(onnx.load(model_path), "cpu")
    return lambda: [sess.run(None, {"x": t}) for t in _batches(x, b)]


def unfolded(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` with each BN's mean/var as graph inputs, and the feeds giving them.

    onnxruntime cannot fold such a BN into the Conv before it: the floor of any graph that
    normalizes with statistics known only at run time.
    """
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    feeds = {}
    for bn in find_batchnorms(copy):
        node = copy.graph.node[bn.index]
        for j, role in ((3, "mean"), (4, "var")):
            name = f"bench_{role}_{bn.index}"
            feeds[name] = np.asarray(bn.values[role], np.float32)
            node.input[j] = name
            copy.graph.input.append(helper.make_tensor_value_info(name, 1, [len(feeds[name])]))
    return copy, feeds


def plain_unfolded(model_path, x, b):
    """Inference with each BN's mean/var as run-time inputs: onnxruntime cannot fold them."""
    model, feeds = unfolded(onnx.load(model_path))
    sess, _ = make_session(model, "cpu")
    return lambda: [sess.run(None, {"x": t, **feeds}) for t in _batches(x, b)]


def collect_graph(model_path, x, b):
    """Only the collection model's session.run, as bnref-onnx builds it for the CPU."""
    from onnx_tools.rewrite import build_collection_model

    cm = build_collection_model(onnx.load(model_path), training_kernel=True, batch_size=b)
    sess, _ = make_session(cm.model, "cpu")
    names = cm.output_names
    return lambda: [sess.run(names, {"x": t, **cm.feeds}) for t in _batches(x, b)]


def naive_route(model_path, x, b):
    """The same training-mode graph, but every BN input is returned whole and reduced in NumPy."""
    from onnx import helper

    from onnx_tools.rewrite import build_collection_model

    cm = build_collection_model(onnx.load(model_path), training_kernel=True, batch_size=b)
    model = cm.model
    taps = [bn.input for bn in cm.bns]
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(t, 1, None) for t in taps)
    sess, _ = make_session(model, "cpu")

    def run():
        import bnref

        aggs = [bnref.PreciseBN() for _ in taps]
        for t in _batches(x, b):
            for agg, v in zip(aggs, sess.run(taps, {"x": t, **cm.feeds}), strict=True):
                axes = (0, *range(2, v.ndim))
                mean = v.mean(axis=axes, dtype=np.float64)
                shape = (1, -1) + (1,) * (v.ndim - 2)
                var = np.square(v - mean.reshape(shape), dtype=np.float64).mean(axis=axes)
                agg.update(bnref.Moments.from_mean_var(mean, var, v.size // v.shape[1]))
        return aggs

    return run


def collect_only(model_path, x, b):
    loaded = ot.load_model(model_path)
    return lambda: ot.collect(loaded, x, batch_size=b, provider="cpu")


def whole_recalibrate(model_path, x, b, out):
    return lambda: ot.recalibrate(str(model_path), x, batch_size=b, provider="cpu", output=out)


def torch_runs(net, x, b):
    import copy

    import torch

    loader = [torch.from_numpy(t) for t in _batches(x, b)]

    def eval_forward():
        with torch.no_grad():
            for t in loader:
                net(t)

    out = {"torch_eval": eval_forward}
    # Precise BN needs the BN layers in training mode (fvcore leaves the mode to the caller).
    train_net = copy.deepcopy(net).train()

    def swa_update_bn():
        torch.optim.swa_utils.update_bn(loader, train_net)

    out["torch_update_bn"] = swa_update_bn
    try:
        from fvcore.nn.precise_bn import update_bn_stats
    except ImportError:
        return out

    def fv():
        update_bn_stats(train_net, loader, num_iters=len(loader))

    out["fvcore"] = fv
    return out


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm_mb():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_growth(model_path, sizes, b, tmp):
    rows = []
    rng = np.random.default_rng(1)
    for n in sizes:
        path = Path(tmp) / f"calib_{n}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 3, 32, 32))
        for i in range(0, n, 1024):
            arr[i:i + 1024] = rng.normal(size=arr[i:i + 1024].shape)
        arr.flush()
        del arr
        ot.collect(str(model_path), str(path), batch_size=b, provider="cpu")  # warm
        reset = _reset_hwm()
        tracemalloc.start()
        ot.collect(str(model_path), str(path), batch_size=b, provider="cpu")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append({"samples": n, "python_peak_mb": peak / 2**20,
                     "rss_hwm_mb": _hwm_mb() if reset else None})
        path.unlink()
    return rows


def _fastest_torch_threads(net) -> int:
    import torch

    x = torch.randn(256, 3, 32, 32)
    best = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        with torch.no_grad():
            net(x[:64])
            t0 = time.perf_counter()
            for i in range(0, len(x), 64):
                net(x[i:i + 64])
        best[threads] = time.perf_counter() - t0
    return min(best, key=best.get)


ROUTES = [
    ("plain", "onnxruntime inference, BN folded into Conv (the floor)"),
    ("plain_unfolded", "onnxruntime inference, BN mean/var as run-time inputs (no fold)"),
    ("collect_graph", "collection model alone (`session.run`)"),
    ("collect", "`onnx_tools.collect` (data, run, PreciseBN)"),
    ("recalibrate", "whole `recalibrate` (load, rewrite, collect, apply, write)"),
    ("naive", "BN inputs returned whole, reduced in NumPy"),
    ("torch_eval", "PyTorch eval forward"),
    ("fvcore", "fvcore `update_bn_stats` (PyTorch, train mode)"),
    ("torch_update_bn", "`torch.optim.swa_utils.update_bn`"),
]


def markdown(data: dict) -> str:
    """The README table, from the JSON."""
    m = data["machine"]
    wall, cpu = data["seconds"], data.get("cpu_seconds", {})
    plain, unfolded = wall["plain"], wall.get("plain_unfolded")
    lines = [
        f"{data['model']['kind']} with {data['model']['batchnorms']} BN, {data['samples']} "
        f"samples of {'x'.join(map(str, data['model']['input']))}, batch {data['batch_size']}, "
        f"CPU ({m['cpus']} cores, onnxruntime {m['onnxruntime']}, torch threads "
        f"{m.get('torch_threads')}); median of {data.get('rounds', '?')} interleaved rounds. "
        "Ratios are wall time over plain inference (lower is better); CPU time (both threads "
        "summed) in brackets.",
        "",
        "| route | seconds | × plain | × unfolded |",
        "|---|---:|---:|---:|",
    ]
    for key, label in ROUTES:
        if key not in wall:
            continue
        cpu_ratio = (f" ({cpu[key] / cpu['plain']:.2f})" if key in cpu and "plain" in cpu
                     else "")
        unf = f"{wall[key] / unfolded:.2f}" if unfolded else ""
        lines.append(f"| {label} | {wall[key]:.2f} | **{wall[key] / plain:.2f}**{cpu_ratio} "
                     f"| {unf} |")
    if "fvcore" in wall:
        lines.append("")
        lines.append(f"`recalibrate` takes {wall['recalibrate'] / wall['fvcore']:.2f}× the time "
                     "of fvcore's `update_bn_stats` on the same batches.")
    mem = data.get("memory", [])
    if mem:
        cells = ", ".join(
            f"{r['samples']}: {r['python_peak_mb']:.1f} MB"
            + (f" / {r['rss_hwm_mb']:.0f} MB" if r.get("rss_hwm_mb") else "") for r in mem)
        lines.append(f"Memory while collecting from a streamed `.npy` (samples: Python peak / "
                     f"RSS high-water): {cells}.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads; 0 (default): whichever of 1 and all cores runs "
                        "torch's eval forward faster right now (OpenMP threads collapse on a "
                        "busy machine); onnxruntime uses one thread per physical core")
    parser.add_argument("--memory-sizes", default="512,2048,8192")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recalibrate.json"))
    parser.add_argument("--markdown", action="store_true",
                        help="print the README table from --out and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    try:
        import torch

        net = build_torch_resnet()
        torch.set_num_threads(args.threads or _fastest_torch_threads(net))
    except ImportError:
        sys.exit("this benchmark exports its model with torch (pip install torch==2.13.0)")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, 3, 32, 32)).astype(np.float32)
    b = args.batch_size
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "resnet.onnx"
        export(net, model_path)
        num_bn = len(find_batchnorms(onnx.load(model_path)))
        runs = {
            "plain": plain_inference(model_path, x, b),
            "plain_unfolded": plain_unfolded(model_path, x, b),
            "collect_graph": collect_graph(model_path, x, b),
            "collect": collect_only(model_path, x, b),
            "recalibrate": whole_recalibrate(model_path, x, b, Path(tmp) / "out.onnx"),
            "naive": naive_route(model_path, x, b),
            **torch_runs(net, x, b),
        }
        results, cpu = interleaved(runs, args.rounds)
        sizes = [int(s) for s in args.memory_sizes.split(",") if s]
        memory = memory_growth(model_path, sizes, b, tmp)
    out = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "onnx": onnx.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": load},
        "model": {"kind": "ResNet-like CNN", "batchnorms": num_bn, "input": [3, 32, 32]},
        "samples": args.samples, "batch_size": b, "provider": "cpu", "rounds": args.rounds,
        "seconds": results, "cpu_seconds": cpu,
        "ratio_to_plain": {k: v / results["plain"] for k, v in results.items()},
        "ratio_to_plain_unfolded": {k: v / results["plain_unfolded"] for k, v in results.items()},
        "memory": memory,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(markdown(out))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
