"""Benchmark bnref-onnx recalibration against plain inference, the naive route and fvcore.

One run, one machine:

* ``plain``: onnxruntime inference of the exported model over the same batches (BN folded into
  Conv by onnxruntime's optimizer: the hard floor);
* ``collect``: the collection loop of ``bnref-onnx`` (training-mode rewrite, in-graph
  reduction, PreciseBN aggregation); ``recalibrate``: the whole job (load, rewrite, session,
  collect, apply, write);
* ``naive``: every BN input returned as a graph output and reduced in NumPy (float64);
* ``fvcore``: ``fvcore.nn.precise_bn.update_bn_stats`` on the PyTorch model (skipped when
  torch or fvcore is missing), and ``torch_eval``: plain PyTorch inference for scale;
* peak memory (RSS high-water mark and Python/NumPy allocations) as the calibration set grows.

Usage: ``python benchmarks/bench_recalibrate.py [--samples 1024] [--batch-size 64]``. Writes
``benchmarks/results/recalibrate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from onnx_tools.graph import find_batchnorms  # noqa: E402
from onnx_tools.modelio import make_session  # noqa: E402


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


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def plain_inference(model_path, x, b):
    sess, _ = make_session(onnx.load(model_path), "cpu")
    return lambda: [sess.run(None, {"x": x[i:i + b]}) for i in range(0, len(x) // b * b, b)]


def naive_route(model_path, x, b):
    """The same training-mode graph, but every BN input is returned whole and reduced in NumPy."""
    from onnx import helper

    from onnx_tools.rewrite import build_collection_model

    cm = build_collection_model(onnx.load(model_path))
    model = cm.model
    taps = [bn.input for bn in cm.bns]
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(t, 1, None) for t in taps)
    sess, _ = make_session(model, "cpu")

    def run():
        import bnref

        aggs = [bnref.PreciseBN() for _ in taps]
        for i in range(0, len(x) // b * b, b):
            for agg, v in zip(aggs, sess.run(taps, {"x": x[i:i + b]}), strict=True):
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
    import torch

    loader = [torch.from_numpy(x[i:i + b]) for i in range(0, len(x) // b * b, b)]

    def eval_forward():
        with torch.no_grad():
            for t in loader:
                net(t)

    out = {"torch_eval": eval_forward}
    try:
        from fvcore.nn.precise_bn import update_bn_stats
    except ImportError:
        return out
    import copy

    def fv():
        # fvcore only touches BN modules in training mode
        update_bn_stats(copy.deepcopy(net).train(), loader, num_iters=len(loader))

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-sizes", default="512,2048,8192")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recalibrate.json"))
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        net = build_torch_resnet()
    except ImportError:
        sys.exit("this benchmark exports its model with torch (pip install torch==2.13.0)")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, 3, 32, 32)).astype(np.float32)
    b = args.batch_size
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "resnet.onnx"
        export(net, model_path)
        num_bn = len(find_batchnorms(onnx.load(model_path)))
        runs = {
            "plain": plain_inference(model_path, x, b),
            "collect": collect_only(model_path, x, b),
            "recalibrate": whole_recalibrate(model_path, x, b, Path(tmp) / "out.onnx"),
            "naive": naive_route(model_path, x, b),
            **torch_runs(net, x, b),
        }
        for name, fn in runs.items():
            fn()  # warm-up
            results[name] = timed(fn, args.repeat)
            print(f"{name:12s} {results[name]:.3f} s", flush=True)
        sizes = [int(s) for s in args.memory_sizes.split(",") if s]
        memory = memory_growth(model_path, sizes, b, tmp)
    plain = results["plain"]
    ratios = {k: v / plain for k, v in results.items()}
    print(f"\n{num_bn} BN, {args.samples} samples of 3x32x32, batch {b}, CPU "
          f"({os.cpu_count()} cores)")
    print(f"{'route':12s} {'seconds':>8s} {'x plain':>8s}")
    for k, v in results.items():
        print(f"{k:12s} {v:8.3f} {ratios[k]:8.2f}")
    if "fvcore" in results:
        print(f"recalibrate vs fvcore: {results['recalibrate'] / results['fvcore']:.2f}x")
    print("\nmemory while collecting (streamed .npy):")
    for row in memory:
        rss = "n/a" if row["rss_hwm_mb"] is None else f"{row['rss_hwm_mb']:.0f} MB"
        print(f"  {row['samples']:6d} samples: python peak {row['python_peak_mb']:.1f} MB, "
              f"RSS high-water {rss}")
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "onnx": onnx.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__},
        "model": {"kind": "resnet-like CNN", "batchnorms": num_bn, "input": [3, 32, 32]},
        "samples": args.samples, "batch_size": b, "provider": "cpu",
        "seconds": results, "ratio_to_plain": ratios, "memory": memory,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
