"""The kernels' tuning: block sizes, mode thresholds and thread count, and the values in force.

The constants are the defaults. ``settings`` holds the values the kernels read at each call;
users change them through ``bnref.runtime`` (``set_num_threads``, ``tuning``), which imports
this module (nothing here imports the rest of bnref, so there is no cycle).
"""

from __future__ import annotations

import os

#: Values per block: 64 Ki float64 = 512 KiB, the L2 size of common x86 cores.
BLOCK_ELEMS = 1 << 16
#: Large inputs take blocks of up to this many values (1/16 of the input): fewer, longer NumPy
#: calls stream memory better (NHWC (64, 28, 28, 256): 1.5-1.8x faster than 64 Ki blocks).
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


def block_target(n: int) -> int:
    """Values per block for an input of ``n`` values: 1/16 of it, within the configured range."""
    return min(settings["max_block_elems"], max(settings["block_elems"], n // 16))
