"""bnref's kernels against PyTorch's native CPU BatchNorm and a plain copy, in one run.

For each case (layout x dtype) and operation (training forward, eval forward, training
backward) it times, interleaved round by round so that machine noise hits all of them alike:

* bnref: ``batch_norm_train`` / ``batch_norm_eval`` / ``batch_norm_train_backward``;
* PyTorch: ``F.batch_norm`` (training / eval) and the autograd backward of the training-mode
  call (``torch.autograd.grad`` on a retained graph: the native batch_norm_backward kernel),
  with ``torch.set_num_threads(threads)``;
* a plain ``x.copy()`` — the memory-bandwidth floor for an op that returns a new array.

In each round every function runs 1 + ``--repeat`` times back to back. The headline ratio is
the median of the repeated calls: each library's steady state, as in a loop. The first call of
each group is reported apart ("single call"): it pays for whatever ran just before, chiefly
PyTorch's OpenMP threads, which spin for a millisecond or two after each op (holding the
second core while bnref runs) and must be woken after sleeping (PyTorch's small ops then take
up to 2x longer). The default wait policy is kept: it is how PyTorch runs.

It reports medians and bnref/PyTorch ratios (and the best call, less sensitive to other load
on a shared machine), the cost of ``PreciseBN.update`` and ``Moments.merge`` (O(C)), and
bnref's peak extra memory relative to the input (tracemalloc, from a state where the scratch
and constants the kernels keep between calls were released, so the ones this call needs are
counted), a NumPy floor for exact statistics in the (N, C) case (on one thread and on two),
and writes everything with a machine description (CPU model, family/model numbers, L1d / L2 /
L3 sizes and how many CPUs share them, cores) to ``benchmarks/results/kernels.json`` (the
latest run) and ``benchmarks/results/kernels-<cpu>.json`` (the latest run on this CPU kind,
named after the CPU model). The README shows one table per CPU kind (``readme_markdown``,
used by ``scripts/update_readme.py``): the newest run of each CPU model found in
``benchmarks/results/kernels*.json``.

``--sweep`` times the float32 4-D cases under several block settings (``block_elems`` /
``max_block_elems``, in Ki values), each against PyTorch in the same round, and adds the run to
``benchmarks/results/kernels-sweep-<cpu>.json`` (``{"runs": [...]}``): the measurements behind
the block sizes of ``bnref/_kernels/config.py``, to rerun on another CPU kind.

    python benchmarks/bench_kernels.py                # run (a few minutes), write the JSON
    python benchmarks/bench_kernels.py --quick        # fewer rounds
    python benchmarks/bench_kernels.py --float32-forward  # the opt-in float32 forward path
    python benchmarks/bench_kernels.py --markdown     # render the README tables from the JSONs
    python benchmarks/bench_kernels.py --sweep [--sweep-configs 64/256,64/64,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bnref  # noqa: E402
from bnref import runtime  # noqa: E402
from bnref._kernels import config  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS = RESULTS_DIR / "kernels.json"

# name -> (shape, channel axis, torch memory format)
CASES = {
    "NCHW (64,256,28,28)": ((64, 256, 28, 28), 1, "contiguous"),
    "NHWC (64,28,28,256)": ((64, 28, 28, 256), -1, "channels_last"),
    "(256,4096)": ((256, 4096), 1, "contiguous"),
    "NCDHW (8,64,16,32,32)": ((8, 64, 16, 32, 32), 1, "contiguous"),
}
OPS = ("train_fwd", "eval_fwd", "train_bwd")
TARGETS = {"NCHW (64,256,28,28)": 1.5, "NHWC (64,28,28,256)": 1.5, "(256,4096)": 3.0,
           "NCDHW (8,64,16,32,32)": 1.5}
#: Targets withdrawn (issue 14: no compiled kernel, so float32 (N, C) at 10^6 values stays above 3x).
RETIRED = {("(256,4096)", "float32")}


def cpu_kind(cpu: str) -> str:
    """File-name key of a CPU model name: ``"AMD EPYC"`` -> ``"amd-epyc"``."""
    return re.sub(r"[^a-z0-9]+", "-", cpu.lower().replace("(r)", "").replace("(tm)", "")).strip("-") or "unknown"


def _cpuinfo() -> dict:
    """The first processor's entry of /proc/cpuinfo (empty where there is none)."""
    info: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if info:
                    break
                continue
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def machine() -> dict:
    ci = _cpuinfo()
    cpu = ci.get("model name") or platform.processor() or "unknown"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {
        "cpu": cpu,
        "cpu_kind": cpu_kind(cpu),
        "cpu_vendor": ci.get("vendor_id"),
        "cpu_family_model_stepping": [ci.get("cpu family"), ci.get("model"), ci.get("stepping")],
        "caches": config.cpu_caches(),
        "cores": cores,
        "cpus_online": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "bnref_threads": runtime.num_threads(),
        "bnref_block_elems": runtime.settings()["block_elems"],
        "bnref_float32_forward": runtime.settings()["float32_forward"],
        "bnref_max_block_elems": runtime.settings()["max_block_elems"],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def _timer(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _stats_floor(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 column sums and sums of squares of (N, C) ``x``, as two single NumPy calls."""
    return np.add.reduce(x, axis=0, dtype=np.float64), np.einsum("nc,nc->c", x, x, dtype=np.float64)


#: The floor's second thread: one worker kept for the whole run, as bnref keeps its pool's.
_FLOOR_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor")


def _stats_floor_threads(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_stats_floor`` with the second half of the rows on a second, already running thread."""
    h = x.shape[0] // 2
    other = _FLOOR_POOL.submit(_stats_floor, x[h:])
    s, q = _stats_floor(x[:h])
    s2, q2 = other.result()
    return s + s2, q + q2


def _setup(name: str, dtype: np.dtype) -> tuple[np.ndarray, dict]:
    """Case ``name``'s data and the functions to time: ``(library, op) -> callable``."""
    import torch
    import torch.nn.functional as F

    shape, axis, fmt = CASES[name]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    scale = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
    bias = (0.1 * rng.standard_normal(C)).astype(dtype)

    # Torch sees the same memory: NHWC data as an NCHW-shaped channels_last tensor.
    def tview(a):
        t = torch.from_numpy(a)
        return t.permute(0, 3, 1, 2) if fmt == "channels_last" else t

    xt, gt = tview(x), tview(dy)
    w, b = torch.from_numpy(scale), torch.from_numpy(bias)
    rm, rv = torch.zeros(C, dtype=xt.dtype), torch.ones(C, dtype=xt.dtype)
    xg = xt.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    yg = F.batch_norm(xg, rm.clone(), rv.clone(), wg, bg, training=True)
    _, cache = bnref.batch_norm_train(x, scale, bias, axis=axis)
    mean, var = cache.mean, cache.var

    fns = {
        ("bnref", "train_fwd"): lambda: bnref.batch_norm_train(x, scale, bias, axis=axis),
        ("torch", "train_fwd"): lambda: F.batch_norm(xt, rm, rv, w, b, training=True),
        ("bnref", "eval_fwd"): lambda: bnref.batch_norm_eval(x, scale, bias, mean, var, axis=axis),
        ("torch", "eval_fwd"): lambda: F.batch_norm(xt, rm, rv, w, b, training=False),
        ("bnref", "train_bwd"): lambda: bnref.batch_norm_train_backward(dy, cache),
        ("torch", "train_bwd"): lambda: torch.autograd.grad(yg, [xg, wg, bg], gt, retain_graph=True),
        ("copy", "copy"): lambda: x.copy(),
    }
    return x, fns


def bench_case(name: str, dtype: np.dtype, rounds: int, threads: int, repeat: int = 2) -> dict:
    shape, axis, _ = CASES[name]
    x, fns = _setup(name, dtype)
    if x.ndim == 2:  # the (N, C) case, where NumPy's per-call costs weigh most
        # A floor for any NumPy implementation of exact statistics: the two float64 reductions
        # (sum and sum of squares) as single NumPy calls, without the shift that |mean| >> std
        # needs and without the normalization.
        fns[("floor", "stats64")] = lambda: _stats_floor(x)
        # The same split in two halves of rows, one on a second thread (NumPy releases the GIL
        # in its loops): what a second core can add to that floor.
        fns[("floor", "stats64_2t")] = lambda: _stats_floor_threads(x)
    times: dict = {k: [] for k in fns}  # steady state
    first: dict = {k: [] for k in fns}  # the first call after another function
    rounds_med: dict = {k: [] for k in fns}  # per round: median of its steady-state calls
    for fn in fns.values():  # warm-up
        fn()
    # Each round runs every function 1 + repeat times back to back. The first call of a group
    # pays for what ran before it (PyTorch's OpenMP threads spin for a millisecond or two after
    # each op and hold the second core; after bnref ran they are asleep and must be woken):
    # it is kept apart as the "single call" figure. The next `repeat` calls are each library's
    # steady state, the headline figure.
    for _ in range(rounds):
        for k, fn in fns.items():
            first[k].append(_timer(fn))
            steady = [_timer(fn) for _ in range(repeat)]
            times[k] += steady
            rounds_med[k].append(statistics.median(steady))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    med1 = {k: statistics.median(v) * 1e3 for k, v in first.items()}

    def paired(op: str, per_round: dict) -> float:
        """Median over rounds of the ratio within a round: noise that slows a whole round
        (a shared machine) cancels."""
        b, t = per_round[("bnref", op)], per_round[("torch", op)]
        return statistics.median(bi / ti for bi, ti in zip(b, t, strict=True))

    # Peak extra memory of bnref (NumPy allocations are traced), relative to the input size.
    mem = {}
    for op in OPS:
        # From a clean state: the scratch and constants the kernels keep between calls are
        # released first, so the traced peak includes what this call makes them keep.
        runtime.release_kept_memory()
        tracemalloc.start()
        tracemalloc.reset_peak()
        fns[("bnref", op)]()
        mem[op] = tracemalloc.get_traced_memory()[1] / x.nbytes
        tracemalloc.stop()

    row = {
        "case": name,
        "dtype": np.dtype(dtype).name,
        "shape": list(shape),
        "axis": axis,
        "copy_ms": round(med[("copy", "copy")], 3),
        "ops": {},
    }
    if ("floor", "stats64") in med:
        row["numpy_stats_floor_ms"] = round(med[("floor", "stats64")], 3)
        row["numpy_stats_floor_over_torch_train_fwd"] = round(
            med[("floor", "stats64")] / med[("torch", "train_fwd")], 3
        )
        row["numpy_stats_floor_2threads_ms"] = round(med[("floor", "stats64_2t")], 3)
        row["numpy_stats_floor_2threads_over_torch_train_fwd"] = round(
            med[("floor", "stats64_2t")] / med[("torch", "train_fwd")], 3
        )
    for op in OPS:
        bn, th = med[("bnref", op)], med[("torch", op)]
        bb, tb = best[("bnref", op)], best[("torch", op)]
        row["ops"][op] = {
            "bnref_ms": round(bn, 3),
            "torch_ms": round(th, 3),
            "ratio": round(paired(op, rounds_med), 3),
            "ratio_of_medians": round(bn / th, 3),
            "bnref_best_ms": round(bb, 3),
            "torch_best_ms": round(tb, 3),
            "ratio_best": round(bb / tb, 3),
            "single_call": {
                "bnref_ms": round(med1[("bnref", op)], 3),
                "torch_ms": round(med1[("torch", op)], 3),
                "ratio": round(paired(op, first), 3),
            },
            "bnref_peak_mem_over_input": round(mem[op], 3),
        }
    bn_total = sum(med[("bnref", op)] for op in ("train_fwd", "train_bwd"))
    th_total = sum(med[("torch", op)] for op in ("train_fwd", "train_bwd"))
    row["train_fwd_plus_bwd_ratio"] = round(bn_total / th_total, 3)
    return row


def bench_aggregation(rounds: int) -> dict:
    """Cost of the O(C) steps beside a forward: PreciseBN.update and Moments.merge (C=256)."""
    rng = np.random.default_rng(1)
    C = 256
    ms = [
        bnref.Moments.from_mean_var(rng.standard_normal(C), rng.uniform(0.5, 2, C), 50176)
        for _ in range(8)
    ]
    p = bnref.PreciseBN()
    upd, mrg = [], []
    for i in range(max(rounds * 20, 200)):
        upd.append(_timer(lambda i=i: p.update(ms[i % 8])))
        mrg.append(_timer(lambda i=i: ms[i % 8].merge(ms[(i + 1) % 8])))
    return {
        "channels": C,
        "precise_update_us": round(statistics.median(upd) * 1e6, 2),
        "moments_merge_us": round(statistics.median(mrg) * 1e6, 2),
    }


def _start(rounds: int, threads: int, repeat: int) -> dict:
    """Set both libraries' thread counts; the fields every results file starts with."""
    import torch

    torch.set_num_threads(threads)
    runtime.set_num_threads(threads)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "rounds": rounds,
        "repeat": repeat,
    }


def run(rounds: int, threads: int, repeat: int = 2) -> dict:

    out = _start(rounds, threads, repeat)
    out.update({
        "statistic": (
            "per round every function runs 1 + repeat times back to back; ratio: median over "
            "rounds of bnref/PyTorch within the round (each side: median of its repeat "
            "steady-state calls); *_ms: medians over all steady-state calls; ratio_best: ratio "
            "of the minima; single_call: the same for the first call of each group (right "
            "after the other library ran)"
        ),
        "results": [],
    })
    for name in CASES:
        for dtype in (np.float32, np.float64):
            row = bench_case(name, np.dtype(dtype), rounds, threads, repeat)
            out["results"].append(row)
            o = row["ops"]
            print(
                f"{name:24s} {row['dtype']:8s} copy {row['copy_ms']:7.2f} ms | "
                + " | ".join(
                    f"{op} {o[op]['bnref_ms']:7.2f}/{o[op]['torch_ms']:7.2f} ms = {o[op]['ratio']:.2f}x"
                    f" (single call {o[op]['single_call']['ratio']:.2f}x)"
                    for op in OPS
                ),
                flush=True,
            )
    agg = bench_aggregation(rounds)
    nchw32 = out["results"][0]["ops"]["train_fwd"]["bnref_ms"]
    agg["fraction_of_nchw_float32_forward"] = round(agg["precise_update_us"] / 1e3 / nchw32, 6)
    out["aggregation"] = agg
    print(
        f"PreciseBN.update {agg['precise_update_us']:.1f} us, Moments.merge "
        f"{agg['moments_merge_us']:.1f} us (C={agg['channels']}); a float32 NCHW forward is "
        f"{nchw32:.1f} ms"
    )
    return out


#: ``--sweep``: block settings as ``block_elems/max_block_elems`` in Ki values. The first is the
#: reference every other is paired with in each round (``vs_ref``).
SWEEP_CONFIGS = "64/256,32/32,64/64,128/128,128/256,256/256,64/512,256/1024"
SWEEP_CASES = ("NCHW (64,256,28,28)", "NHWC (64,28,28,256)", "NCDHW (8,64,16,32,32)")


def _plan_summary(x: np.ndarray, axis: int) -> str:
    """The structure the kernels pick for ``x`` under the tuning in force, in a few words."""
    from bnref._kernels import layout

    axis = axis % x.ndim
    L = layout.Layout(x, axis)
    mode = "row" if L.row_mode else ("tiled" if L.tiled else "column")
    fused = layout.whole_channels(x, axis) is not None
    return f"{mode}, {len(L.blocks)} blocks of <= {L.max_block // 1024} Ki" + (", fused" if fused else "")


def sweep(configs: list[tuple[int, int]], rounds: int, threads: int, repeat: int = 2) -> dict:
    """float32 4-D cases under each block setting, against PyTorch in the same round.

    In each round, for each op: PyTorch runs 1 + repeat times, then bnref under each setting
    (in an order rotated round by round) 1 + repeat times; the first call of each group is
    dropped. ``ratio``: median over rounds of bnref / PyTorch within the round; ``vs_ref``:
    median over rounds of bnref's time over its time under the first setting in that round
    (the cleaner comparison between settings on a shared machine).
    """

    out = {**_start(rounds, threads, repeat), "sweep": []}
    for name in SWEEP_CASES:
        _, axis, _ = CASES[name]
        x, fns = _setup(name, np.dtype(np.float32))
        plans = {}
        for c in configs:
            with runtime.tuning(block_elems=c[0], max_block_elems=c[1]):
                plans[c] = _plan_summary(x, axis)
                for op in OPS:
                    fns[("bnref", op)]()  # warm-up
        tms = {op: [] for op in OPS}
        per = {(op, c): ([], [], []) for op in OPS for c in configs}  # ms, ratio, vs_ref
        for r in range(rounds):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            for op in OPS:
                tf = fns[("torch", op)]
                tf()
                t = statistics.median(_timer(tf) for _ in range(repeat))
                tms[op].append(t)
                got = {}
                for c in order:
                    with runtime.tuning(block_elems=c[0], max_block_elems=c[1]):
                        bf = fns[("bnref", op)]
                        bf()
                        got[c] = statistics.median(_timer(bf) for _ in range(repeat))
                for c in configs:
                    ms, ratio, rel = per[op, c]
                    ms.append(got[c])
                    ratio.append(got[c] / t)
                    rel.append(got[c] / got[configs[0]])
        case = {"case": name, "dtype": "float32",
                "torch_ms": {op: round(statistics.median(tms[op]) * 1e3, 3) for op in OPS},
                "configs": []}
        for c in configs:
            case["configs"].append({
                "block_elems": c[0], "max_block_elems": c[1], "plan": plans[c],
                "ops": {op: {"bnref_ms": round(statistics.median(per[op, c][0]) * 1e3, 3),
                             "ratio": round(statistics.median(per[op, c][1]), 3),
                             "vs_ref": round(statistics.median(per[op, c][2]), 3)} for op in OPS},
            })
        out["sweep"].append(case)
        print(sweep_markdown({"sweep": [case]}, header=False), flush=True)
    out["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out


def sweep_markdown(data: dict, header: bool = True) -> str:
    """The sweep as a table: ratio to PyTorch per op (and bnref's time relative to the first setting)."""
    lines = []
    if header:
        m = data["machine"]
        lines += [f"Block-size sweep, {data['date'][:10]} on {_cpu_text(m)}; {data['rounds']} rounds, "
                  f"load average {m['load_average_at_start'][0]:.1f} at start, "
                  f"{data.get('load_average_at_end', [float('nan')])[0]:.1f} at end. Ratio = bnref / "
                  "PyTorch in the same round (in brackets: bnref's time over its time with the first "
                  "setting in the same round).", ""]
    lines += ["| case | block / max (Ki) | structure | train fwd | eval fwd | train bwd |",
              "|---|---|---|---:|---:|---:|"]
    for case in data["sweep"]:
        for c in case["configs"]:
            cells = " | ".join(f"{c['ops'][op]['ratio']:.2f} ({c['ops'][op]['vs_ref']:.2f})" for op in OPS)
            lines.append(f"| {case['case']} | {c['block_elems'] // 1024} / {c['max_block_elems'] // 1024} "
                         f"| {c['plan']} | {cells} |")
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10} KiB"


def _cpu_text(m: dict) -> str:
    """The CPU of a run, named, with its caches where recorded."""
    c = m.get("caches")
    if not c or not (c.get("l2") or c.get("l3")):
        return f"{m['cpu']} (caches not recorded)"

    def shared(key: str) -> str:
        n = c.get(f"{key}_shared_cpus")
        return "" if n is None else (" per CPU" if n == 1 else f" shared by {n} CPUs")

    return (f"{m['cpu']} (L1d {_size(c.get('l1d'))}, L2 {_size(c.get('l2'))}{shared('l2')}, "
            f"L3 {_size(c.get('l3'))}{shared('l3')})")


def markdown(data: dict) -> str:
    """The README table, from the JSON."""
    m = data["machine"]
    load = m.get("load_average_at_start")
    lines = [
        f"Measured {data['date'][:10]} on {_cpu_text(m)}, {m['cores']} cores; numpy {m['numpy']}, "
        f"torch {m['torch']} ({m.get('torch_threads')} threads), bnref {m['bnref_threads']} "
        f"threads. {data['rounds']} interleaved rounds; in each, every function runs "
        f"{1 + data.get('repeat', 0)} times back to back: the table shows the median of the last "
        f"{data.get('repeat', 0)} (steady state); *single call* is the median ratio of the first "
        "call of each group, right after the other library ran. Times in ms; ratio = "
        "bnref / PyTorch (lower is better)."
        + (f" Load average at start: {load[0]:.1f}." if load else "")
        + (" bnref float32 forward path: on." if m.get("bnref_float32_forward") else ""),
        "",
        "| case | dtype | copy | train fwd | eval fwd | train bwd | fwd+bwd | single call "
        "(fwd / eval / bwd) | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        cells = []
        for op in OPS:
            o = r["ops"][op]
            cells.append(f"{o['bnref_ms']:.1f} / {o['torch_ms']:.1f} (**{o['ratio']:.2f}**)")
        tgt = TARGETS.get(r["case"], "")
        tcell = "retired" if (r["case"], r["dtype"]) in RETIRED else (f"≤ {tgt}" if tgt else "")
        single = " / ".join(f"{r['ops'][op]['single_call']['ratio']:.2f}" for op in OPS)
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['copy_ms']:.1f} | " + " | ".join(cells)
            + f" | {r['train_fwd_plus_bwd_ratio']:.2f} | {single} | {tcell} |"
        )
    a = data.get("aggregation")
    if a:
        lines += [
            "",
            f"`PreciseBN.update`: {a['precise_update_us']:.0f} µs, `Moments.merge`: "
            f"{a['moments_merge_us']:.0f} µs for C = {a['channels']} "
            f"({100 * a['fraction_of_nchw_float32_forward']:.3f} % of a float32 NCHW forward).",
        ]
    floors = ", ".join(
        f"{r['case']} {r['dtype']} {r['numpy_stats_floor_over_torch_train_fwd']:.2f}×"
        + (
            f" (rows split over two threads: {r['numpy_stats_floor_2threads_over_torch_train_fwd']:.2f}×)"
            if "numpy_stats_floor_2threads_over_torch_train_fwd" in r
            else ""
        )
        for r in data["results"]
        if "numpy_stats_floor_over_torch_train_fwd" in r
    )
    if floors:
        lines.append(
            "NumPy floor for exact statistics (the float64 sum and sum of squares as two single "
            f"NumPy calls, nothing else) over PyTorch's whole training forward: {floors}."
        )
    peak = max(o["bnref_peak_mem_over_input"] for r in data["results"] for o in r["ops"].values())
    lines.append(f"Peak extra memory of bnref (output included): ≤ {peak:.2f} × the input size.")
    return "\n".join(lines)


def latest_per_cpu(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """The newest run of each CPU model in ``results_dir/kernels*.json`` (sweeps excluded).

    The latest run overall (``kernels.json``) comes first, then the other CPU kinds by name.
    """
    best: dict[str, dict] = {}
    for path in sorted(results_dir.glob("kernels*.json")):
        if path.name.startswith("kernels-sweep"):
            continue
        data = json.loads(path.read_text())
        if "results" not in data or data["machine"].get("bnref_float32_forward"):
            continue
        key = data["machine"]["cpu"]
        if key not in best or data["date"] > best[key]["date"]:
            best[key] = data
    latest = results_dir / RESULTS.name
    first = json.loads(latest.read_text())["machine"]["cpu"] if latest.exists() else None
    return sorted(best.values(), key=lambda d: (d["machine"]["cpu"] != first, d["machine"]["cpu"]))


def readme_markdown(results_dir: Path = RESULTS_DIR) -> str:
    """The README's kernels section: one table per CPU kind measured, the CPU named."""
    runs = latest_per_cpu(results_dir)
    return "\n\n".join(f"#### {d['machine']['cpu']}\n\n{markdown(d)}" for d in runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; --sweep: 9)")
    ap.add_argument("--quick", action="store_true", help="5 rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="steady-state calls per function and round")
    ap.add_argument("--out", type=Path, default=None,
                    help="write here only (default: kernels.json and kernels-<cpu>.json)")
    ap.add_argument("--markdown", action="store_true",
                    help="print the README tables (one per CPU kind) from the JSONs and exit")
    ap.add_argument(
        "--float32-forward", action="store_true",
        help="opt-in float32 forward path (<= 2 eps32 instead of the float64 answer rounded once)",
    )
    ap.add_argument("--sweep", action="store_true",
                    help="float32 4-D cases under several block settings (see --sweep-configs)")
    ap.add_argument("--sweep-configs", default=SWEEP_CONFIGS,
                    help="block_elems/max_block_elems in Ki values, comma-separated; the first is "
                         f"the reference (default {SWEEP_CONFIGS})")
    args = ap.parse_args(argv)
    if args.markdown:
        if args.out is not None:
            data = json.loads(args.out.read_text())
            if "runs" in data:
                print("\n\n".join(sweep_markdown(d) for d in data["runs"]))
            else:
                print(sweep_markdown(data) if "sweep" in data else markdown(data))
        else:
            print(readme_markdown())
        return 0
    kind = cpu_kind(machine()["cpu"])
    rounds = 5 if args.quick else args.rounds or (9 if args.sweep else 15)
    if args.sweep:
        configs = [tuple(int(v) * 1024 for v in c.split("/")) for c in args.sweep_configs.split(",")]
        data = sweep(configs, rounds, args.threads, args.repeat)
        out = args.out or RESULTS_DIR / f"kernels-sweep-{kind}.json"
        # Sweeps on one CPU kind accumulate in its file (repeated runs show the noise).
        kept = json.loads(out.read_text()).get("runs", []) if out.exists() else []
        text = sweep_markdown(data)
        data, outs = {"runs": kept + [data]}, [out]
    else:
        with runtime.tuning(float32_forward=args.float32_forward):
            data = run(rounds, args.threads, args.repeat)
        if args.out is not None:
            outs = [args.out]
        elif args.float32_forward:  # not the default configuration: kept out of the per-CPU files
            outs = [RESULTS_DIR / "kernels-float32-forward.json"]
        else:
            outs = [RESULTS, RESULTS_DIR / f"kernels-{kind}.json"]
        text = markdown(data)
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")
    print()
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
