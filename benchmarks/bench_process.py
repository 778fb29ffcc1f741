"""Whole-process cost of ``bnref-onnx recalibrate`` against a plain onnxruntime script.

Users run the tool as a process, so this times processes, start to exit, side by side and
interleaved (the order alternates every round; medians of the rounds, ratios within a round):

* ``plain``: a Python script that imports numpy and onnxruntime, creates a session of the
  exported model (the tool's session options), and runs it over the same batches of the same
  memory-mapped ``.npy`` (the floor a user would compare with);
* ``recalibrate``: ``bnref-onnx recalibrate MODEL --data calib.npy -o OUT --quiet``;
* ``startup``: ``bnref-onnx`` up to a ready collection session and no further: the imports,
  loading, BN analysis, rewrite and session creation (an in-process probe timed with
  ``perf_counter`` from the interpreter's start; the interpreter's own start is reported
  apart as ``python``);
* the import time of ``onnx`` and the ``ml_dtypes`` version it pulls in (``import onnx``
  imports ml_dtypes; 0.7.0's extension takes ~0.9 s to import here, 0.5.4's ~0.1 s).

Usage: ``python benchmarks/bench_process.py [--samples 1024] [--rounds 7]`` writes
``benchmarks/results/process.json``; ``--markdown`` prints the README table from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "process.json"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PLAIN = """
import sys
import numpy as np
import onnxruntime as ort
model, data, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = ort.SessionOptions()
options.log_severity_level = 3
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
x = np.load(data, mmap_mode="r")
name = session.get_inputs()[0].name
for start in range(0, len(x) // batch * batch, batch):
    session.run(None, {name: np.ascontiguousarray(x[start:start + batch])})
"""

STARTUP = """
import time
t0 = time.perf_counter()
import sys
from onnx_tools.cli import build_parser
args = build_parser().parse_args(["recalibrate", sys.argv[1], "--data", sys.argv[2], "-o", "x"])
t_cli = time.perf_counter()
import onnx, onnxruntime
t_imports = time.perf_counter()
from onnx_tools.analysis import analyze_model
from onnx_tools.rewrite import build_collection_model
from onnx_tools.session import make_session
analysis = analyze_model(args.model)
t_load = time.perf_counter()
cm = build_collection_model(analysis.model, bns=analysis.batchnorms, training_kernel=True, batch_size=64)
t_rewrite = time.perf_counter()
make_session(cm.model, "cpu")
t_session = time.perf_counter()
print(t_cli - t0, t_imports - t_cli, t_load - t_imports, t_rewrite - t_load, t_session - t_rewrite)
"""


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _startup(model: Path, data: Path) -> list[float]:
    out = subprocess.run([sys.executable, "-c", STARTUP, str(model), str(data)], check=True,
                         cwd=ROOT, capture_output=True, text=True).stdout
    return [float(v) for v in out.split()]


def _onnx_import() -> tuple[float, str]:
    code = ("import time; t = time.perf_counter(); import onnx; t = time.perf_counter() - t; "
            "import ml_dtypes; print(t, ml_dtypes.__version__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0]), out[1]


def run(samples: int, batch: int, rounds: int) -> dict:
    import onnxruntime
    from bench_recalibrate import build_torch_resnet, export

    tmp = Path(tempfile.mkdtemp(prefix="bnref-bench-process-"))
    model, data, plain = tmp / "model.onnx", tmp / "calib.npy", tmp / "plain.py"
    export(build_torch_resnet(), model)
    rng = np.random.default_rng(0)
    np.save(data, rng.normal(size=(samples, 3, 32, 32)).astype(np.float32))
    plain.write_text(PLAIN)
    tool = [sys.executable, "-m", "onnx_tools", "recalibrate", str(model), "--data", str(data),
            "-o", str(tmp / "out.onnx"), "--quiet", "--batch-size", str(batch), "--provider", "cpu"]
    routes = {
        "python": [sys.executable, "-c", "pass"],
        "plain": [sys.executable, str(plain), str(model), str(data), str(batch)],
        "recalibrate": tool,
    }
    times: dict[str, list[float]] = {k: [] for k in routes}
    steps: list[list[float]] = []
    for name in routes:
        _wall(routes[name])  # warm the page cache
    for r in range(rounds):
        order = list(routes) if r % 2 == 0 else list(reversed(routes))
        for name in order:
            times[name].append(_wall(routes[name]))
        steps.append(_startup(model, data))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()),
              flush=True)
    ratios = [rc / p for rc, p in zip(times["recalibrate"], times["plain"], strict=True)]
    step_names = ["cli", "imports", "load", "rewrite", "session"]
    step_med = {n: statistics.median(s[i] for s in steps) for i, n in enumerate(step_names)}
    onnx_import, ml_dtypes_version = _onnx_import()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(),
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "onnxruntime": onnxruntime.__version__, "ml_dtypes": ml_dtypes_version},
        "samples": samples, "batch_size": batch, "rounds": rounds,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_recalibrate_over_plain": statistics.median(ratios),
        "startup_s": step_med,
        "startup_total_s": sum(step_med.values()),
        "onnx_import_s": onnx_import,
    }


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def markdown(res: dict) -> str:
    """The README table, from a results file."""
    m, s = res["median_s"], res["startup_s"]
    lines = [
        f"Measured {res['date']} on {res['machine']}; onnxruntime {res['versions']['onnxruntime']}, "
        f"ml_dtypes {res['versions']['ml_dtypes']}. ResNet-like CNN (11 BN), {res['samples']} samples of "
        f"3x32x32 from a memory-mapped .npy, batch {res['batch_size']}; whole processes, "
        f"median of {res['rounds']} interleaved rounds.",
        "",
        "| process | seconds | × plain script |",
        "|---|---:|---:|",
        f"| `python -c pass` (the interpreter alone) | {m['python']:.2f} | {m['python'] / m['plain']:.2f} |",
        f"| plain onnxruntime script (import, session, run every batch) | {m['plain']:.2f} | **1.00** |",
        f"| `bnref-onnx recalibrate` (everything, model written) | {m['recalibrate']:.2f} | "
        f"**{res['ratio_recalibrate_over_plain']:.2f}** |",
        "",
        f"Startup of `bnref-onnx` up to a ready collection session: **{res['startup_total_s']:.2f} s** "
        f"(command line {s['cli']:.2f}, `import onnx, onnxruntime` {s['imports']:.2f}, load and find "
        f"BN {s['load']:.2f}, rewrite {s['rewrite']:.2f}, session {s['session']:.2f}); "
        f"`import onnx` alone: {res['onnx_import_s']:.2f} s.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    res = run(args.samples, args.batch_size, args.rounds)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
