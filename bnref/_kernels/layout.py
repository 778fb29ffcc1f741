"""Layout planning: any input viewed, without copying, as blocks that threads stream through.

Any input is viewed in its memory order: the axes are permuted so the array is C-contiguous
(NCHW stays NCHW; a channels-last array or a transposed view becomes (..., C)), and the view
is reshaped to ``(A, C, B)`` (A: everything before the channel axis, B: everything after
it). Arrays that are not a permutation of a contiguous array are copied once. The structure
below depends only on shape, strides, axis and block size and is cached (``plan``).

* Row mode (``B >= 64`` and at least half a block per channel: NCHW, 5-D): a block is
  ``x3[a0:a1, c, b0:b1]``, one channel, so every per-channel constant is a scalar (NumPy's
  fastest loops) and the block sums to one number. (Smaller channels go to column mode: one
  block per channel would be small, and per-block overhead would dominate.)
* Tiled column mode (NHWC, (N, C), short B): the data is an ``(A, W = C*B)`` matrix and a
  block is a run of whole rows (contiguous). Per-channel constants are repeated into a tile
  of the block's shape, because NumPy's loops run ~1.6-2.6x faster on two operands of one
  shape than on a vector broadcast down a block; tiles live in a per-caller arena
  (``bnref/_kernels/memory.py``). Consecutive blocks up to ``UNIT_ROWS`` rows form a unit of
  work that shares one row of partial sums.
* General column mode (rows too wide for ``TILE_MIN_ROWS`` rows in a block): blocks of
  ``GROUP_ROWS`` rows and part of the columns, constants broadcast.

Blocks hold 1/16 of the input, at least ``block_elems`` values (64 Ki: 512 KiB of float64)
and at most ``max_block_elems`` (256 Ki: fewer, longer NumPy calls stream large inputs
faster; the measurements behind both, and why they do not follow the cache sizes, are in
``bnref/_kernels/config.py``), and units of work are handed to a small thread pool
(``bnref/_kernels/pool.py``; ``bnref.runtime.num_threads()``, default ``min(2, CPUs)``, env
``BNREF_NUM_THREADS``). Inputs under ``PARALLEL_MIN_ELEMS`` (256 Ki values) stay on the
calling thread. Partial sums are stored by unit and combined in a fixed order, so results
are bitwise independent of the thread count and of scheduling. Extra memory: the output, two
block-sized scratch arrays per thread and the constants' arena (both kept between calls:
``bnref.runtime.kept_nbytes()``), O(C * units) partial sums.

Training forward and backward in row mode, when a channel holds at most
``FUSE_MAX_BLOCKS * block_elems`` values (NCDHW (8, 64, 16, 32, 32): 128 Ki), take one pass per
channel (``whole_channels``): the channel is loaded into scratch once, its sums computed,
then its outputs from the same scratch, so x and dy are read from memory once instead of
twice. Otherwise statistics and outputs are two passes. (NCHW (64, 256, 28, 28) is not in row
mode at the default sizes: its 49 Ki-value channels are under half of its 256 Ki blocks.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from bnref._kernels.blocks import Block, make_blocks
from bnref._kernels.config import FUSE_MAX_BLOCKS, ROW_MODE_MIN_RUN, block_target, settings
from bnref._kernels.memory import Arena, thread_scratch
from bnref._kernels.pool import run_units
from bnref._kernels.sums import column_sums, fold_rows


class Layout:
    """Canonical blocked view of arrays shaped and laid out like ``x``.

    The structure (axis order, blocks, units of work) depends only on x's shape, strides and
    channel axis and on the block size, and is cached (``plan``); a call only makes views.
    """

    def __init__(self, x: np.ndarray, axis: int, target: int | None = None) -> None:
        target = block_target(x.size) if target is None else target
        structure = plan(x.shape, x.strides, x.itemsize, axis, target)
        self.__dict__.update(structure.__dict__)
        if self.copy:  # sliced / negative strides: one copy
            x = np.ascontiguousarray(x)
        self.x = self.view(x)
        self._consts = 0

    def _build(self, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, axis: int,
               target: int) -> None:
        perm = memory_order(shape, strides)
        tshape = tuple(shape[i] for i in perm)
        self.copy = not is_c_contiguous(tshape, tuple(strides[i] for i in perm), itemsize)
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
        self.__dict__.update(make_blocks(self.A, self.C, self.B, self.row_mode, target)._asdict())

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
        constants live in the calling thread's arena (``Arena``) until the call returns.
        """
        v = np.asarray(v, dtype=np.float64).astype(dtype, copy=False)
        if self.row_mode:
            return v
        w = np.repeat(v, self.B) if self.B > 1 else v
        rows = self.rows if self.tiled else 1
        out = Arena.mine().take(rows * w.size, dtype, first=not self._consts)
        self._consts += 1
        if not self.tiled:
            out[...] = w
            return out
        tile = out.reshape(rows, w.size)
        tile[...] = w
        return tile

    def at(self, v: np.ndarray, blk: Block) -> np.ndarray:
        """Block ``blk``'s operand of a constant made by ``const``: scalar, tile rows or slice."""
        if self.tiled:
            return v[: blk.shape[0]]
        return v[blk.vidx]

    def channel_mask(self, ok: np.ndarray) -> np.ndarray:
        """Per-channel flags indexable like ``const`` in row mode; one all-channel flag otherwise."""
        ok = np.asarray(ok, dtype=bool)
        return ok if self.row_mode else np.array([ok.all()])

    def takes(self, mask: np.ndarray, blk: Block) -> bool:
        """Whether block ``blk`` is covered by ``mask`` (from ``channel_mask``)."""
        return bool(mask[blk.vidx if self.row_mode else 0])

    # Sums ---------------------------------------------------------------------------------------

    @staticmethod
    def put(part: np.ndarray, blk: Block, value: np.ndarray | float) -> None:
        """Record block ``blk``'s partial sum: stored by the first block of a unit, then added."""
        if blk.first:
            part[blk.pidx] = value
        else:
            part[blk.pidx] += value

    def block_sum(self, d: np.ndarray) -> np.ndarray | float:
        """Sum of a loaded (contiguous, float64) block: a number (row mode) or column sums."""
        if self.row_mode:
            return np.add.reduce(d, axis=None)  # pairwise: contiguous
        return column_sums(d, None)

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
        return column_sums(a, b)

    def channel_totals(self, part: np.ndarray) -> np.ndarray:
        """Per-channel totals of partial sums (``part_shape``), summed pairwise."""
        if self.row_mode:
            return np.add.reduce(part, axis=1)  # contiguous rows: pairwise
        cols = fold_rows(part)
        return np.add.reduce(cols.reshape(self.C, self.B), axis=1) if self.B > 1 else cols

    # Execution ----------------------------------------------------------------------------------

    def run(
        self, work: Callable[[Block, tuple[np.ndarray, ...]], None], bufs: int, sums: bool = True
    ) -> None:
        """Call ``work(block, scratch)`` for every block, on up to ``num_threads`` threads.

        With ``sums`` (work that records partial sums), a unit's blocks run one after another
        on one thread; without, every block is a unit of its own (finer load balance).
        ``scratch`` holds ``bufs`` per-thread float64 arrays of ``max_block`` values (kept
        between calls up to the default block size, see ``thread_scratch``). Inputs smaller
        than ``PARALLEL_MIN_ELEMS`` run on the calling thread: a hand-off costs more than it
        saves there.
        """
        units = self.units if sums else self.single_units
        threads = min(settings["threads"], len(units))
        if self.A * self.C * self.B < settings["parallel_min"]:
            threads = 1
        size = self.max_block
        run_units(units, work, threads, lambda: thread_scratch(size, bufs))


def memory_order(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """Axis permutation listing the axes from largest to smallest stride (size-1 axes last)."""
    return tuple(sorted(range(len(shape)), key=lambda i: (-abs(strides[i]) if shape[i] > 1 else 1, i)))


def is_c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
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
def plan(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, axis: int, target: int) -> Layout:
    """The structure of a ``Layout`` for this shape, strides, axis and block size (cached)."""
    structure = Layout.__new__(Layout)
    structure._build(shape, strides, itemsize, axis, target)
    return structure


def whole_channels(x: np.ndarray, axis: int) -> Layout | None:
    """A row-mode layout with one block per channel, or None (column mode, or too large).

    Then one pass can compute a channel's sums and its outputs from the same scratch: x (and
    dy) are read from memory once instead of twice (``train_forward``, ``train_backward``).
    """
    n = x.size // x.shape[axis] if x.shape[axis] else 0
    if n == 0 or n > FUSE_MAX_BLOCKS * settings["block_elems"]:
        return None
    L = Layout(x, axis, target=max(n, block_target(x.size)))
    return L if L.row_mode else None
