"""Column sums of loaded blocks, as trees of bounded depth (the statistics' error bound needs it).

NumPy sums a contiguous run pairwise, but sums down the columns of a (rows, w) block one row
after another. To bound that chain at ``GROUP_ROWS`` terms, taller blocks are summed in groups
of ``GROUP_ROWS`` rows and the group sums added pairwise (``fold_rows``), as are the partial
sums of blocks and units (``bnref/_kernels/layout.py``, ``Layout.channel_totals``).
"""

from __future__ import annotations

import numpy as np

from bnref._kernels.config import GROUP_ROWS


def column_sums(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Column sums of ``a`` (``b`` None) or of ``a * b``, for (rows, w) float64 blocks.

    At most ``GROUP_ROWS`` rows are added one after another; the group sums are added
    pairwise (``fold_rows``).
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
    return fold_rows(parts)


def fold_rows(p: np.ndarray) -> np.ndarray:
    """Sum the rows of ``p`` pairwise (in place; ``p`` is overwritten) and return the sum."""
    m = p.shape[0]
    while m > 1:
        h = m // 2
        np.add(p[:h], p[m - h : m], out=p[:h])
        m -= h
    return p[0]
