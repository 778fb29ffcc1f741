"""Block structure: how the canonical view of x is cut into blocks and units of work.

Row mode: a block is ``x3[a0:a1, c, b0:b1]``, one channel, so every per-channel constant is a
scalar (NumPy's fastest loops) and the block sums to one number. Column mode: a block is
``x2[r0:r1, w0:w1]``, summed down its columns. "Tiled" column mode: blocks of whole rows
(contiguous), at least ``min(A, TILE_MIN_ROWS)`` of them, whose per-channel constants are
tiles of the block's shape; consecutive blocks up to ``UNIT_ROWS`` rows form one unit of
work that shares one row of partial sums (fewer partial sums to store and add up).
Otherwise (very wide rows) blocks of ``GROUP_ROWS`` rows and part of the columns.

A unit of work (a list of blocks) runs on one thread, in order (``bnref/_kernels/pool.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from bnref._kernels.config import GROUP_ROWS, TILE_MIN_ROWS, UNIT_ROWS


class Block(NamedTuple):
    """One block of the canonical view: what a worker thread processes in one go."""

    idx: tuple  # index into the canonical view of x (and of dy, y, dx)
    vidx: object  # row mode: the channel; general column mode: the column slice
    pidx: tuple  # where its partial sums go in the partial arrays (part_shape)
    shape: tuple[int, int]  # shape of the block's data, as loaded into scratch
    first: bool = True  # the first block of its unit: stores its partial sums (else adds them)


class Blocks(NamedTuple):
    """The blocks of a layout, its units of work and the shape of its partial-sum arrays."""

    blocks: list[Block]
    units: list[list[Block]]  # blocks that share partial sums, run in order on one thread
    single_units: list[list[Block]]  # every block a unit of its own (no sums: finer balance)
    part_shape: tuple[int, int]
    tiled: bool
    rows: int | None  # column mode: rows per block (tiles have this many rows)
    max_block: int  # values in the largest block (scratch size)


def make_blocks(A: int, C: int, B: int, row_mode: bool, target: int) -> Blocks:
    """The blocks of an ``(A, C, B)`` (row mode) or ``(A, C*B)`` view, ~``target`` values each."""
    if row_mode:
        blocks, part_shape = _row_blocks(A, C, B, target)
        units, tiled, rows = None, False, None
    else:
        W = C * B
        rows_fit = target // W
        tiled = rows_fit >= min(A, TILE_MIN_ROWS)
        if tiled:
            rows = min(A, rows_fit)
            units = _tiled_units(A, W, rows)
            blocks = [b for unit in units for b in unit]
            part_shape = (len(units), W)
        else:
            rows = min(A, GROUP_ROWS)
            units = None
            blocks, part_shape = _general_blocks(A, W, rows, target)
    single_units = [[b] for b in blocks]
    max_block = max(r * c for r, c in (b.shape for b in blocks))
    return Blocks(blocks, units or single_units, single_units, part_shape, tiled, rows, max_block)


def _row_blocks(A: int, C: int, B: int, target: int) -> tuple[list[Block], tuple[int, int]]:
    """Row mode: runs cut in pieces of at most ``target``, or several whole runs per block."""
    nb = max(1, -(-B // target))  # pieces per run
    bl = -(-B // nb)
    ra = max(1, min(A, target // bl)) if nb == 1 else 1  # runs per block
    bb = [(j * bl, min(B, (j + 1) * bl)) for j in range(nb)]
    ab = [(i * ra, min(A, (i + 1) * ra)) for i in range(-(-A // ra))]
    blocks = []
    for c in range(C):
        k = 0
        for a0, a1 in ab:
            for b0, b1 in bb:
                idx = (slice(a0, a1), c, slice(b0, b1))
                blocks.append(Block(idx, c, (c, k), (a1 - a0, b1 - b0)))
                k += 1
    return blocks, (C, len(ab) * len(bb))


def _tiled_units(A: int, W: int, rb: int) -> list[list[Block]]:
    """Tiled column mode: blocks of ``rb`` whole rows, grouped in units of about ``UNIT_ROWS``."""
    gr = rb * max(1, -(-UNIT_ROWS // rb))  # rows per unit
    ws = slice(0, W)
    units = []
    for i in range(-(-A // gr)):
        unit = []
        for r0 in range(i * gr, min(A, (i + 1) * gr), rb):
            r1 = min(A, r0 + rb, (i + 1) * gr)
            unit.append(Block((slice(r0, r1), ws), ws, (i, ws), (r1 - r0, W), not unit))
        units.append(unit)
    return units


def _general_blocks(A: int, W: int, rb: int, target: int) -> tuple[list[Block], tuple[int, int]]:
    """General column mode: blocks of ``rb`` rows and part of the ``W`` columns."""
    wb = min(W, max(1, target // rb))
    nab = -(-A // rb)
    blocks = []
    for i in range(nab):
        r0, r1 = i * rb, min(A, (i + 1) * rb)
        for w0 in range(0, W, wb):
            ws = slice(w0, min(W, w0 + wb))
            blocks.append(Block((slice(r0, r1), ws), ws, (i, ws), (r1 - r0, ws.stop - w0)))
    return blocks, (nab, W)
