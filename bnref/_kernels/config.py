"""The kernels' tuning: block sizes, mode thresholds and thread count, and the values in force.

The constants are the defaults. ``settings`` holds the values the kernels read at each call;
users change them through ``bnref.runtime`` (``set_num_threads``, ``tuning``), which imports
this module (nothing here imports the rest of bnref, so there is no cycle).

Block sizes and the CPU's caches. The block sizes are constants, not derived from the cache
sizes (``cpu_caches`` reads them; the benchmarks record them with every run). Measured with
``python benchmarks/bench_kernels.py --sweep`` (``benchmarks/results/kernels-sweep-amd-epyc.json``:
three runs of 9 rounds, 2026-12-02, AMD EPYC family 26 (Zen 5), L1d 48 KiB, L2 1 MiB per
core, L3 32 MiB, 2 cores shared with other work, load average 1.3-3.1): float32 train forward
/ eval forward / train backward, bnref's time relative to the defaults (64 Ki / 256 Ki) in the
same round, lowest-highest of the three runs (settings that give the same plan as the
defaults, e.g. 128 Ki / 256 Ki, moved by 0.89-1.19: the noise):

=====================  =====================  ==================  ==================  ==================
case                   block / max (Ki)       train fwd           eval fwd            train bwd
=====================  =====================  ==================  ==================  ==================
NCHW (64,256,28,28)    32/32, 64/64 (row)     0.64-0.94           1.01-1.29           0.78-1.06
                       128/128 (column)       0.97-1.21           1.08-1.17           1.04-1.14
                       64/512, 256/1024       0.75-0.93           0.80-0.93           0.87-1.04
NHWC (64,28,28,256)    32/32                  1.42-1.78           1.40-1.51           1.43-1.83
                       64/64                  1.26-1.32           1.14-1.19           1.13-1.53
                       128/128                1.05-1.07           0.93-1.07           0.96-1.11
                       64/512                 0.96-1.09           0.93-1.25           1.08-1.24
                       256/1024 (784 Ki)      1.14-1.46           1.20-1.44           1.35-1.65
NCDHW (8,64,16,32,32)  32/32, 64/64           0.92-1.00           1.13-1.54           0.96-1.04
                       128/128                0.90-0.96           0.99-1.02           0.96-1.00
                       64/512, 256/1024       1.91-2.95           1.24-1.52           1.37-1.53
=====================  =====================  ==================  ==================  ==================

So on this CPU the defaults are the best setting or within noise of it for NHWC and NCDHW;
NCHW's forward gains 7-25 % with 512 Ki blocks, but at 512 Ki NCDHW's channels (128 Ki
values) fall below half a block and leave row mode, 2-3x slower in training. What decides is
where the mode thresholds fall, not the cache: a rule scaling blocks with L2 (a fixed
fraction of L2 per core) gives the defaults on this 1 MiB-L2 CPU and 512 Ki on one with
2 MiB, which is the setting that is 2-3x slower for NCDHW here. No rule was adopted, since it
could be checked on only one CPU kind. To tune for another, run the sweep there.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

#: Values per block: 64 Ki float64 = 512 KiB, half the L2 of the AMD EPYC (Zen 5) cores measured
#: (module docstring); also sets which channels take the fused passes (``FUSE_MAX_BLOCKS``).
BLOCK_ELEMS = 1 << 16
#: Large inputs take blocks of up to this many values (1/16 of the input): fewer, longer NumPy
#: calls stream memory better (NHWC (64, 28, 28, 256): 1.1-1.5x faster than 64 Ki blocks; 2 MiB
#: of float64, between L2 and L3 there). Larger maxima leave row mode for channels of under half
#: a block (NCDHW (8, 64, 16, 32, 32) at 512 Ki: 2-3x slower training).
MAX_BLOCK_ELEMS = 1 << 18
#: Channels whose inner run B is at least this long, and that hold at least half a block, are
#: reduced along rows ("row mode").
ROW_MODE_MIN_RUN = 64
#: Column mode: blocks are whole rows ("tiled") when at least min(A, this many) rows fit.
TILE_MIN_ROWS = 16
#: Column sums add at most this many rows one after another; groups are added pairwise.
GROUP_ROWS = 64
#: Tiled column mode: consecutive blocks up to this many rows share one row of partial sums.
UNIT_ROWS = 64
#: channel_stats sums again, around the mean, a channel whose first shift was farther than
#: this many standard deviations from its mean (``bnref/_kernels/stats.py``: the error bound).
SHIFT_MAX_STD = 2.0
#: Row mode: training forward and backward take one pass over x (and dy) when a channel's
#: values fit in this many blocks (each channel is then one block, held in scratch).
FUSE_MAX_BLOCKS = 4
#: Inputs with fewer values run on the calling thread only.
PARALLEL_MIN_ELEMS = 1 << 18
#: float32 input: y by the float32 path (<= 2 eps32 of the natural scale, 1.3-2.7x faster)
#: instead of the float64 result rounded once (<= 0.5 eps32), which is what bnref promises
#: (bnref/forward.py, tests/test_core_forward_backward.py). Off by default; see
#: ``bnref/_kernels/forward.py``.
FLOAT32_FORWARD = False


def default_threads() -> int:
    """``BNREF_NUM_THREADS`` if set, else ``min(2, CPUs this process may run on)``."""
    env = os.environ.get("BNREF_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"BNREF_NUM_THREADS must be a positive integer, got {env!r}") from None
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        ncpu = os.cpu_count() or 1
    return max(1, min(2, ncpu))


#: The tuning in force (``bnref.runtime`` documents each key). ``sampled_shift``: the
#: statistics' shift is a sampled mean (True) or 0 (``bnref/_kernels/stats.py``).
settings = {
    "block_elems": BLOCK_ELEMS,
    "max_block_elems": MAX_BLOCK_ELEMS,
    "threads": default_threads(),
    "parallel_min": PARALLEL_MIN_ELEMS,
    "float32_forward": FLOAT32_FORWARD,
    "sampled_shift": True,
}


def _parse_size(text: str) -> int | None:
    """``"48K"``, ``"1024K"``, ``"32M"`` or ``"1048576"`` (sysfs cache sizes) in bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.I)
    if not m:
        return None
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def _cpu_list_len(text: str) -> int | None:
    """Number of CPUs in a sysfs CPU list such as ``"0-1,4,6-7"``."""
    try:
        n = 0
        for part in text.strip().split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
        return n
    except ValueError:
        return None


#: Where Linux describes each CPU's caches (``cpuN/cache/index*/{level,type,size,shared_cpu_list}``).
_SYSFS_CPU = Path("/sys/devices/system/cpu")
#: glibc's ``sysconf`` names for the data caches (Python's ``os.sysconf_names`` lacks them).
_GLIBC_SC = {"l1d": 188, "l2": 191, "l3": 194}  # _SC_LEVEL1_DCACHE_SIZE, _SC_LEVEL{2,3}_CACHE_SIZE


def cpu_caches() -> dict:
    """The data caches of the CPU this process runs on (read once, from the OS).

    Returns ``{"l1d", "l2", "l3"}``: bytes of one cache instance (None where unknown),
    ``"l2_shared_cpus"``, ``"l3_shared_cpus"``: how many logical CPUs share that instance
    (None where unknown), and ``"source"``: ``"sysfs"`` (Linux,
    ``/sys/devices/system/cpu/cpuN/cache/index*``, N the first CPU this process may run on),
    ``"sysconf"`` (glibc's ``_SC_LEVEL*_CACHE_SIZE``, which reports no sharing and, under some
    hypervisors, the host's whole L3) or None (nothing could be read). Never raises.
    """
    return dict(_read_cpu_caches())


@functools.lru_cache(maxsize=1)
def _read_cpu_caches() -> dict:
    out: dict = {"l1d": None, "l2": None, "l3": None, "l2_shared_cpus": None,
                 "l3_shared_cpus": None, "source": None}
    try:
        cpu = min(os.sched_getaffinity(0))
    except (AttributeError, OSError, ValueError):
        cpu = 0
    try:
        indexes = sorted((_SYSFS_CPU / f"cpu{cpu}" / "cache").glob("index*"))
    except OSError:
        indexes = []
    for d in indexes:
        try:
            kind = (d / "type").read_text().strip()
            level = int((d / "level").read_text())
            if kind not in ("Data", "Unified") or level not in (1, 2, 3):
                continue
            key = "l1d" if level == 1 else f"l{level}"
            out[key] = _parse_size((d / "size").read_text())
            if level > 1 and (d / "shared_cpu_list").exists():
                out[f"{key}_shared_cpus"] = _cpu_list_len((d / "shared_cpu_list").read_text())
        except (OSError, ValueError):
            continue
    if any(out[k] for k in _GLIBC_SC):
        out["source"] = "sysfs"
        return out
    if sys.platform.startswith("linux") and "CS_GNU_LIBC_VERSION" in getattr(os, "confstr_names", {}):
        for key, name in _GLIBC_SC.items():
            try:
                v = os.sysconf(name)
            except (OSError, ValueError):
                v = -1
            out[key] = v if v > 0 else None
        if any(out[k] for k in _GLIBC_SC):
            out["source"] = "sysconf"
    return out


def block_target(n: int) -> int:
    """Values per block for an input of ``n`` values: 1/16 of it, within the configured range."""
    return min(settings["max_block_elems"], max(settings["block_elems"], n // 16))
