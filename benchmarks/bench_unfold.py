"""Benchmark ``unfold`` against one ``recalibrate``, and the unfolded model's inference cost.

Per torchvision model (ResNet-18, MobileNetV3-small; random weights, folded by torch.onnx's
TorchScript default export), over the same calibration data (default 512 images 224x224,
batch 64), in one process and alternating, so the ratios compare like with like on a shared
machine:

* ``recalibrate``: one ``onnx_tools.recalibrate`` of the BN-kept export (the reference cost);
* ``unfold``: ``onnx_tools.unfold`` of the folded export (cached waves, the default); with
  ``--passes`` also ``unfold_passes`` (``waves=False``: D passes from the inputs, D = BN
  depth), the cost the waves remove;
* inference: ``session.run`` of the folded and the unfolded model (default session options,
  as deployed), medians over rounds; and per op type from onnxruntime's profiler, plus the
  number of BatchNormalization nodes left after onnxruntime's optimizer (0: all fused);
* the activation cache's peak size on disk, and the process's peak RSS (``ru_maxrss``).

Usage: ``python benchmarks/bench_unfold.py [--images 512] [--side 224] [--rounds 2]`` writes
``benchmarks/results/unfold.json``; ``--markdown`` prints the docs table from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx_tools as ot  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_images import _cpu_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "unfold.json"
MODELS = ("resnet18", "mobilenet_v3_small")


def export(name: str, side: int, tmp: Path) -> tuple[Path, Path]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(2, 3, side, side)
    kept, folded = tmp / f"{name}_kept.onnx", tmp / f"{name}_folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(kept), dynamo=False, input_names=["x"],
                          training=torch.onnx.TrainingMode.PRESERVE, dynamic_axes={"x": {0: "N"}})
        torch.onnx.export(model, (x,), str(folded), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
    return kept, folded


def inference(path: str, x: np.ndarray, rounds: int, tmp: Path) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp / "optimized.onnx")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    left = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(tmp / "optimized.onnx")).graph.node)
    sess.run(None, {"x": x})
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    prof = ort.SessionOptions()
    prof.enable_profiling = True
    prof.profile_file_prefix = str(tmp / "prof")
    psess = ort.InferenceSession(path, prof, providers=["CPUExecutionProvider"])
    psess.run(None, {"x": x})
    trace = json.loads(Path(psess.end_profiling()).read_text())
    per_op: Counter = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e6
    return {"median_s": statistics.median(times), "bn_left_after_optimizer": left,
            "per_op_s": dict(per_op.most_common())}


def run(images: int, side: int, batch: int, rounds: int, passes: bool = False) -> dict:
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(images, 3, side, side)) * rng.uniform(0.5, 1.5, (images, 1, 1, 1))).astype(np.float32)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        np.save(tmp / "data.npy", data)
        for name in MODELS:
            kept, folded = export(name, side, tmp)
            times: dict[str, list[float]] = {"recalibrate": [], "unfold": []}
            if passes:
                times["unfold_passes"] = []
            depth = sites = cache = 0
            for _ in range(rounds):
                t = time.perf_counter()
                ot.recalibrate(str(kept), str(tmp / "data.npy"), output=str(tmp / "r.onnx"), batch_size=batch)
                times["recalibrate"].append(time.perf_counter() - t)
                t = time.perf_counter()
                res = ot.unfold(str(folded), str(tmp / "data.npy"), output=str(tmp / "u.onnx"), batch_size=batch)
                times["unfold"].append(time.perf_counter() - t)
                depth, sites, cache = res.depth, len(res.inserted), res.cache_peak_bytes
                if passes:
                    t = time.perf_counter()
                    ot.unfold(str(folded), str(tmp / "data.npy"), batch_size=batch, waves=False)
                    times["unfold_passes"].append(time.perf_counter() - t)
            x = data[:batch]
            inf_f = inference(str(folded), x, 10, tmp)
            inf_u = inference(str(tmp / "u.onnx"), x, 10, tmp)
            med = {k: statistics.median(v) for k, v in times.items()}
            results[name] = {
                "sites": sites, "depth": depth, "cache_peak_mb": cache / 2**20,
                "seconds": med, "all_seconds": times,
                "unfold_over_recalibrate": med["unfold"] / med["recalibrate"],
                "inference": {"folded": inf_f, "unfolded": inf_u,
                              "unfolded_over_folded": inf_u["median_s"] / inf_f["median_s"]},
            }
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "inference"}),
                  f"inference ratio {results[name]['inference']['unfolded_over_folded']:.3f}",
                  "BN left", inf_u["bn_left_after_optimizer"], flush=True)
    return {"machine": {"cpu": _cpu_model(), "python": platform.python_version()},
            "images": images, "side": side, "batch_size": batch, "rounds": rounds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "models": results}


def markdown(data: dict) -> str:
    lines = [f"{data['images']} images {data['side']}x{data['side']}, batch {data['batch_size']}, "
             f"median of {data['rounds']} alternating round(s) on {data['machine']['cpu']}; peak RSS of "
             f"the process {data['peak_rss_mb']:.0f} MB.", "",
             "| model | sites | depth | recalibrate (BN kept) | unfold (folded) | unfold / recalibrate "
             "| D passes / recalibrate | cache peak on disk | inference unfolded / folded "
             "| BN left after onnxruntime's optimizer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["models"].items():
        s = r["seconds"]
        passes = (f"{s['unfold_passes'] / s['recalibrate']:.1f}x" if "unfold_passes" in s else "not run")
        lines.append(f"| {name} | {r['sites']} | {r['depth']} | {s['recalibrate']:.1f} s | {s['unfold']:.1f} s "
                     f"| {r['unfold_over_recalibrate']:.2f}x | {passes} | {r['cache_peak_mb']:.0f} MB "
                     f"| {r['inference']['unfolded_over_folded']:.2f}x "
                     f"| {r['inference']['unfolded']['bn_left_after_optimizer']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--passes", action="store_true", help="also time waves=False (D passes)")
    parser.add_argument("--output", type=Path, default=OUT)
    parser.add_argument("--markdown", action="store_true", help="print the table from --output")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.output.read_text())))
        return 0
    data = run(args.images, args.side, args.batch_size, args.rounds, args.passes)
    args.output.write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
