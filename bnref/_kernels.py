"""Low-level per-channel kernels: the only place that touches every element of x.

Everything else in bnref works on per-channel vectors; these functions stream the data.

Layout
------
Any input is viewed, without copying, in its memory order: the axes are permuted so the
array is C-contiguous (NCHW stays NCHW; a channels-last array or a transposed view becomes
(..., C)), and the view is reshaped to ``(A, C, B)`` (A: everything before the channel axis,
B: everything after it). When ``B`` is long ("row mode", NCHW and 5-D) a block is
``x3[a0:a1, c, b0:b1]``, one channel, so every per-channel constant is a scalar (NumPy's
fastest loops) and the block reduces to one number; when it is short ("column mode", NHWC and
(N, C)) the data is an ``(A, C*B)`` matrix and a block ``x2[r0:r1, w0:w1]`` is reduced down its
columns. Arrays that are not a permutation of a contiguous array are copied once.

Blocks hold ``block_elems`` values (64 Ki: 512 KiB of float64, an L2's worth; channel_stats'
column-mode blocks hold at least 64 rows, up to 4x that) and are handed to a small thread pool
(``num_threads``, default ``min(2, CPUs)``, env ``BNREF_NUM_THREADS``); NumPy releases the GIL
in its loops. Inputs under ``PARALLEL_MIN_ELEMS`` (256 Ki values) stay on the calling thread.
Per-block results are stored by block index and combined in a fixed order, so results are
bitwise independent of the thread count and of scheduling. Extra memory: the output, up to
three block-sized scratch arrays per thread (kept between calls: 1.5 MiB per thread) and
O(C * blocks) partial sums. Column-mode vectors and scratch arrays are placed at distinct
offsets modulo 4 KiB: rows of 1024 or 4096 values otherwise "4K-alias" the vectors broadcast
down them, which made NumPy's loops up to ~6x slower on (256, 4096).

Numerics and the bounds achieved
--------------------------------
Statistics (``channel_moments``), always in float64: each block runs the corrected two-pass
algorithm on its own values (Chan, Golub & LeVeque 1983), the block widened to float64 once::

    s_k = sum(x);  m_k = s_k / n_k;  d = x - m_k;  c_k = sum(d);  q_k = sum(d*d)
    M2_k = q_k - c_k**2 / n_k

and the blocks are combined in one step with the exact pooling identity (the all-at-once
form of Chan et al.'s merge)::

    mean    = sum_k(n_k * m_k) / n
    mean_lo = sum_k(c_k + n_k * (m_k - mean)) / n          # = sum(x - mean) / n
    M2      = sum_k(M2_k) + sum_k n_k * (m_k - mean + c_k / n_k - mean_lo)**2

(``m_k + c_k / n_k`` is block k's mean with its rounding error removed). Every term is a sum
of non-negative values or of values near the block mean, so nothing cancels when
|mean| >> std: mean and M2 are within a small multiple of eps64 * log2(n) of the exact
values; the tests check 1e-12 relative (mean: relative to ``|mean| + std``) up to
N*H*W = 1e8 values per channel with mean 1e4, std 1. The gradient sums (``grad_sums``,
``eval_backward``) are float64 too: ``sum(dy)`` and ``sum(dy * (x - mean))``.

Elementwise outputs, float64 path (every forward output unless ``FLOAT32_FORWARD``; dx for
float64 / float16 input and for float32 channels the guards below reject): computed in
float64, rounded once to the input dtype. ``y`` is
``(x - mean) * (scale * inv_std) + bias``; ``dx`` is
``k*dy - (k * inv_std * dscale / n) * (x - mean) - k * dbias / n`` with ``k = scale*inv_std``.
The mean is subtracted first, so |mean| >> std costs nothing; it is carried as
``mean + mean_lo`` (its rounding residual, from the block sums), folded into per-channel
constants, so float64 outputs stay ulp-accurate when |mean| >> std.

For float32 / float16 output, channels with ``|mean| * inv_std <= 2**16`` skip the
subtraction: ``y = fl(fl(x * a) + b')`` in float64 with ``b' = bias - a * (mean + mean_lo)``.
Its float64 error is at most ~3 eps64 (|a||x| + |b'| + |y|) <= 3 eps64 (1 + 2**17) S
(|x| <= |x - mu| + |mu|), below 2**-10 * eps32 * S, so the result is still the float64
answer rounded once up to that: ``|y - y64| <= (0.5 + 2**-10) eps32 S``.

Elementwise outputs, float32 path (float32 input: dx always, y only with
``FLOAT32_FORWARD`` / ``tuning(float32_forward=True)``, because bnref promises float32 y as
the float64 answer rounded once, which no float32 evaluation can match): float32 arithmetic
on the data with per-channel constants derived in float64. Notation: u = 2**-24 (eps32 = 2u), mu the exact
mean (``mean + mean_lo``), ``mh = float32(mean)``, ``r = mu - mh`` (float64, |r| <= u|mh|
up to eps64 terms), ``rho = |r| * inv_std``, x_hat = (x - mu) * inv_std, k = scale * inv_std.

* ``t = fl32(x - mh)`` is exact when x is within a factor 2 of mh (Sterbenz), which is every
  x once |mean| >> std. Otherwise |x - mh| >= |mh| / 2, so rho <= 2u|x_hat| (1 + 3u) and the
  subtraction's relative error u is an error of at most u (1 + 3u) |x - mu|.
* Rounding constants to float32 moves a line's slope, never its offset: with
  ``a32 = fl32(k)``, the offset is computed in float64 from the *rounded* slope,
  ``b = bias - a32 * r``, because ``k (x - mu) + bias = a32 (x - mh) + b + (k - a32)(x - mu)``;
  the last term is at most u |scale| |x_hat|.

``y = fl32(fl32(t * a32) + fl32(b))``. Summing the roundings (first order in u; natural
scale S = |scale| (1 + |x_hat|) + |bias|): the product and t contribute
u|scale|(|x_hat| + rho) (2u instead of u when t is inexact, where rho <= 2u|x_hat|),
fl32(b) u(|bias| + |scale| rho), the slope rounding u|scale||x_hat|, the final addition
u(|scale||x_hat| + |bias|). With the guard **rho <= 1** (else the channel takes the float64
path): ``|y - y64| <= 3u S`` when t is exact and ``<= 4u S`` otherwise, so
``|y - y64| <= 2 * eps32 * S`` (+ O(u**2)); the issue's contract is 4 eps32.

Training dx: ``dx = fl32(fl32(k32 * dy) + fl32(fl32(t * c1_32) + e32))`` with
``c1 = -k * inv_std * g``, g = sum(dy * x_hat) / n, h = sum(dy) / n, and the folded offset
``e = -k*h - c1_32 * r`` (float64). Natural scale (the test's):
S_dx = |k| (|dy| + H + |x_hat| G), H = sum|dy| / n >= |h|, G = sum|dy * x_hat| / n >= |g|.
Roundings: k32*dy 2u|k||dy|; t*c1_32 2u|k||g|(|x_hat| + rho); e32 u|k|(|h| + |g| rho);
slope u|k||g||x_hat|; the two additions u|k|(|g||x_hat| + |h|) and u|k|(|dy| + |g||x_hat|
+ |h|). Total u|k| (3|dy| + 3|h| + 5|g||x_hat| + 3|g| rho). The rho term is not covered by
S_dx where x_hat ~ 0, but G <= max|x_hat| H <= sqrt(n - 1) H (Samuelson), so the guard
**rho * sqrt(n) <= 1/3** gives 3|g| rho <= H and ``|dx - dx64| <= 5u S_dx = 2.5 eps32 S_dx``.
The float64 sums g and h add O(log2(n) eps64) relative.

Inference dx: ``fl32(k32 * dy)``, ``<= eps32 * |k| |dy|``.

Further guards (a channel that fails one takes the float64 path; in column mode, the whole
array does): the float32 constants finite, |k|, |c1| in {0} or [2**-64, 2**64], |b|, |e|
<= 2**64 (no float32 overflow or underflow of constants; data and results beyond float32's
range overflow in both paths alike). NaN constants fail every guard.

Bounds, with the natural scales above (tests/test_accuracy_contract.py checks them against
an extended-precision compensated reference, |mean| / std up to ~1e9 and the float32 path's
worst case rho ~ 1):

* float32 input: y <= 0.5 eps32 S + O(eps64) (float64 rounded once; with FLOAT32_FORWARD
  <= 2 eps32 S), training dx <= 2.5 eps32 S_dx, inference dx <= 1 eps32 (observed on
  adversarial data: y 0.46 eps32, or 0.97 on the float32 path; training dx 1.01 eps32); dscale, dbias: float64 sums rounded once,
  <= 1 eps32 (observed <= 0.5). The issue's contract: 4 eps32.
* float16 input: the float64 result rounded once (0.5 ulp of float16 + float64 error).
* float64 input: ``<= 8 * eps64 * scale`` for y and dx (observed <= 3.7 eps64: the rounding of
  inv_std, k, the products and the sum); dscale and dbias within
  ``2 * log2(n) * eps64 * sum|dy * x_hat|`` (resp. ``sum|dy|``).

NaN anywhere in a channel propagates to that channel's statistics and outputs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# -- tuning ---------------------------------------------------------------------------------------

#: Values per block: 64 Ki float64 = 512 KiB, the L2 size of common x86 cores.
BLOCK_ELEMS = 1 << 16
#: Channels whose inner run B is at least this long are reduced along rows ("row mode").
ROW_MODE_MIN_RUN = 64
#: Column mode: channel_stats blocks hold at least this many rows (fewer partial results).
STATS_MIN_ROWS = 64
#: Inputs with fewer values run on the calling thread only.
PARALLEL_MIN_ELEMS = 1 << 18


def _default_threads() -> int:
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


#: float32 input: y by the float32 path (<= 2 eps32 of the natural scale, 1.3-2.7x faster)
#: instead of the float64 result rounded once (<= 0.5 eps32), which is what bnref promises
#: (bnref/forward.py, tests/test_core_forward_backward.py). Off by default; see the module doc.
FLOAT32_FORWARD = False

_config = {
    "block_elems": BLOCK_ELEMS,
    "threads": _default_threads(),
    "parallel_min": PARALLEL_MIN_ELEMS,
    "float32_forward": FLOAT32_FORWARD,
}
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None  # (pid, workers): a forked child makes its own pool
_pool_lock = threading.Lock()


def num_threads() -> int:
    """Number of threads the kernels use (the caller's thread included)."""
    return _config["threads"]


def set_num_threads(n: int) -> None:
    """Set the number of threads the kernels use (1: no pool)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _config["threads"] = int(n)


@contextlib.contextmanager
def tuning(
    block_elems: int | None = None,
    threads: int | None = None,
    parallel_min: int | None = None,
    float32_forward: bool | None = None,
) -> Iterator[None]:
    """Temporarily change the kernels' tuning (tests use tiny blocks and ``parallel_min=0``).

    ``block_elems``: values per block; ``threads``: thread count; ``parallel_min``: inputs
    smaller than this stay on one thread; ``float32_forward``: float32 y by the float32 path.
    """
    old = dict(_config)
    try:
        if float32_forward is not None:
            _config["float32_forward"] = bool(float32_forward)
        if parallel_min is not None:
            _config["parallel_min"] = max(0, int(parallel_min))
        if block_elems is not None:
            if block_elems < 1:
                raise ValueError(f"block_elems must be >= 1, got {block_elems}")
            _config["block_elems"] = int(block_elems)
        if threads is not None:
            set_num_threads(threads)
        yield
    finally:
        _config.update(old)


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _pool_lock:
        if _pool is None or _pool_key != key:
            # A pool inherited through fork() has no threads; never shut it down from here.
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnref")
            _pool_key = key
        return _pool


# -- layout ---------------------------------------------------------------------------------------


class _Layout:
    """Canonical blocked view of arrays shaped and laid out like ``x``."""

    def __init__(self, x: np.ndarray, axis: int, min_rows: int = 1) -> None:
        perm = _memory_order(x)
        xt = x.transpose(perm)
        if not xt.flags.c_contiguous:  # sliced / negative strides: one copy
            x = np.ascontiguousarray(x)
            perm = tuple(range(x.ndim))
            xt = x
        self.perm = perm
        self.shape = x.shape
        self.tshape = xt.shape
        k = perm.index(axis)
        self.C = x.shape[axis]
        self.A = int(np.prod(xt.shape[:k], dtype=np.int64))
        self.B = int(np.prod(xt.shape[k + 1 :], dtype=np.int64))
        self.row_mode = self.B >= ROW_MODE_MIN_RUN
        self.x = self.view(x)
        self._make_blocks(_config["block_elems"], min_rows)

    # Views --------------------------------------------------------------------------------------

    def view(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (shape of x) as (A, C, B) in row mode or (A, C*B) in column mode."""
        t = arr.transpose(self.perm)
        if not t.flags.c_contiguous:  # e.g. dy laid out differently from x
            t = np.ascontiguousarray(t)
        return t.reshape(self._vshape())

    def _vshape(self) -> tuple[int, ...]:
        return (self.A, self.C, self.B) if self.row_mode else (self.A, self.C * self.B)

    def empty_like_x(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """An output with x's shape and memory layout, and its canonical view."""
        t = np.empty(self.tshape, dtype=dtype)
        inv = np.argsort(self.perm)
        return t.transpose(inv), t.reshape(self._vshape())

    def vec(self, v: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """A per-channel vector indexable by a block's vector index (channel or column range).

        Converted to ``dtype`` (one rounding) before it is repeated over a column block.
        """
        v = np.asarray(v, dtype=np.float64).astype(dtype, copy=False)
        if self.row_mode:
            return v
        return _offset_copy(np.repeat(v, self.B) if self.B > 1 else v)

    def channel_mask(self, ok: np.ndarray) -> np.ndarray:
        """Per-channel flags indexable like ``vec`` in row mode; one all-channel flag otherwise."""
        ok = np.asarray(ok, dtype=bool)
        return ok if self.row_mode else np.array([bool(np.all(ok))])

    # Blocks -------------------------------------------------------------------------------------

    def _make_blocks(self, target: int, min_rows: int) -> None:
        """List the blocks: (data index, vector index, partial index, block shape).

        Row mode: a block is ``x3[a0:a1, c, b0:b1]``, one channel, so every per-channel
        constant is a scalar (NumPy's fastest loops) and the block reduces to one number.
        Column mode: a block is ``x2[r0:r1, w0:w1]``, reduced down its columns.
        """
        A, C, B = self.A, self.C, self.B
        blocks = []
        if self.row_mode:
            nb = max(1, -(-B // target))  # pieces per run
            bl = -(-B // nb)
            ra = max(1, min(A, target // bl)) if nb == 1 else 1  # runs per block
            bb = [(j * bl, min(B, (j + 1) * bl)) for j in range(nb)]
            ab = [(i * ra, min(A, (i + 1) * ra)) for i in range(-(-A // ra))]
            counts = [(a1 - a0) * (b1 - b0) for a0, a1 in ab for b0, b1 in bb]
            for c in range(C):
                k = 0
                for a0, a1 in ab:
                    for b0, b1 in bb:
                        idx = (slice(a0, a1), c, slice(b0, b1))
                        blocks.append((idx, c, (c, k), (a1 - a0, b1 - b0)))
                        k += 1
            self.part_shape = (C, len(counts))
            self.red = None
        else:
            W = C * B
            # Whole rows when they fit (contiguous blocks: NumPy's loops run ~2x faster on them
            # than on (rows, columns) tiles of a wider matrix), else tiles; at least
            # ``min_rows`` rows (channel_stats: 64, so that its O(partials) combine step stays
            # small beside the data), up to 4 * target values a block then.
            rb = min(A, max(min_rows, target // W))
            wb = min(W, max(1, (target if min_rows == 1 else 4 * target) // rb))
            nab = -(-A // rb)
            for i in range(nab):
                r0, r1 = i * rb, min(A, (i + 1) * rb)
                for w0 in range(0, W, wb):
                    ws = slice(w0, min(W, w0 + wb))
                    blocks.append(((slice(r0, r1), ws), ws, (i, ws), (r1 - r0, ws.stop - w0)))
            self.part_shape = (nab, W)
            counts = np.repeat([min(A, (i + 1) * rb) - i * rb for i in range(nab)], B)
            self.red = 0
        self.counts = np.asarray(counts, dtype=np.float64)
        self.blocks = blocks
        self.max_block = max(r * c for *_, (r, c) in blocks)

    def per_channel(self, part: np.ndarray) -> np.ndarray:
        """Partial results (part_shape) as (K, C): all partials of a channel in a column.

        A view in row mode and for (N, C)-like inputs; reductions then run along axis 0.
        """
        if self.row_mode:
            return part.T
        if self.B == 1:
            return part
        nab = part.shape[0]
        return part.reshape(nab, self.C, self.B).transpose(0, 2, 1).reshape(-1, self.C)

    def partial_counts(self) -> np.ndarray:
        """Counts of the partials in ``per_channel`` order, as a (K, 1) column."""
        return self.counts[:, None]

    def block_count(self, bshape: tuple[int, int]) -> int:
        """Values per partial in a block of this shape."""
        return bshape[0] * bshape[1] if self.row_mode else bshape[0]

    def dot_into(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
        """Per-partial ``sum(a * b)``; may overwrite ``b``."""
        if self.row_mode:
            np.multiply(a, b, out=b)
            return np.add.reduce(b, axis=None)
        return np.einsum("ij,ij->j", a, b)

    # Execution ----------------------------------------------------------------------------------

    def run(self, work: Callable[[tuple, tuple[np.ndarray, ...]], None], bufs: int) -> None:
        """Call ``work(block, scratch)`` for every block, on up to ``num_threads`` threads.

        ``scratch`` holds ``bufs`` per-thread float64 arrays of ``max_block`` values (kept
        between calls up to the default block size, see ``_thread_scratch``). Inputs smaller
        than ``PARALLEL_MIN_ELEMS`` run on the calling thread: a hand-off costs more than it
        saves there.
        """
        blocks = self.blocks
        threads = min(_config["threads"], len(blocks))
        if self.A * self.C * self.B < _config["parallel_min"]:
            threads = 1
        size = self.max_block

        def worker(it: Iterator[int], lock: threading.Lock) -> None:
            b = _thread_scratch(size, bufs)
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                work(blocks[i], b)

        if threads <= 1:
            b = _thread_scratch(size, bufs)
            for blk in blocks:
                work(blk, b)
            return
        it, lock = iter(range(len(blocks))), threading.Lock()
        pool = _get_pool(threads - 1)
        futures = [pool.submit(worker, it, lock) for _ in range(threads - 1)]
        try:
            worker(it, lock)  # the calling thread works too
        finally:
            for f in futures:
                f.result()


_tls = threading.local()


def _thread_scratch(size: int, count: int) -> tuple[np.ndarray, ...]:
    """``count`` float64 scratch arrays of at least ``size`` values for this thread.

    Arrays up to ``BLOCK_ELEMS`` values are kept per thread and reused (a fresh allocation
    page-faults on every call): at most 3 * 512 KiB per thread. Larger ones (channel_stats'
    column blocks, a raised block size) are allocated for the call and freed after it.
    """
    if size > BLOCK_ELEMS:
        return tuple(_scratch_array(size, k) for k in range(count))
    kept = getattr(_tls, "bufs", ())
    if len(kept) < count:
        kept = kept + tuple(_scratch_array(BLOCK_ELEMS, k) for k in range(len(kept), count))
        _tls.bufs = kept
    return kept[:count]


def _scratch_array(n: int, k: int) -> np.ndarray:
    """Scratch array number ``k`` (float64), 1, 3 or 2.5 KiB past a 4 KiB boundary.

    So scratch arrays, outputs (page-aligned) and column vectors (2 KiB, ``_offset_empty``)
    never share an address modulo 4 KiB row by row ("4K aliasing", see ``_offset_copy``).
    """
    raw = np.empty(n * 8 + 8192, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + (1024, 3072, 2560)[k % 3]
    return raw[start : start + n * 8].view(np.float64)


def scratch_nbytes_per_thread() -> int:
    """Bytes of scratch a kernel thread keeps between calls (at most)."""
    return 3 * BLOCK_ELEMS * 8


def _offset_copy(v: np.ndarray) -> np.ndarray:
    """``v`` copied to an address 2 KiB past a 4 KiB boundary.

    Column-mode blocks broadcast such vectors down rows whose length is often a multiple of
    4 KiB (C = 1024, 4096 float32/float64 ...); when the vector and the rows share their
    address modulo 4 KiB, the CPU's load/store disambiguation stalls ("4K aliasing") and
    NumPy's loops run up to ~6x slower. Half a page apart, they never do.
    """
    out = _offset_empty(v.size, v.dtype)
    out[...] = v
    return out


def _offset_empty(n: int, dtype: type = np.float64) -> np.ndarray:
    """An uninitialized vector of ``n`` values at 2 KiB past a 4 KiB boundary (see above)."""
    nbytes = n * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 8192, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + 2048
    return raw[start : start + nbytes].view(dtype)


def _memory_order(x: np.ndarray) -> tuple[int, ...]:
    """Axis permutation listing x's axes from largest to smallest stride (size-1 axes last)."""
    return tuple(sorted(range(x.ndim), key=lambda i: (-abs(x.strides[i]) if x.shape[i] > 1 else 1, i)))


def _scratch(buf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return buf[: shape[0] * shape[1]].reshape(shape)


def _scratch32(buf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float32 scratch array of ``shape`` in (the first half of) float64 scratch ``buf``."""
    return buf.view(np.float32)[: shape[0] * shape[1]].reshape(shape)


def _load(buf: np.ndarray, src: np.ndarray) -> np.ndarray:
    """``src`` widened to float64 (exactly) into contiguous scratch ``buf``."""
    out = _scratch(buf, src.shape)
    np.copyto(out, src, casting="unsafe")
    return out


def _store(dst: np.ndarray, val: np.ndarray) -> None:
    if dst is not val:
        np.copyto(dst, val, casting="unsafe")  # float64 -> input dtype: one rounding


def _empty_result(x: np.ndarray) -> np.ndarray:
    return np.empty(x.shape, dtype=x.dtype)


def _split_mean(mean: np.ndarray, mean_lo: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_hi, r)``: mean_hi = float32(mean), r = (mean + mean_lo) - mean_hi in float64."""
    mh = np.asarray(mean, dtype=np.float64).astype(np.float32)
    r = mean - mh.astype(np.float64)  # exact (Sterbenz)
    if mean_lo is not None:
        r = r + mean_lo
    return mh, r


def _f32_safe(v: np.ndarray, zero_small: bool = False) -> np.ndarray:
    """Per-channel constants a float32 path may use: finite, far from float32 over/underflow.

    ``0 <= |v| <= 2**64`` always; ``|v| >= 2**-64`` unless zero (or ``zero_small``: an additive
    constant whose underflow costs at most 2**-150 absolute, far below eps32 * the scale).
    """
    m = np.abs(np.asarray(v, dtype=np.float64))
    ok = m <= 2.0**64  # False for NaN and inf
    if not zero_small:
        ok &= (m == 0) | (m >= 2.0**-64)
    return ok


# -- statistics -----------------------------------------------------------------------------------


def channel_moments(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and M2 = sum((x - mean)**2), in float64 (blocked two-pass, see module doc).

    Each block: ``m_k = sum(x)/n_k``, ``M2_k = sum(d**2) - sum(d)**2/n_k`` with ``d = x - m_k``;
    blocks pooled exactly with ``M2 = sum M2_k + sum n_k (mean_k - mean)**2``.
    """
    mean, _, m2 = channel_stats(x, axis)
    return mean, m2


def channel_stats(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, mean_lo, M2)`` per channel: ``channel_moments`` plus the mean's residual.

    ``mean + mean_lo`` is the mean to about eps64 * std rather than eps64 * |mean|::

        mean_lo = sum_k (c_k + n_k * (m_k - mean)) / n      # = sum(x - mean) / n
    """
    L = _Layout(x, axis, min_rows=STATS_MIN_ROWS)
    shape = L.part_shape
    S, Cs, Q = np.empty(shape), np.empty(shape), np.empty(shape)
    red, vx = L.red, L.x

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, _, pidx, bshape = blk
        d = _load(bufs[0], vx[idx])
        if red is None:
            m = np.add.reduce(d, axis=None) / L.block_count(bshape)
        else:  # the block's column means, placed so that they never 4K-alias d's rows
            m = np.add.reduce(d, axis=red, out=_offset_empty(bshape[1]))
            m /= L.block_count(bshape)
        np.subtract(d, m, out=d)
        S[pidx] = m
        Cs[pidx] = np.add.reduce(d, axis=red)
        Q[pidx] = L.dot_into(d, d)

    L.run(work, bufs=1)
    n = L.A * L.B
    counts = L.partial_counts()  # (K, 1)
    m, c, q = L.per_channel(S), L.per_channel(Cs), L.per_channel(Q)  # (K, C): block means...
    mean = np.add.reduce(m * counts, axis=0) / n
    # Block k's values minus `mean` sum to c_k + n_k (m_k - mean): no |mean|-sized terms.
    dm = m - mean
    mean_lo = np.add.reduce(c + dm * counts, axis=0) / n
    # Deviation of block k's exact mean from the exact pooled mean.
    cn = c / counts
    dev = (dm + cn) - mean_lo
    q -= c * cn  # q: a fresh (K, C) array or a view of Q, which is not used again
    dev *= dev
    dev *= counts
    m2 = np.add.reduce(q, axis=0) + np.add.reduce(dev, axis=0)
    return mean, mean_lo, np.maximum(m2, 0.0)


# -- forward --------------------------------------------------------------------------------------


def normalize_affine(
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    mean_lo: np.ndarray | None = None,
) -> np.ndarray:
    """``y = (x - mean) * (scale * inv_std) + bias``, returned in x.dtype.

    Computed in float64 and rounded once to x.dtype: mean subtracted first, ``mean_lo`` (the
    mean's rounding residual, if known) folded into the bias; for float32 / float16 output
    and |mean| <= 2**16 std, as ``x*a + (bias - a*mean)`` (module doc). With
    ``FLOAT32_FORWARD``, float32 input takes the float32 path ``(x - mean_hi) * a32 + b32``
    with float64-derived per-channel constants (module doc).
    """
    if x.size == 0:
        return _empty_result(x)
    L = _Layout(x, axis)
    y, vy = L.empty_like_x(x.dtype)
    a = inv_std * scale
    vx = L.x
    if x.dtype == np.float32 and _config["float32_forward"]:
        with np.errstate(all="ignore"):  # NaN / inf constants: those channels use float64
            mh, r = _split_mean(mean, mean_lo)
            a32 = a.astype(np.float32)
            # Fold: a*(x - mu) + bias = a32*(x - mh) + (bias - a32*r) + (a - a32)*(x - mu).
            b = bias - a32.astype(np.float64) * r
            ok = (np.abs(r) * inv_std <= 1.0) & _f32_safe(a) & _f32_safe(b, zero_small=True)
        f32 = L.channel_mask(ok)
        vmh, va32, vb32 = L.vec(mh, np.float32), L.vec(a32, np.float32), L.vec(b, np.float32)
    else:
        f32 = None
    b64 = bias if mean_lo is None else bias - a * mean_lo
    vm, va, vb = L.vec(mean), L.vec(a), L.vec(b64)
    if x.dtype.itemsize < 8:
        # float32 / float16 output: with |mean| * inv_std <= 2**16, y = x*a + (b64 - a*mean) in
        # float64 is within 2**-10 * eps32 of the natural scale (module doc), so one op less
        # per element and still the float64 answer rounded once.
        with np.errstate(all="ignore"):
            fused = L.channel_mask(np.abs(mean) * inv_std <= 2.0**16)
            vbf = L.vec(b64 - a * mean)
    else:
        fused = None

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, vidx, _, bshape = blk
        src, dst = vx[idx], vy[idx]
        if f32 is not None and f32[vidx if L.row_mode else 0]:
            # In a contiguous scratch when the block is strided (row mode): NumPy's loops run
            # ~1.4x faster than in place on a (runs, run) view of the output.
            t = _scratch32(bufs[0], bshape) if L.row_mode else dst
            np.subtract(src, vmh[vidx], out=t)  # exact when x is within 2x of mean_hi
            np.multiply(t, va32[vidx], out=t)
            np.add(t, vb32[vidx], out=dst)
            return
        if fused is not None and fused[vidx if L.row_mode else 0]:
            t = _load(bufs[0], src)
            np.multiply(t, va[vidx], out=t)
            np.add(t, vbf[vidx], out=t)
            _store(dst, t)
            return
        if dst.dtype == np.float64:
            t = dst
            np.subtract(src, vm[vidx], out=t)
        else:
            t = _load(bufs[0], src)
            np.subtract(t, vm[vidx], out=t)
        np.multiply(t, va[vidx], out=t)
        np.add(t, vb[vidx], out=t)
        _store(dst, t)

    L.run(work, bufs=1)
    return y


# -- backward -------------------------------------------------------------------------------------


def grad_sums(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    mean_lo: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(dbias, dscale) = (sum(dy), inv_std * sum(dy * (x - mean)))`` per channel, float64.

    With ``mean_lo``, the mean is ``mean + mean_lo``: ``sum(dy*(x-mean)) - mean_lo * sum(dy)``.
    """
    L = _Layout(x, axis)
    sdy, sdx = np.empty(L.part_shape), np.empty(L.part_shape)
    vdy, vx, vm, red = L.view(dy), L.x, L.vec(mean), L.red

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, vidx, pidx, _ = blk
        d = _load(bufs[0], vx[idx])
        np.subtract(d, vm[vidx], out=d)
        g = _load(bufs[1], vdy[idx])
        sdy[pidx] = np.add.reduce(g, axis=red)
        sdx[pidx] = L.dot_into(g, d)

    L.run(work, bufs=2)
    dbias = np.add.reduce(L.per_channel(sdy), axis=0)
    sxd = np.add.reduce(L.per_channel(sdx), axis=0)
    if mean_lo is not None:
        sxd = sxd - mean_lo * dbias
    return dbias, sxd * inv_std


def train_input_grad(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
    count: int,
    dbias: np.ndarray,
    dscale: np.ndarray,
    mean_lo: np.ndarray | None = None,
) -> np.ndarray:
    """``dx = k * (dy - dbias/n - x_hat * dscale/n)``, ``k = scale * inv_std``; in x.dtype.

    Evaluated as ``k*dy + (x - mean) * c1 - c0`` with ``c1 = -k*inv_std*dscale/n`` and
    ``c0 = k*dbias/n + c1*mean_lo``: in float64, mean subtracted first, rounded once; or, for
    float32 input, in float32 as ``k32*dy + ((x - mean_hi)*c1_32 + c0_32)`` (module doc).
    """
    if x.size == 0:
        return _empty_result(x)
    L = _Layout(x, axis)
    dx, vdx = L.empty_like_x(x.dtype)
    k = scale * inv_std
    c1 = -k * inv_std * dscale / count
    c0 = k * dbias / count
    vx, vdy = L.x, L.view(dy)
    if x.dtype == np.float32:
        with np.errstate(all="ignore"):  # NaN / inf constants: those channels use float64
            mh, r = _split_mean(mean, mean_lo)
            c1_32 = c1.astype(np.float32)
            # Fold: c1*(x - mu) - c0 = c1_32*(x - mh) + (-c0 - c1_32*r) + (c1 - c1_32)*(x - mu).
            e = -c0 - c1_32.astype(np.float64) * r
            rho = np.abs(r) * inv_std
            ok = (rho * np.sqrt(count) <= 1 / 3) & _f32_safe(k) & _f32_safe(c1)
            ok &= _f32_safe(e, zero_small=True)
        f32 = L.channel_mask(ok)
        vmh, vk32, vc1_32, ve32 = (
            L.vec(mh, np.float32), L.vec(k, np.float32), L.vec(c1_32, np.float32),
            L.vec(e, np.float32),
        )
    else:
        f32 = None
    if mean_lo is not None:
        c0 = c0 + c1 * mean_lo
    vk, vc1, vc0, vm = L.vec(k), L.vec(c1), L.vec(c0), L.vec(mean)

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, vidx, _, bshape = blk
        dst = vdx[idx]
        if f32 is not None and f32[vidx if L.row_mode else 0]:
            t, u = _scratch32(bufs[0], bshape), _scratch32(bufs[1], bshape)
            np.subtract(vx[idx], vmh[vidx], out=t)  # exact when x is within 2x of mean_hi
            np.multiply(t, vc1_32[vidx], out=t)
            np.add(t, ve32[vidx], out=t)
            np.multiply(vdy[idx], vk32[vidx], out=u)
            np.add(u, t, out=dst)
            return
        t = _load(bufs[0], vx[idx])
        np.subtract(t, vm[vidx], out=t)
        np.multiply(t, vc1[vidx], out=t)
        if dst.dtype == np.float64:
            u = dst
            np.multiply(vdy[idx], vk[vidx], out=u)
        else:
            u = _load(bufs[1], vdy[idx])
            np.multiply(u, vk[vidx], out=u)
        np.add(u, t, out=u)
        np.subtract(u, vc0[vidx], out=u)
        _store(dst, u)

    L.run(work, bufs=2)
    return dx


def eval_backward(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inference-mode gradients in one pass over dy and x.

    ``dx = dy * scale * inv_std`` (in x.dtype) and
    ``(dbias, dscale) = (sum(dy), inv_std * sum(dy * (x - mean)))`` in float64.
    """
    if x.size == 0:
        z = np.zeros(x.shape[axis])
        return _empty_result(x), z, z.copy()
    L = _Layout(x, axis)
    dx, vdx = L.empty_like_x(x.dtype)
    sdy, sdx = np.empty(L.part_shape), np.empty(L.part_shape)
    vdy, vx, vm, vk, red = L.view(dy), L.x, L.vec(mean), L.vec(scale * inv_std), L.red

    # float32: dx = float32(k) * dy in float32, two roundings (|error| <= eps32 * |k * dy|).
    with np.errstate(all="ignore"):
        f32 = x.dtype == np.float32 and bool(np.all(_f32_safe(scale * inv_std)))
    vk32 = L.vec(scale * inv_std, np.float32) if f32 else None

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, vidx, pidx, bshape = blk
        dst = vdx[idx]
        if vk32 is not None:
            np.multiply(vdy[idx], vk32[vidx], out=dst)
        g = _load(bufs[1], vdy[idx])
        if vk32 is None:
            u = dst if dst.dtype == np.float64 else _scratch(bufs[2], bshape)
            np.multiply(g, vk[vidx], out=u)
            _store(dst, u)
        d = _load(bufs[0], vx[idx])
        np.subtract(d, vm[vidx], out=d)
        sdy[pidx] = np.add.reduce(g, axis=red)
        sdx[pidx] = L.dot_into(g, d)

    L.run(work, bufs=3)
    dbias = np.add.reduce(L.per_channel(sdy), axis=0)
    dscale = np.add.reduce(L.per_channel(sdx), axis=0) * inv_std
    return dx, dbias, dscale
