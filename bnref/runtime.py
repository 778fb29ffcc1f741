"""Threads, tuning and kept memory of bnref's kernels: the knobs a user may turn.

* ``num_threads()`` / ``set_num_threads(n)`` — threads the kernels use, the caller's included
  (default ``min(2, CPUs)``, or the environment variable ``BNREF_NUM_THREADS``). Results are
  bitwise the same for any count.
* ``tuning(...)`` — a context manager that changes the tuning for a while (tests use tiny
  blocks and ``parallel_min=0`` to reach every code path with small inputs).
* ``settings()`` — the tuning in force, as a dict.
* ``kept_nbytes()`` / ``release_kept_memory()`` — the scratch and constants the kernels keep
  between calls (a few MiB at most), and letting them go.

The settings are process-wide (not per thread) and live in ``bnref/_kernels/config.py``,
which the kernels read at each call; this module only changes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from bnref._kernels import config
from bnref._kernels.memory import kept_nbytes, release_kept_memory

__all__ = [
    "num_threads",
    "set_num_threads",
    "tuning",
    "settings",
    "kept_nbytes",
    "release_kept_memory",
]


def num_threads() -> int:
    """Number of threads the kernels use (the caller's thread included)."""
    return config.settings["threads"]


def set_num_threads(n: int) -> None:
    """Set the number of threads the kernels use (1: no pool)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    config.settings["threads"] = int(n)


def settings() -> dict:
    """The tuning in force (a copy): the keys ``tuning`` takes, with their current values."""
    return dict(config.settings)


@contextlib.contextmanager
def tuning(
    block_elems: int | None = None,
    threads: int | None = None,
    parallel_min: int | None = None,
    float32_forward: bool | None = None,
    max_block_elems: int | None = None,
    sampled_shift: bool | None = None,
) -> Iterator[None]:
    """Temporarily change the kernels' tuning; every setting is restored on exit.

    ``block_elems``: values per block (``max_block_elems``: at most, for large inputs; it
    follows ``block_elems`` unless given); ``threads``: thread count; ``parallel_min``: inputs
    smaller than this stay on one thread; ``float32_forward``: float32 y by the float32 path
    (<= 2 eps32 instead of the float64 answer rounded once, faster); ``sampled_shift=False``:
    the statistics shift every channel by 0 instead of a sampled mean, so each channel with
    |mean| > 2 std takes the second statistics pass (to test and time that pass; results stay
    within the contract for |mean| / std up to ~1e13). ``None`` leaves a setting as it is.
    """
    s = config.settings
    old = dict(s)
    try:
        if float32_forward is not None:
            s["float32_forward"] = bool(float32_forward)
        if sampled_shift is not None:
            s["sampled_shift"] = bool(sampled_shift)
        if parallel_min is not None:
            s["parallel_min"] = max(0, int(parallel_min))
        if block_elems is not None:
            if block_elems < 1:
                raise ValueError(f"block_elems must be >= 1, got {block_elems}")
            s["block_elems"] = int(block_elems)
            s["max_block_elems"] = int(block_elems)
        if max_block_elems is not None:
            s["max_block_elems"] = max(int(max_block_elems), s["block_elems"])
        if threads is not None:
            set_num_threads(threads)
        yield
    finally:
        s.update(old)
