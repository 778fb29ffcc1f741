"""Low-level per-channel kernels: the only place that touches every element of x.

Everything else in bnref works on per-channel vectors; these functions stream the data.

Layout
------
Any input is viewed, without copying, in its memory order: the axes are permuted so the
array is C-contiguous (NCHW stays NCHW; a channels-last array or a transposed view becomes
(..., C)), and the view is reshaped to ``(A, C, B)`` (A: everything before the channel axis,
B: everything after it). Arrays that are not a permutation of a contiguous array are copied
once. The structure below depends only on shape, strides, axis and block size and is cached.

* Row mode (``B >= 64`` and at least half a block per channel: NCHW, 5-D): a block is
  ``x3[a0:a1, c, b0:b1]``, one channel, so every per-channel constant is a scalar (NumPy's
  fastest loops) and the block sums to one number. (Smaller channels go to column mode: one
  block per channel would be small, and per-block overhead would dominate.)
* Tiled column mode (NHWC, (N, C), short B): the data is an ``(A, W = C*B)`` matrix and a
  block is a run of whole rows (contiguous). Per-channel constants are repeated into a tile
  of the block's shape, because NumPy's loops run ~1.6-2.6x faster on two operands of one
  shape than on a vector broadcast down a block; tiles live in a per-caller arena
  (``_Arena``). Consecutive blocks up to ``UNIT_ROWS`` rows form a unit of work that shares
  one row of partial sums.
* General column mode (rows too wide for ``TILE_MIN_ROWS`` rows in a block): blocks of
  ``GROUP_ROWS`` rows and part of the columns, constants broadcast.

Blocks hold 1/16 of the input, at least ``block_elems`` values (64 Ki: 512 KiB of float64,
an L2's worth) and at most ``max_block_elems`` (256 Ki: fewer, longer NumPy calls stream
large inputs faster), and units of work are handed to a small thread pool (``num_threads``, default ``min(2, CPUs)``, env
``BNREF_NUM_THREADS``); NumPy releases the GIL in its loops. Inputs under
``PARALLEL_MIN_ELEMS`` (256 Ki values) stay on the calling thread. Partial sums are stored
by unit and combined in a fixed order, so results are bitwise independent of the thread
count and of scheduling. Extra memory: the output, two block-sized scratch arrays per thread
and the constants' arena (both kept between calls: ``kept_nbytes()``), O(C * units) partial
sums. Scratch arrays and constants sit at distinct offsets modulo 4 KiB ("4K aliasing", see
``_Arena``).

Training forward and backward in row mode, when a channel holds at most
``FUSE_MAX_BLOCKS * block_elems`` values (NCHW (64, C, 28, 28): 50 Ki), take one pass per
channel (``train_forward``, ``train_backward``): the channel is loaded into scratch once, its
sums computed, then its outputs from the same scratch, so x and dy are read from memory once
instead of twice. Otherwise statistics and outputs are two passes.

Numerics and the bounds achieved
--------------------------------
Notation here: v = 2**-53 (eps64 = 2v), n values per channel, mu the exact mean,
sigma**2 = M2 / n, s = |K - mu| / sigma.

Statistics (``channel_stats``), always in float64, by shifted sums: a per-channel shift K
(the mean of a small sample spread over the data, ``_sample_mean``), then one pass::

    c = sum(x - K);  q = sum((x - K)**2);  mean = K + c/n;  M2 = q - c * (c/n)

with ``mean_lo`` = the rounding error of ``K + c/n`` (TwoSum), so ``mean + mean_lo`` is
``K + c/n`` exactly. Every sum is a tree: NumPy's pairwise summation along contiguous
memory, at most ``GROUP_ROWS`` rows added one after another down columns, and partial sums
of blocks and units added pairwise; its depth L (additions on the longest path) is at most
log2(n) + 90. The standard summation bounds give (first order in v)::

    |M2_hat - M2| <= v * M2 * ((L + 3) * (1 + s**2 + 2 * s * sqrt(1 + s**2)) + 2 * s**2 + 1)
    |mean_hat + mean_lo - mu| <= (L + 2) * v * sigma * sqrt(1 + s**2)

Nothing is of the size of |mean|, so |mean| >> std costs nothing. rho is checked after the
fact from the computed sums: a channel with s > ``SHIFT_MAX_STD`` = 2 is summed once more
around ``K + c/n``, after which s is O(L v sqrt(1 + s_first**2)) (and s_first <= sqrt(n): a
sample mean lies within the data). So M2 is within 14 (L + 4) v of the exact value, below
2e-13 relative for n < 2**40, and mean + mean_lo within 2.3 (L + 2) v sigma;
the tests check 1e-12 (mean: relative to ``|mean| + std``) up to N*H*W = 1e8 values per
channel with mean 1e4, std 1, and with the second pass forced. The gradient sums
(``grad_sums``, ``eval_backward``, ``train_backward``) are float64 too: ``sum(dy)`` and
``sum(dy * (x - mean))``, pairwise for float64 input; for float32 / float16 input, whose
sums are rounded to float32 / float16, the row-mode dot product takes one fused pass (one
accumulator per SIMD lane; error ~ n u, far below eps32).

Elementwise outputs, float64 path (every forward output unless ``FLOAT32_FORWARD``; dx for
float64 / float16 input and for float32 channels the guards below reject): computed in
float64, rounded once to the input dtype. ``y`` is
``(x - mean) * (scale * inv_std) + bias``; ``dx`` is
``k*dy - (k * inv_std * dscale / n) * (x - mean) - k * dbias / n`` with ``k = scale*inv_std``.
The mean is subtracted first, so |mean| >> std costs nothing; it is carried as
``mean + mean_lo`` (its rounding residual, from the block sums), folded into per-channel
constants, so float64 outputs stay ulp-accurate when |mean| >> std.

Fused training forward (row mode, one pass per channel): the scratch holds d = fl(x - K)
with s <= 2, and ``y = fl(fl(a * d) + fl(bias - a * c/n))`` (mu - K = c/n up to the
statistics' error), in float64 and rounded once: d's rounding costs v |scale| (|x_hat| + s),
the product and offset v |scale| (|x_hat| + 2 s) + v |bias|, the sum v |y|, so y64 is within
~10 v S (S below) plus the statistics' own error, and a float32 / float16 result is still the
float64 answer rounded once (0.5 eps32 S + O(v)). Fused training backward: the float64 path
below for every dtype, from x and dy in scratch (float32 dx: rounded once, <= 0.5 eps32 +
O(v) of its natural scale, tighter than the float32 path's 2.5 eps32).

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
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

# -- tuning ---------------------------------------------------------------------------------------

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
#: this many standard deviations from its mean (module doc: the error bound).
SHIFT_MAX_STD = 2.0
#: Row mode: training forward and backward take one pass over x (and dy) when a channel's
#: values fit in this many blocks (each channel is then one block, held in scratch).
FUSE_MAX_BLOCKS = 4
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
    "max_block_elems": MAX_BLOCK_ELEMS,
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
    max_block_elems: int | None = None,
) -> Iterator[None]:
    """Temporarily change the kernels' tuning (tests use tiny blocks and ``parallel_min=0``).

    ``block_elems``: values per block (``max_block_elems``: at most, for large inputs; it
    follows ``block_elems`` unless given); ``threads``: thread count; ``parallel_min``: inputs
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
            _config["max_block_elems"] = int(block_elems)
        if max_block_elems is not None:
            _config["max_block_elems"] = max(int(max_block_elems), _config["block_elems"])
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


class _Block(NamedTuple):
    """One block of the canonical view: what a worker thread processes in one go."""

    idx: tuple  # index into the canonical view of x (and of dy, y, dx)
    vidx: object  # row mode: the channel; general column mode: the column slice
    pidx: tuple  # where its partial sums go in the partial arrays (part_shape)
    shape: tuple[int, int]  # shape of the block's data, as loaded into scratch
    first: bool = True  # the first block of its unit: stores its partial sums (else adds them)


class _Layout:
    """Canonical blocked view of arrays shaped and laid out like ``x``.

    The structure (axis order, blocks, units of work) depends only on x's shape, strides and
    channel axis and on the block size, and is cached (``_plan``); a call only makes views.
    """

    def __init__(self, x: np.ndarray, axis: int, target: int | None = None) -> None:
        target = _block_target(x.size) if target is None else target
        plan = _plan(x.shape, x.strides, x.itemsize, axis, target)
        self.__dict__.update(plan.__dict__)
        if self.copy:  # sliced / negative strides: one copy
            x = np.ascontiguousarray(x)
        self.x = self.view(x)
        self._consts = 0

    def _build(self, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, axis: int,
               target: int) -> None:
        perm = _memory_order(shape, strides)
        tshape = tuple(shape[i] for i in perm)
        self.copy = not _is_c_contiguous(tshape, tuple(strides[i] for i in perm), itemsize)
        if self.copy:
            perm, tshape = tuple(range(len(shape))), tuple(shape)
        self.perm = perm
        self.inv_perm = tuple(int(i) for i in np.argsort(perm))
        self.tshape = tshape
        k = perm.index(axis)
        self.C = shape[axis]
        self.A = math.prod(tshape[:k])
        self.B = math.prod(tshape[k + 1 :])
        # Row mode needs long runs and channels of at least half a block (else its blocks, one
        # channel each, are small and per-block overhead dominates: column mode is 1.5-3.6x
        # faster for NCHW (16, 256, 28, 28) or (64, 512, 8, 8)).
        self.row_mode = self.B >= ROW_MODE_MIN_RUN and 2 * self.A * self.B >= target
        self.vshape = (self.A, self.C, self.B) if self.row_mode else (self.A, self.C * self.B)
        self._make_blocks(target)

    # Views --------------------------------------------------------------------------------------

    def view(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (shape of x) as (A, C, B) in row mode or (A, C*B) in column mode."""
        t = arr.transpose(self.perm)
        if not t.flags.c_contiguous:  # e.g. dy laid out differently from x
            t = np.ascontiguousarray(t)
        return t.reshape(self.vshape)

    def empty_like_x(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """An output with x's shape and memory layout, and its canonical view."""
        t = np.empty(self.tshape, dtype=dtype)
        return t.transpose(self.inv_perm), t.reshape(self.vshape)

    # Per-channel constants ----------------------------------------------------------------------

    def const(self, v: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """Per-channel vector ``v`` (rounded once to ``dtype``) in the form blocks consume.

        Row mode: the vector itself (a block takes one scalar). Column mode: repeated over
        the B columns of each channel; tiled column mode: further repeated down ``rows`` rows
        (a tile shaped like the largest block), because NumPy's loops run about 2x faster on
        two operands of one shape than on a vector broadcast down a block. Column-mode
        constants live in the calling thread's arena (``_Arena``) until the call returns.
        """
        v = np.asarray(v, dtype=np.float64).astype(dtype, copy=False)
        if self.row_mode:
            return v
        w = np.repeat(v, self.B) if self.B > 1 else v
        rows = self.rows if self.tiled else 1
        out = _Arena.mine().take(rows * w.size, dtype, first=not self._consts)
        self._consts += 1
        if not self.tiled:
            out[...] = w
            return out
        tile = out.reshape(rows, w.size)
        tile[...] = w
        return tile

    def at(self, v: np.ndarray, blk: _Block) -> np.ndarray:
        """Block ``blk``'s operand of a constant made by ``const``: scalar, tile rows or slice."""
        if self.tiled:
            return v[: blk.shape[0]]
        return v[blk.vidx]

    def channel_mask(self, ok: np.ndarray) -> np.ndarray:
        """Per-channel flags indexable like ``const`` in row mode; one all-channel flag otherwise."""
        ok = np.asarray(ok, dtype=bool)
        return ok if self.row_mode else np.array([ok.all()])

    def takes(self, mask: np.ndarray, blk: _Block) -> bool:
        """Whether block ``blk`` is covered by ``mask`` (from ``channel_mask``)."""
        return bool(mask[blk.vidx if self.row_mode else 0])

    # Blocks -------------------------------------------------------------------------------------

    def _make_blocks(self, target: int) -> None:
        """List the blocks (``_Block``) and the shape of the partial-sum arrays.

        Row mode: a block is ``x3[a0:a1, c, b0:b1]``, one channel, so every per-channel
        constant is a scalar (NumPy's fastest loops) and the block sums to one number.
        Column mode: a block is ``x2[r0:r1, w0:w1]``, summed down its columns. "Tiled" column
        mode: blocks of whole rows (contiguous), at least ``min(A, TILE_MIN_ROWS)`` of them,
        whose per-channel constants are tiles of the block's shape; consecutive blocks up to
        ``UNIT_ROWS`` rows form one unit of work that shares one row of partial sums (fewer
        partial sums to store and add up). Otherwise (very wide rows) blocks of
        ``GROUP_ROWS`` rows and part of the columns.

        A unit of work (``self.units``: lists of blocks) runs on one thread, in order.
        """
        A, C, B = self.A, self.C, self.B
        blocks = []
        self.tiled = False
        self.units = None
        if self.row_mode:
            nb = max(1, -(-B // target))  # pieces per run
            bl = -(-B // nb)
            ra = max(1, min(A, target // bl)) if nb == 1 else 1  # runs per block
            bb = [(j * bl, min(B, (j + 1) * bl)) for j in range(nb)]
            ab = [(i * ra, min(A, (i + 1) * ra)) for i in range(-(-A // ra))]
            for c in range(C):
                k = 0
                for a0, a1 in ab:
                    for b0, b1 in bb:
                        idx = (slice(a0, a1), c, slice(b0, b1))
                        blocks.append(_Block(idx, c, (c, k), (a1 - a0, b1 - b0)))
                        k += 1
            self.part_shape = (C, len(ab) * len(bb))
        else:
            W = C * B
            rows_fit = target // W
            if rows_fit >= min(A, TILE_MIN_ROWS):
                self.tiled = True
                rb = min(A, rows_fit)  # rows per block
                gr = rb * max(1, -(-UNIT_ROWS // rb))  # rows per unit
                ws = slice(0, W)
                units = []
                for i in range(-(-A // gr)):
                    unit = []
                    for r0 in range(i * gr, min(A, (i + 1) * gr), rb):
                        r1 = min(A, r0 + rb, (i + 1) * gr)
                        unit.append(_Block((slice(r0, r1), ws), ws, (i, ws), (r1 - r0, W), not unit))
                    units.append(unit)
                    blocks += unit
                self.units = units
                nab = len(units)
            else:
                rb = min(A, GROUP_ROWS)
                wb = min(W, max(1, target // rb))
                nab = -(-A // rb)
                for i in range(nab):
                    r0, r1 = i * rb, min(A, (i + 1) * rb)
                    for w0 in range(0, W, wb):
                        ws = slice(w0, min(W, w0 + wb))
                        blocks.append(_Block((slice(r0, r1), ws), ws, (i, ws), (r1 - r0, ws.stop - w0)))
            self.rows = rb
            self.part_shape = (nab, W)
        self.blocks = blocks
        self.single_units = [[b] for b in blocks]
        if self.units is None:
            self.units = self.single_units
        self.max_block = max(r * c for r, c in (b.shape for b in blocks))

    # Sums ---------------------------------------------------------------------------------------

    @staticmethod
    def put(part: np.ndarray, blk: _Block, value: np.ndarray | float) -> None:
        """Record block ``blk``'s partial sum: stored by the first block of a unit, then added."""
        if blk.first:
            part[blk.pidx] = value
        else:
            part[blk.pidx] += value

    def block_sum(self, d: np.ndarray) -> np.ndarray | float:
        """Sum of a loaded (contiguous, float64) block: a number (row mode) or column sums."""
        if self.row_mode:
            return np.add.reduce(d, axis=None)  # pairwise: contiguous
        return _column_sums(d, None)

    def block_dot(
        self, a: np.ndarray, b: np.ndarray, pairwise: bool = True, out: np.ndarray | None = None
    ) -> np.ndarray | float:
        """``sum(a * b)`` of two loaded blocks, like ``block_sum``.

        Row mode sums the products pairwise (error ~log2(n) eps64), written to ``out`` (else
        over ``b``); or with ``pairwise=False`` in one fused pass (one accumulator: error up to
        ~n eps64 of sum|a*b|, still far below eps32: for sums that end up in float32).
        """
        if self.row_mode:
            if not pairwise:
                return np.einsum("ij,ij->", a, b)
            prod = np.multiply(a, b, out=b if out is None else out)
            return np.add.reduce(prod, axis=None)
        return _column_sums(a, b)

    def channel_totals(self, part: np.ndarray) -> np.ndarray:
        """Per-channel totals of partial sums (``part_shape``), summed pairwise."""
        if self.row_mode:
            return np.add.reduce(part, axis=1)  # contiguous rows: pairwise
        cols = _fold_rows(part)
        return np.add.reduce(cols.reshape(self.C, self.B), axis=1) if self.B > 1 else cols

    # Execution ----------------------------------------------------------------------------------

    def run(
        self, work: Callable[[_Block, tuple[np.ndarray, ...]], None], bufs: int, sums: bool = True
    ) -> None:
        """Call ``work(block, scratch)`` for every block, on up to ``num_threads`` threads.

        With ``sums`` (work that records partial sums), a unit's blocks run one after another
        on one thread; without, every block is a unit of its own (finer load balance).
        ``scratch`` holds ``bufs`` per-thread float64 arrays of ``max_block`` values (kept
        between calls up to the default block size, see ``_thread_scratch``). Inputs smaller
        than ``PARALLEL_MIN_ELEMS`` run on the calling thread: a hand-off costs more than it
        saves there.
        """
        units = self.units if sums else self.single_units
        threads = min(_config["threads"], len(units))
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
                for blk in units[i]:
                    work(blk, b)

        if threads <= 1:
            b = _thread_scratch(size, bufs)
            for blk in self.blocks:
                work(blk, b)
            return
        it, lock = iter(range(len(units))), threading.Lock()
        pool = _get_pool(threads - 1)
        futures = [pool.submit(worker, it, lock) for _ in range(threads - 1)]
        try:
            worker(it, lock)  # the calling thread works too
        finally:
            for f in futures:
                f.result()


def _column_sums(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Column sums of ``a`` (``b`` None) or of ``a * b``, for (rows, w) float64 blocks.

    NumPy sums down columns one row after another; to bound that recursion at
    ``GROUP_ROWS`` terms, taller blocks are summed in groups of ``GROUP_ROWS`` rows and the
    group sums added pairwise (``_fold_rows``).
    """
    r, w = a.shape
    if r <= GROUP_ROWS:
        if b is None:
            return np.add.reduce(a, axis=0)
        return np.einsum("ij,ij->j", a, b)
    g = r // GROUP_ROWS
    h = g * GROUP_ROWS
    parts = np.empty((g + (h < r), w))
    if b is None:
        np.add.reduce(a[:h].reshape(g, GROUP_ROWS, w), axis=1, out=parts[:g])
        if h < r:
            np.add.reduce(a[h:], axis=0, out=parts[g])
    else:
        a3, b3 = a[:h].reshape(g, GROUP_ROWS, w), b[:h].reshape(g, GROUP_ROWS, w)
        np.einsum("gij,gij->gj", a3, b3, out=parts[:g])
        if h < r:
            np.einsum("ij,ij->j", a[h:], b[h:], out=parts[g])
    return _fold_rows(parts)


def _fold_rows(p: np.ndarray) -> np.ndarray:
    """Sum the rows of ``p`` pairwise (in place; ``p`` is overwritten) and return the sum."""
    m = p.shape[0]
    while m > 1:
        h = m // 2
        np.add(p[:h], p[m - h : m], out=p[:h])
        m -= h
    return p[0]


_tls = threading.local()


def _block_target(n: int) -> int:
    """Values per block for an input of ``n`` values: 1/16 of it, within the configured range."""
    return min(_config["max_block_elems"], max(_config["block_elems"], n // 16))


def _thread_scratch(size: int, count: int) -> tuple[np.ndarray, ...]:
    """``count`` float64 scratch arrays of at least ``size`` values for this thread.

    Arrays up to ``max_block_elems`` values are kept per thread and reused (a fresh
    allocation page-faults on every call): up to two of the largest block size used so
    far (512 KiB each for inputs up to 1 Mi values, at most 2 MiB). Larger ones (the fused
    passes' whole channels) are allocated for the call and freed after it.
    """
    if size > max(_config["max_block_elems"], BLOCK_ELEMS):
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

    So scratch arrays and constants (``_Arena``) never share an address modulo 4 KiB row by
    row ("4K aliasing", see ``_Arena``).
    """
    raw = np.empty(n * 8 + 8192, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + (1024, 3072)[k % 2]
    return raw[start : start + n * 8].view(np.float64)


def kept_nbytes() -> int:
    """Bytes the kernels keep between calls now: scratch of every live thread, constants' arenas.

    A thread's buffers are thread-local and freed when it exits; its entries are dropped here.
    """
    alive = {t.ident for t in threading.enumerate()}
    for key in [k for k in _kept if k[0] not in alive]:
        _kept.pop(key, None)
    return sum(_kept.values())


class _Arena:
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
    def mine() -> _Arena:
        arena = getattr(_tls, "arena", None)
        if arena is None or arena.generation != _generation:
            arena = _tls.arena = _Arena(0)
        return arena

    def take(self, n: int, dtype: type, first: bool) -> np.ndarray:
        """``n`` uninitialized values of ``dtype``; ``first``: a new call starts (frees all)."""
        if first:
            self.cursor, self.count = 0, 0
        nbytes = n * np.dtype(dtype).itemsize
        start = self.base + self.cursor + 2048 + 256 * (self.count % 4)
        end = start + nbytes
        if end > self.buf.size:  # grow; tiles already handed out stay valid in the old buffer
            grown = _Arena(end + 8192)
            _tls.arena = grown
            return grown.take(n, dtype, first=True)
        self.cursor = -(-(end - self.base) // 4096) * 4096
        self.count += 1
        return self.buf[start:end].view(dtype)


_kept: dict[tuple[int, str], int] = {}
_generation = 0  # kept buffers of an older generation are dropped on their next use


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


def _memory_order(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """Axis permutation listing the axes from largest to smallest stride (size-1 axes last)."""
    return tuple(sorted(range(len(shape)), key=lambda i: (-abs(strides[i]) if shape[i] > 1 else 1, i)))


def _is_c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """Whether an array of this shape and strides is C-contiguous (size-1 axes: any stride)."""
    if math.prod(shape) == 0:
        return True
    step = itemsize
    for n, st in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and st != step:
            return False
        step *= n
    return True


@functools.lru_cache(maxsize=256)
def _plan(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, axis: int, target: int
) -> _Layout:
    """The structure of a ``_Layout`` for this shape, strides, axis and block size (cached)."""
    plan = _Layout.__new__(_Layout)
    plan._build(shape, strides, itemsize, axis, target)
    return plan


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


def _load_minus(buf: np.ndarray, src: np.ndarray, k: np.ndarray | float) -> np.ndarray:
    """``src - k`` in float64 in contiguous scratch ``buf`` (float64 src: no separate load)."""
    out = _scratch(buf, src.shape)
    if src.dtype == np.float64:
        np.subtract(src, k, out=out)
    else:
        np.copyto(out, src, casting="unsafe")
        np.subtract(out, k, out=out)
    return out


def _as_float64(buf: np.ndarray, src: np.ndarray, contiguous_ok: bool) -> np.ndarray:
    """``src`` as float64: itself when it already is (and ``contiguous_ok``), else loaded."""
    if contiguous_ok and src.dtype == np.float64 and src.flags.c_contiguous:
        return src
    return _load(buf, src)


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


def channel_stats(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, mean_lo, M2)`` per channel, float64; ``mean + mean_lo`` is the mean to ~eps64 * std.

    One pass of shifted sums ``c = sum(x - K)``, ``q = sum((x - K)**2)`` with a per-channel
    shift K near the mean (from a sample), then ``mean = K + c/n``, ``M2 = q - c**2/n``.
    A channel whose shift turns out farther than ``SHIFT_MAX_STD`` standard deviations from
    its mean is summed once more with K = that mean (module doc: why this bounds the error).
    """
    L = _Layout(x, axis)
    n = L.A * L.B
    shift = _sample_mean(L)
    with np.errstate(all="ignore"):  # NaN / inf data: those channels are NaN
        cn, m2 = _centred(*_shifted_sums(L, shift), n)
        far = _too_far(cn, m2, n)
        if np.any(far):
            shift = np.where(far, shift + cn, shift)
            cn, m2 = _centred(*_shifted_sums(L, shift), n)
        mean, mean_lo = _two_sum(shift, cn)
    return mean, mean_lo, np.maximum(m2, 0.0)


# The arithmetic after the sums, shared by channel_stats (per-channel arrays) and the fused
# training forward (one channel's Python floats): the same operations, the same roundings.


def _centred(c, q, n: int):
    """``(c/n, M2)`` from the shifted sums ``c = sum(x - K)``, ``q = sum((x - K)**2)``."""
    cn = c / n
    return cn, q - c * cn


def _too_far(cn, m2, n: int):
    """Whether the shift is farther than ``SHIFT_MAX_STD`` std from the mean (False for NaN)."""
    return n * cn * cn > SHIFT_MAX_STD**2 * m2


def _two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly (Knuth's TwoSum)."""
    s = a + b
    back = s - a
    return s, (a - (s - back)) + (b - back)


def _sample_mean(L: _Layout) -> np.ndarray:
    """Per-channel mean of a small sample spread over the data (a shift for ``_shifted_sums``).

    Row mode: up to 4 runs x 8 values per channel; column mode: up to 8 rows. Any value
    works (accuracy is checked after the fact); a near one saves the second pass.
    """
    vx = L.x
    if L.row_mode:
        sub = vx[:: max(1, L.A // 4), :, :: max(1, L.B // 8)]
        return np.add.reduce(sub.astype(np.float64), axis=(0, 2)) / (sub.shape[0] * sub.shape[2])
    sub = vx[:: max(1, L.A // 8)].astype(np.float64)
    sums = np.add.reduce(sub, axis=0)
    if L.B > 1:
        sums = np.add.reduce(sums.reshape(L.C, L.B), axis=1)
    return sums / (sub.shape[0] * L.B)


def _shifted_sums(L: _Layout, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel ``(sum(x - shift), sum((x - shift)**2))`` in float64, blocked and pairwise."""
    cp, qp = np.empty(L.part_shape), np.empty(L.part_shape)
    vx, k = L.x, L.const(shift)

    def work(blk: _Block, bufs: tuple[np.ndarray, ...]) -> None:
        d = _load_minus(bufs[0], vx[blk.idx], L.at(k, blk))
        L.put(cp, blk, L.block_sum(d))
        L.put(qp, blk, L.block_dot(d, d))

    L.run(work, bufs=1)
    return L.channel_totals(cp), L.channel_totals(qp)


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
    take_f32 = take_fused = np.zeros(L.C if L.row_mode else 1, dtype=bool)
    if x.dtype == np.float32 and _config["float32_forward"]:
        with np.errstate(all="ignore"):  # NaN / inf constants: those channels use float64
            mh, r = _split_mean(mean, mean_lo)
            a32 = a.astype(np.float32)
            # Fold: a*(x - mu) + bias = a32*(x - mh) + (bias - a32*r) + (a - a32)*(x - mu).
            b = bias - a32.astype(np.float64) * r
            ok = (np.abs(r) * inv_std <= 1.0) & _f32_safe(a) & _f32_safe(b, zero_small=True)
        take_f32 = L.channel_mask(ok)
    b64 = bias if mean_lo is None else bias - a * mean_lo
    if x.dtype.itemsize < 8:
        # float32 / float16 output: with |mean| * inv_std <= 2**16, y = x*a + (b64 - a*mean) in
        # float64 is within 2**-10 * eps32 of the natural scale (module doc), so one op less
        # per element and still the float64 answer rounded once.
        with np.errstate(all="ignore"):
            take_fused = L.channel_mask(np.abs(mean) * inv_std <= 2.0**16) & ~take_f32
            bf = b64 - a * mean
    take_plain = ~(take_f32 | take_fused)
    # Constants of the paths some block takes (in column mode, exactly one path).
    if np.any(take_f32):
        kmh, ka32, kb32 = (L.const(v, np.float32) for v in (mh, a32, b))
    if np.any(take_fused):
        ka, kbf = L.const(a), L.const(bf)
    if np.any(take_plain):
        ka, kb, km = L.const(a), L.const(b64), L.const(mean)
    whole_rows = L.tiled  # output blocks are contiguous: no scratch needed for float32 results

    def work(blk: _Block, bufs: tuple[np.ndarray, ...]) -> None:
        src, dst = vx[blk.idx], vy[blk.idx]
        if L.takes(take_f32, blk):
            # In a contiguous scratch when the block is strided (row mode): NumPy's loops run
            # ~1.4x faster than in place on a (runs, run) view of the output.
            t = dst if whole_rows else _scratch32(bufs[0], blk.shape)
            np.subtract(src, L.at(kmh, blk), out=t)  # exact when x is within 2x of mean_hi
            np.multiply(t, L.at(ka32, blk), out=t)
            np.add(t, L.at(kb32, blk), out=dst)
            return
        if L.takes(take_fused, blk):
            t = _load(bufs[0], src)
            np.multiply(t, L.at(ka, blk), out=t)
            np.add(t, L.at(kbf, blk), out=t)
            _store(dst, t)
            return
        if dst.dtype == np.float64:
            t = dst
            np.subtract(src, L.at(km, blk), out=t)
        else:
            t = _load_minus(bufs[0], src, L.at(km, blk))
        np.multiply(t, L.at(ka, blk), out=t)
        np.add(t, L.at(kb, blk), out=t)
        _store(dst, t)

    L.run(work, bufs=1, sums=False)
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
    exact = x.dtype == np.float64  # float32/float16 sums are rounded to their dtype
    sdy, sdx = np.empty(L.part_shape), np.empty(L.part_shape)
    vdy, vx, km = L.view(dy), L.x, L.const(mean)

    def work(blk: _Block, bufs: tuple[np.ndarray, ...]) -> None:
        d = _load_minus(bufs[0], vx[blk.idx], L.at(km, blk))
        g = _as_float64(bufs[1], vdy[blk.idx], contiguous_ok=not L.row_mode)
        L.put(sdy, blk, L.block_sum(g))
        L.put(sdx, blk, L.block_dot(g, d, pairwise=exact))

    L.run(work, bufs=2)
    dbias = L.channel_totals(sdy)
    return dbias, _dscale(L.channel_totals(sdx), dbias, mean_lo, inv_std)


# Shared by the blocked backward (per-channel arrays) and the fused one (one channel's floats).


def _dscale(sxd, dbias, mean_lo, inv_std):
    """``dscale = inv_std * sum(dy * (x - mu))`` from ``sxd = sum(dy * (x - mean))``, mu = mean + mean_lo.

    ``mean_lo`` None: mu = mean (no ``0 * dbias`` term, which is NaN for an infinite dbias).
    """
    return (sxd if mean_lo is None else sxd - mean_lo * dbias) * inv_std


def _dx_line(k, inv_std, dscale, dbias, count: int):
    """``(c1, c0)`` of ``dx = k*dy + c1*(x - mu) - c0``: ``c1 = -k*inv_std*dscale/n``, ``c0 = k*dbias/n``."""
    return -k * inv_std * dscale / count, k * dbias / count


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
    c1, c0 = _dx_line(k, inv_std, dscale, dbias, count)
    vx, vdy = L.x, L.view(dy)
    f32 = None
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
        if np.any(f32):  # (in column mode, the float32 path or the float64 one: one tile set)
            kmh, kk32, kc1_32, ke32 = (L.const(v, np.float32) for v in (mh, k, c1_32, e))
    if not (f32 is not None and np.all(f32)):
        if mean_lo is not None:
            c0 = c0 + c1 * mean_lo
        kk, kc1, kc0, km = (L.const(v) for v in (k, c1, c0, mean))
    whole_rows = L.tiled

    def work(blk: _Block, bufs: tuple[np.ndarray, ...]) -> None:
        idx = blk.idx
        dst = vdx[idx]
        if f32 is not None and L.takes(f32, blk):
            t = _scratch32(bufs[0], blk.shape)
            u = dst if whole_rows else _scratch32(bufs[1], blk.shape)
            np.subtract(vx[idx], L.at(kmh, blk), out=t)  # exact when x is within 2x of mean_hi
            np.multiply(t, L.at(kc1_32, blk), out=t)
            np.add(t, L.at(ke32, blk), out=t)
            np.multiply(vdy[idx], L.at(kk32, blk), out=u)
            np.add(u, t, out=dst)
            return
        t = _load_minus(bufs[0], vx[idx], L.at(km, blk))
        np.multiply(t, L.at(kc1, blk), out=t)
        if dst.dtype == np.float64:
            u = dst
            np.multiply(vdy[idx], L.at(kk, blk), out=u)
        else:
            u = _load(bufs[1], vdy[idx])
            np.multiply(u, L.at(kk, blk), out=u)
        np.add(u, t, out=u)
        np.subtract(u, L.at(kc0, blk), out=u)
        _store(dst, u)

    L.run(work, bufs=2, sums=False)
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
    exact = x.dtype == np.float64  # float32/float16 sums are rounded to their dtype
    dx, vdx = L.empty_like_x(x.dtype)
    sdy, sdx = np.empty(L.part_shape), np.empty(L.part_shape)
    k = scale * inv_std
    vdy, vx, km = L.view(dy), L.x, L.const(mean)
    # float32: dx = float32(k) * dy in float32, two roundings (|error| <= eps32 * |k * dy|).
    with np.errstate(all="ignore"):
        f32 = x.dtype == np.float32 and bool(np.all(_f32_safe(k)))
    kk = L.const(k, np.float32 if f32 else np.float64)

    def work(blk: _Block, bufs: tuple[np.ndarray, ...]) -> None:
        idx = blk.idx
        dst = vdx[idx]
        if f32:
            np.multiply(vdy[idx], L.at(kk, blk), out=dst)
        g = _as_float64(bufs[1], vdy[idx], contiguous_ok=not L.row_mode)
        if not f32:
            u = dst if dst.dtype == np.float64 else _scratch(bufs[0], blk.shape)
            np.multiply(g, L.at(kk, blk), out=u)
            _store(dst, u)
        d = _load_minus(bufs[0], vx[idx], L.at(km, blk))
        L.put(sdy, blk, L.block_sum(g))
        L.put(sdx, blk, L.block_dot(g, d, pairwise=exact))

    L.run(work, bufs=2)
    dbias = L.channel_totals(sdy)
    dscale = L.channel_totals(sdx) * inv_std
    return dx, dbias, dscale


# -- fused training passes (row mode) -------------------------------------------------------------


def _whole_channels(x: np.ndarray, axis: int) -> _Layout | None:
    """A row-mode layout with one block per channel, or None (column mode, or too large).

    Then one pass can compute a channel's sums and its outputs from the same scratch: x (and
    dy) are read from memory once instead of twice.
    """
    n = x.size // x.shape[axis] if x.shape[axis] else 0
    if n == 0 or n > FUSE_MAX_BLOCKS * _config["block_elems"]:
        return None
    L = _Layout(x, axis, target=max(n, _block_target(x.size)))
    return L if L.row_mode else None


def train_forward(
    x: np.ndarray, axis: int, scale: np.ndarray, bias: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode forward: ``(y, mean, mean_lo, M2, inv_std)``, statistics as ``channel_stats``.

    In row mode with channels that fit in scratch, one pass per channel: shifted sums, then
    ``y = a*(x - K) + (bias - a*(mean - K))`` from the same float64 scratch (module doc).
    Otherwise ``channel_stats`` followed by ``normalize_affine``.
    """
    L = _whole_channels(x, axis)
    count = x.size // x.shape[axis]
    if L is None:
        mean, mean_lo, m2 = channel_stats(x, axis)
        inv_std = 1.0 / np.sqrt(m2 / count + eps)
        y = normalize_affine(x, axis, mean, inv_std, scale, bias, mean_lo=mean_lo)
        return y, mean, mean_lo, m2, inv_std
    y, vy = L.empty_like_x(x.dtype)
    shift = _sample_mean(L).tolist()
    out = np.empty((4, L.C))  # mean, mean_lo, M2, inv_std
    vx = L.x
    scale_l, bias_l = scale.tolist(), bias.tolist()

    def work(blk: _Block, bufs: tuple[np.ndarray, ...]) -> None:
        c = blk.vidx
        k = shift[c]
        d = _load_minus(bufs[0], vx[blk.idx], k)
        cn, m2 = _centred(*_sums_of(L, d, bufs[1]), count)
        if _too_far(cn, m2, count):  # as channel_stats: once more around the mean
            k = k + cn
            d = _load_minus(bufs[0], vx[blk.idx], k)
            cn, m2 = _centred(*_sums_of(L, d, bufs[1]), count)
        mean, mean_lo = _two_sum(k, cn)
        m2 = max(m2, 0.0)
        var_eps = m2 / count + eps
        inv_std = 1.0 / math.sqrt(var_eps) if var_eps != 0 else math.inf  # as NumPy: 1/0 = inf
        a = scale_l[c] * inv_std
        # y = a*(x - mu) + bias = a*d + (bias - a*(mu - K)), mu - K = cn (module doc)
        np.multiply(d, a, out=d)
        np.add(d, bias_l[c] - a * cn, out=d)
        _store(vy[blk.idx], d)
        out[:, c] = (mean, mean_lo, m2, inv_std)

    with np.errstate(all="ignore"):  # NaN / inf data: those channels are NaN
        L.run(work, bufs=2)
    return y, out[0], out[1], out[2], out[3]


def _sums_of(L: _Layout, d: np.ndarray, buf: np.ndarray) -> tuple[float, float]:
    """``(sum(d), sum(d*d))`` of a loaded row-mode block as ``_shifted_sums`` (``d`` kept)."""
    return float(L.block_sum(d)), float(L.block_dot(d, d, out=_scratch(buf, d.shape)))


def train_backward(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
    count: int,
    mean_lo: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode gradients ``(dx, dbias, dscale)``; dbias, dscale in float64.

    In row mode with channels that fit in scratch, one pass per channel over x and dy: the
    sums, then ``dx = k*dy + c1*(x - mean) - c0`` in float64 from the same scratch, rounded
    once (the float32 path of ``train_input_grad`` would read x and dy again, strided: slower
    here). Otherwise ``grad_sums`` followed by ``train_input_grad``.
    """
    L = _whole_channels(x, axis)
    if L is None or x.size == 0:
        dbias, dscale = grad_sums(dy, x, axis, mean, inv_std, mean_lo=mean_lo)
        dx = train_input_grad(dy, x, axis, mean, inv_std, scale, count, dbias, dscale, mean_lo)
        return dx, dbias, dscale
    exact = x.dtype == np.float64  # float32/float16 sums are rounded to their dtype
    dx, vdx = L.empty_like_x(x.dtype)
    vdy, vx = L.view(dy), L.x
    out = np.empty((2, L.C))  # dbias, dscale
    mean_l, inv_l, scale_l = mean.tolist(), inv_std.tolist(), scale.tolist()
    lo_l = [None] * L.C if mean_lo is None else mean_lo.tolist()

    def work(blk: _Block, bufs: tuple[np.ndarray, ...]) -> None:
        c = blk.vidx
        d = _load_minus(bufs[0], vx[blk.idx], mean_l[c])
        g = _load(bufs[1], vdy[blk.idx])
        dbias = float(L.block_sum(g))
        sxd = float(L.block_dot(g, d, pairwise=exact))  # as grad_sums
        if exact:  # the pairwise dot wrote the products over d: again (x is in cache now)
            d = _load_minus(bufs[0], vx[blk.idx], mean_l[c])
        inv = inv_l[c]
        dscale = _dscale(sxd, dbias, lo_l[c], inv)
        k = scale_l[c] * inv
        c1, c0 = _dx_line(k, inv, dscale, dbias, count)
        if lo_l[c] is not None:
            c0 = c0 + c1 * lo_l[c]
        out[0, c], out[1, c] = dbias, dscale
        np.multiply(d, c1, out=d)
        np.multiply(g, k, out=g)
        np.add(g, d, out=g)
        np.subtract(g, c0, out=g)
        _store(vdx[blk.idx], g)

    with np.errstate(all="ignore"):
        L.run(work, bufs=2)
    return dx, out[0], out[1]

