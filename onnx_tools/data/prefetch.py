"""Work ahead of the consumer on background threads: :func:`ahead` and :class:`DecodePool`.

:func:`ahead` runs an iterator on one daemon thread, ``depth`` items ahead of its consumer (a
queue of ``depth`` items, plus the one being made), and yields the items in their order, so
what the consumer sees is exactly what the iterator yields. An exception of the iterator
(any ``BaseException``) is raised in the consumer where the next item would have come, the
same exception object with its message and traceback; items after it are never made. When the
consumer stops early (the generator is closed, an exception or ``KeyboardInterrupt`` in its
loop), the thread is told to stop, the queue is emptied so that the thread is not blocked
on it, the thread closes the iterator itself (its ``finally`` blocks run there, after the
item in the making is done) and the consumer waits for the thread to end, at most
:data:`JOIN_TIMEOUT` seconds: a thread stuck in a read is left behind as a daemon and cannot
keep the process from exiting. A second Ctrl-C interrupts that wait.

:class:`DecodePool` maps a function over the items of one batch on a bounded pool of threads
(for image decoding: pillow and NumPy release the GIL) and returns when all are done, raising
the first error in item order; :meth:`DecodePool.close` cancels what has not started and joins
the threads. With one thread it calls the function in order on the calling thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a closed :func:`ahead` waits for its thread to finish the item in the making.
JOIN_TIMEOUT = 10.0
#: The most decoding threads :func:`default_threads` gives.
MAX_THREADS = 8
_ITEM, _ERROR, _END = "item", "error", "end"


def default_threads() -> int:
    """Decoding threads by default: the CPUs this process may use, at most :data:`MAX_THREADS`."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, count))


def _put(slots: queue.Queue, entry: tuple[str, Any], stop: threading.Event) -> bool:
    """Hand ``entry`` to the consumer; False when the consumer has stopped."""
    if stop.is_set():
        return False
    slots.put(entry)  # never blocks for long: a stopping consumer empties the queue
    return not stop.is_set()


def _produce(items: Iterator[Any], slots: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            if not _put(slots, (_ITEM, item), stop):
                return
        _put(slots, (_END, None), stop)
    except BaseException as exc:  # handed to the consumer, raised there
        _put(slots, (_ERROR, exc), stop)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            try:
                close()  # the iterator's finally blocks run on the thread that ran it
            except Exception:  # nobody is left to hand it to
                logger.debug("closing a prefetched iterator failed", exc_info=True)


def _drain(slots: queue.Queue) -> None:
    while True:
        try:
            slots.get_nowait()
        except queue.Empty:
            return


def ahead(items: Iterable[T], depth: int = 1, name: str = "bnref-data") -> Iterator[T]:
    """Yield the items of ``items``, made on a daemon thread ``depth`` items ahead.

    See the module docstring for errors and early exits. The thread starts with the first
    ``next()``.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(iter(items), slots, stop), name=name,
                              daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        stop.set()
        _drain(slots)
        thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            logger.debug("data thread %s still busy after %.0f s; left behind (daemon)",
                         name, JOIN_TIMEOUT)


class DecodePool:
    """Run a function over the items of a batch on ``threads`` threads (see the module docstring)."""

    def __init__(self, threads: int, name: str = "bnref-decode") -> None:
        self.threads = max(1, int(threads))
        self._executor = (
            ThreadPoolExecutor(self.threads, thread_name_prefix=name) if self.threads > 1 else None
        )

    def run(self, function: Callable[[int, Any], None], items: Sequence[Any]) -> None:
        """Call ``function(k, items[k])`` for every ``k``; raise the first error in item order."""
        if self._executor is None:
            for k, item in enumerate(items):
                function(k, item)
            return
        futures = [self._executor.submit(function, k, item) for k, item in enumerate(items)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()  # what has not started never will
            raise

    def close(self) -> None:
        """Cancel the calls not started and wait for the running ones (a few images)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
