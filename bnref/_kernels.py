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

Blocks hold ``block_elems`` values (64 Ki: 512 KiB of float64, an L2's worth) and are handed
to a small thread pool (``num_threads``, default ``min(2, CPUs)``, env ``BNREF_NUM_THREADS``);
NumPy releases the GIL in its loops. Each block is widened to float64 once, in cache; all
arithmetic is float64. Per-block results are stored by block index and combined in a fixed
order, so results are bitwise independent of the thread count and of scheduling. Extra
memory: the output plus three block buffers per thread and O(C * blocks) partial sums.

Numerics and the bound achieved
-------------------------------
Statistics (``channel_moments``): each block runs the corrected two-pass algorithm on its
own values (Chan, Golub & LeVeque 1983)::

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
N*H*W = 1e8 values per channel with mean 1e4, std 1.

Elementwise outputs are computed in float64 and rounded once to the input dtype. ``y`` is
``(x - mean) * (scale * inv_std) + bias``; ``dx`` is
``k*dy - (k * inv_std * dscale / n) * (x - mean) - k * dbias / n`` with ``k = scale*inv_std``.
The mean is subtracted first (in float64, before any rounding), so |mean| >> std costs nothing.

The mean is carried as ``mean + mean_lo`` (its rounding residual, from the block sums); the
residual is folded into per-channel constants, so it costs nothing per element and float64
outputs stay ulp-accurate when |mean| >> std. Bounds, with natural scales
``|scale| * (1 + |x_hat|) + |bias|`` for y and ``|k| * (|dy| + sum|dy|/n + |x_hat| *
sum|dy * x_hat|/n)`` for dx (tests/test_accuracy_contract.py checks them against an
extended-precision compensated reference, with |mean| / std up to ~1e7):

* float32 / float16 input: the float64 value rounded once, ``|y - y64| <= 1 * eps32 * scale``
  (observed <= 0.5 eps32; the issue's contract asks for 4 eps32); same for dx, dscale, dbias.
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


_config = {"block_elems": BLOCK_ELEMS, "threads": _default_threads()}
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
def tuning(block_elems: int | None = None, threads: int | None = None) -> Iterator[None]:
    """Temporarily change the block size and/or thread count (tests use tiny blocks)."""
    old = dict(_config)
    try:
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

    def __init__(self, x: np.ndarray, axis: int) -> None:
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
        self._make_blocks(_config["block_elems"])

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

    def vec(self, v: np.ndarray) -> np.ndarray:
        """A per-channel vector indexable by a block's vector index (channel or column range)."""
        v = np.asarray(v, dtype=np.float64)
        return v if self.row_mode else np.repeat(v, self.B)

    # Blocks -------------------------------------------------------------------------------------

    def _make_blocks(self, target: int) -> None:
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
            rb = min(A, 64) if W > target // 64 else min(A, max(1, target // W))
            wb = min(W, max(1, target // rb))
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
        """Partial results (part_shape) regrouped as (C, K): all partials of a channel in a row."""
        if self.row_mode:
            return part
        nab = part.shape[0]
        p = part.reshape(nab, self.C, self.B).transpose(1, 0, 2)
        return np.ascontiguousarray(p).reshape(self.C, -1)

    def partial_counts(self) -> np.ndarray:
        """Counts of the partials in ``per_channel`` order (the same for every channel)."""
        return self.counts

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

    def run(self, work: Callable[[tuple, tuple[np.ndarray, ...]], None]) -> None:
        """Call ``work(block, bufs)`` for every block, on up to ``num_threads`` threads.

        ``bufs`` are three per-thread float64 scratch arrays of ``max_block`` values.
        """
        blocks = self.blocks
        threads = min(_config["threads"], len(blocks))
        size = self.max_block

        def worker(it: Iterator[int], lock: threading.Lock) -> None:
            bufs = (np.empty(size), np.empty(size), np.empty(size))
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                work(blocks[i], bufs)

        it, lock = iter(range(len(blocks))), threading.Lock()
        if threads <= 1:
            worker(it, lock)
            return
        pool = _get_pool(threads - 1)
        futures = [pool.submit(worker, it, lock) for _ in range(threads - 1)]
        try:
            worker(it, lock)  # the calling thread works too
        finally:
            for f in futures:
                f.result()


def _memory_order(x: np.ndarray) -> tuple[int, ...]:
    """Axis permutation listing x's axes from largest to smallest stride (size-1 axes last)."""
    return tuple(sorted(range(x.ndim), key=lambda i: (-abs(x.strides[i]) if x.shape[i] > 1 else 1, i)))


def _scratch(buf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return buf[: shape[0] * shape[1]].reshape(shape)


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
    L = _Layout(x, axis)
    shape = L.part_shape
    S, Cs, Q = np.empty(shape), np.empty(shape), np.empty(shape)
    red, vx = L.red, L.x

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, _, pidx, bshape = blk
        d = _load(bufs[0], vx[idx])
        m = np.add.reduce(d, axis=red) / L.block_count(bshape)
        np.subtract(d, m, out=d)
        S[pidx] = m
        Cs[pidx] = np.add.reduce(d, axis=red)
        Q[pidx] = L.dot_into(d, d)

    L.run(work)
    n = L.A * L.B
    counts = L.partial_counts()  # (K,)
    m, c, q = L.per_channel(S), L.per_channel(Cs), L.per_channel(Q)  # (C, K): block means...
    mean = np.add.reduce(m * counts, axis=1) / n
    # Block k's values minus `mean` sum to c_k + n_k (m_k - mean): no |mean|-sized terms.
    dm = m - mean[:, None]
    mean_lo = np.add.reduce(c + dm * counts, axis=1) / n
    # Deviation of block k's exact mean from the exact pooled mean.
    dev = (dm + c / counts) - mean_lo[:, None]
    m2 = np.add.reduce(q - c * c / counts, axis=1) + np.einsum("ck,ck,k->c", dev, dev, counts)
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
    """``y = (x - mean) * (scale * inv_std) + bias``, computed in float64, returned in x.dtype.

    The mean is subtracted first, in float64, so |mean| >> std loses nothing; ``mean_lo``
    (the mean's rounding residual, if known) is folded into the bias:
    ``bias - scale * inv_std * mean_lo``. The result is rounded once to the input dtype.
    """
    if x.size == 0:
        return _empty_result(x)
    L = _Layout(x, axis)
    y, vy = L.empty_like_x(x.dtype)
    a = inv_std * scale
    b = bias if mean_lo is None else bias - a * mean_lo
    vm, va, vb, vx = L.vec(mean), L.vec(a), L.vec(b), L.x

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, vidx, _, bshape = blk
        src, dst = vx[idx], vy[idx]
        if dst.dtype == np.float64:
            t = dst
            np.subtract(src, vm[vidx], out=t)
        else:
            t = _load(bufs[0], src)
            np.subtract(t, vm[vidx], out=t)
        np.multiply(t, va[vidx], out=t)
        np.add(t, vb[vidx], out=t)
        _store(dst, t)

    L.run(work)
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

    L.run(work)
    dbias = np.add.reduce(L.per_channel(sdy), axis=1)
    sxd = np.add.reduce(L.per_channel(sdx), axis=1)
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

    Evaluated as ``k*dy + (x - mean) * c1 - c0`` in float64 with ``c1 = -k*inv_std*dscale/n``
    and ``c0 = k*dbias/n + c1*mean_lo`` (mean subtracted first), rounded once.
    """
    if x.size == 0:
        return _empty_result(x)
    L = _Layout(x, axis)
    dx, vdx = L.empty_like_x(x.dtype)
    k = scale * inv_std
    c1 = -k * inv_std * dscale / count
    c0 = k * dbias / count
    if mean_lo is not None:
        c0 = c0 + c1 * mean_lo
    vk, vc1, vc0 = L.vec(k), L.vec(c1), L.vec(c0)
    vm, vx, vdy = L.vec(mean), L.x, L.view(dy)

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, vidx, _, _ = blk
        dst = vdx[idx]
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

    L.run(work)
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

    def work(blk: tuple, bufs: tuple[np.ndarray, ...]) -> None:
        idx, vidx, pidx, bshape = blk
        g = _load(bufs[1], vdy[idx])
        dst = vdx[idx]
        u = dst if dst.dtype == np.float64 else _scratch(bufs[2], bshape)
        np.multiply(g, vk[vidx], out=u)
        _store(dst, u)
        d = _load(bufs[0], vx[idx])
        np.subtract(d, vm[vidx], out=d)
        sdy[pidx] = np.add.reduce(g, axis=red)
        sdx[pidx] = L.dot_into(g, d)

    L.run(work)
    dbias = np.add.reduce(L.per_channel(sdy), axis=1)
    dscale = np.add.reduce(L.per_channel(sdx), axis=1) * inv_std
    return dx, dbias, dscale
