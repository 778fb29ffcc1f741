"""Scratch memory of the kernels: per-thread scratch, the constants' arena, kept-memory accounting.

A block is loaded (widened to float64) into a per-thread scratch array, worked on there and
stored back to the output, rounded once (``load``, ``load_minus``, ``store``). Scratch arrays
up to the largest block size are kept per thread between calls, and so is each calling
thread's arena for the per-channel constants of column mode (``Arena``): a fresh
allocation page-faults on every call. ``kept_nbytes()`` says how much is kept now,
``release_kept_memory()`` lets it go (both public as ``bnref.runtime``).

Scratch arrays and constants sit at distinct offsets modulo 4 KiB ("4K aliasing", see
``Arena``).
"""

from __future__ import annotations

import threading

import numpy as np

from bnref._kernels.config import BLOCK_ELEMS, settings

_tls = threading.local()
_kept: dict[tuple[int, str], int] = {}  # (thread id, "scratch" | "arena") -> bytes
_generation = 0  # kept buffers of an older generation are dropped on their next use


# -- kept memory --------------------------------------------------------------------------------


def kept_nbytes() -> int:
    """Bytes the kernels keep between calls now: scratch of every live thread, constants' arenas.

    A thread's buffers are thread-local and freed when it exits; its entries are dropped here.
    """
    alive = {t.ident for t in threading.enumerate()}
    for key in [k for k in _kept if k[0] not in alive]:
        _kept.pop(key, None)
    return sum(_kept.values())


def release_kept_memory() -> None:
    """Let go of the scratch and arenas the kernels keep between calls (all threads).

    Each thread drops its buffers at its next kernel call (reallocating what that call needs)
    or when it exits. For memory measurements and long-lived processes done with bnref.
    """
    global _generation
    _generation += 1
    _kept.clear()


def _register_kept(kind: str, nbytes: int) -> None:
    _kept[(threading.get_ident(), kind)] = nbytes


def thread_arena() -> Arena | None:
    """The calling thread's live constants arena, if it has one (for tests and debugging)."""
    arena = getattr(_tls, "arena", None)
    return arena if arena is not None and arena.generation == _generation else None


def thread_kept_arrays() -> list[np.ndarray]:
    """The arrays (owning their memory) the calling thread keeps now: its arena's, its scratch."""
    arena = thread_arena()
    out = [] if arena is None else [arena.buf]
    if getattr(_tls, "bufs_gen", -1) == _generation:
        out += [b.base for b in _tls.bufs]
    return out


# -- scratch --------------------------------------------------------------------------------------


def thread_scratch(size: int, count: int) -> tuple[np.ndarray, ...]:
    """``count`` float64 scratch arrays of at least ``size`` values for this thread.

    Arrays up to ``max_block_elems`` values are kept per thread and reused (a fresh
    allocation page-faults on every call): up to two of the largest block size used so
    far (512 KiB each for inputs up to 1 Mi values, at most 2 MiB). Larger ones (the fused
    passes' whole channels) are allocated for the call and freed after it.
    """
    if size > max(settings["max_block_elems"], BLOCK_ELEMS):
        return tuple(_scratch_array(size, k) for k in range(count))
    kept = getattr(_tls, "bufs", ()) if getattr(_tls, "bufs_gen", -1) == _generation else ()
    if len(kept) < count or kept[0].size < size:
        n = max(size, BLOCK_ELEMS, kept[0].size if kept else 0)
        kept = tuple(_scratch_array(n, k) for k in range(max(count, len(kept))))
        _tls.bufs, _tls.bufs_gen = kept, _generation
        _register_kept("scratch", sum(b.nbytes for b in kept))
    return kept[:count]


def _scratch_array(n: int, k: int) -> np.ndarray:
    """Scratch array number ``k`` (float64), 1 or 3 KiB past a 4 KiB boundary.

    So scratch arrays and constants (``Arena``) never share an address modulo 4 KiB row by
    row ("4K aliasing", see ``Arena``).
    """
    raw = np.empty(n * 8 + 8192, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + (1024, 3072)[k % 2]
    return raw[start : start + n * 8].view(np.float64)


# -- the constants' arena -----------------------------------------------------------------------


class Arena:
    """Memory for the per-channel constants of one kernel call, kept by the calling thread.

    Column-mode constants (tiles of up to ``BLOCK_ELEMS`` float64 values, a few per call)
    are carved out of one kept array, each 2 KiB + 256 B * k past a 4 KiB boundary.

    Why the offsets: column-mode blocks meet these constants row by row, and rows are often a
    multiple of 4 KiB long (C = 1024, 4096 float32/float64 ...). When a constant and the rows
    it meets share their address modulo 4 KiB, the CPU's load/store disambiguation stalls
    ("4K aliasing") and NumPy's loops run up to ~6x slower; scratch arrays sit at 1 and
    3 KiB, constants at 2 KiB + 256 B * k. Why kept: a fresh allocation per call page-faults
    whenever other work ran in between. When a call needs more, the arena grows (and is kept
    at that size).
    """

    def __init__(self, nbytes: int) -> None:
        self.buf = np.empty(max(nbytes, 4096), dtype=np.uint8)
        self.base = (-self.buf.ctypes.data) % 4096  # first 4 KiB boundary in buf
        self.cursor = 0
        self.count = 0
        self.generation = _generation
        _register_kept("arena", self.buf.nbytes)

    @staticmethod
    def mine() -> Arena:
        """The calling thread's arena (a new one if it has none, or only a released one)."""
        arena = getattr(_tls, "arena", None)
        if arena is None or arena.generation != _generation:
            arena = _tls.arena = Arena(0)
        return arena

    def take(self, n: int, dtype: type, first: bool) -> np.ndarray:
        """``n`` uninitialized values of ``dtype``; ``first``: a new call starts (frees all)."""
        if first:
            self.cursor, self.count = 0, 0
        nbytes = n * np.dtype(dtype).itemsize
        start = self.base + self.cursor + 2048 + 256 * (self.count % 4)
        end = start + nbytes
        if end > self.buf.size:  # grow; tiles already handed out stay valid in the old buffer
            grown = Arena(end + 8192)
            _tls.arena = grown
            return grown.take(n, dtype, first=True)
        self.cursor = -(-(end - self.base) // 4096) * 4096
        self.count += 1
        return self.buf[start:end].view(dtype)


# -- moving blocks in and out of scratch ----------------------------------------------------------


def scratch(buf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The first ``shape`` values of float64 scratch ``buf``, as a contiguous array."""
    return buf[: shape[0] * shape[1]].reshape(shape)


def scratch32(buf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float32 scratch array of ``shape`` in (the first half of) float64 scratch ``buf``."""
    return buf.view(np.float32)[: shape[0] * shape[1]].reshape(shape)


def load(buf: np.ndarray, src: np.ndarray) -> np.ndarray:
    """``src`` widened to float64 (exactly) into contiguous scratch ``buf``."""
    out = scratch(buf, src.shape)
    np.copyto(out, src, casting="unsafe")
    return out


def load_minus(buf: np.ndarray, src: np.ndarray, k: np.ndarray | float) -> np.ndarray:
    """``src - k`` in float64 in contiguous scratch ``buf`` (float64 src: no separate load)."""
    out = scratch(buf, src.shape)
    if src.dtype == np.float64:
        np.subtract(src, k, out=out)
    else:
        np.copyto(out, src, casting="unsafe")
        np.subtract(out, k, out=out)
    return out


def as_float64(buf: np.ndarray, src: np.ndarray, contiguous_ok: bool) -> np.ndarray:
    """``src`` as float64: itself when it already is (and ``contiguous_ok``), else loaded."""
    if contiguous_ok and src.dtype == np.float64 and src.flags.c_contiguous:
        return src
    return load(buf, src)


def store(dst: np.ndarray, val: np.ndarray) -> None:
    """Write float64 ``val`` to the output block ``dst``, rounded once to its dtype."""
    if dst is not val:
        np.copyto(dst, val, casting="unsafe")  # float64 -> input dtype: one rounding


def empty_result(x: np.ndarray) -> np.ndarray:
    """An uninitialized output shaped like ``x`` (for empty inputs: nothing to compute)."""
    return np.empty(x.shape, dtype=x.dtype)
