"""The kernels' thread pool: units of work spread over up to ``num_threads`` threads.

NumPy releases the GIL in its loops, so blocks summed or written on several threads run in
parallel. The calling thread works too; the pool holds the other ``threads - 1``. Which
thread runs which unit does not change any result: partial sums are stored by unit and
combined in a fixed order (``bnref/_kernels/layout.py``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Block = TypeVar("Block")

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None  # (pid, workers): a forked child makes its own pool
_pool_lock = threading.Lock()


def get_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads (made again when the count or process changes)."""
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _pool_lock:
        if _pool is None or _pool_key != key:
            # A pool inherited through fork() has no threads; never shut it down from here.
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnref")
            _pool_key = key
        return _pool


def run_units(
    units: Sequence[Sequence[Block]],
    work: Callable[[Block, tuple], None],
    threads: int,
    scratch: Callable[[], tuple],
) -> None:
    """Call ``work(block, scratch())`` for every block of every unit, on ``threads`` threads.

    A unit's blocks run in order on one thread; units are taken from a shared queue, so a
    thread that finishes early takes the next one. ``scratch()`` is called once per thread
    (each thread gets its own buffers).
    """
    if threads <= 1:
        b = scratch()
        for unit in units:
            for blk in unit:
                work(blk, b)
        return

    def worker(it: Iterator[int], lock: threading.Lock) -> None:
        b = scratch()
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            for blk in units[i]:
                work(blk, b)

    it, lock = iter(range(len(units))), threading.Lock()
    pool = get_pool(threads - 1)
    futures = [pool.submit(worker, it, lock) for _ in range(threads - 1)]
    try:
        worker(it, lock)  # the calling thread works too
    finally:
        for f in futures:
            f.result()
