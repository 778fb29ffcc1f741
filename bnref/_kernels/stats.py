"""Per-channel statistics by shifted sums, and the error bound they achieve.

Notation: v = 2**-53 (eps64 = 2v), n values per channel, mu the exact mean,
sigma**2 = M2 / n, s = |K - mu| / sigma.

Statistics (``channel_stats``), always in float64, by shifted sums: a per-channel shift K
(the mean of a small sample spread over the data, ``sample_mean``), then one pass::

    c = sum(x - K);  q = sum((x - K)**2);  mean = K + c/n;  M2 = q - c * (c/n)

with ``mean_lo`` = the rounding error of ``K + c/n`` (TwoSum), so ``mean + mean_lo`` is
``K + c/n`` exactly. Every sum is a tree: NumPy's pairwise summation along contiguous
memory, at most ``GROUP_ROWS`` rows added one after another down columns, and partial sums
of blocks and units added pairwise (``bnref/_kernels/sums.py``); its depth L (additions on the
longest path) is at most log2(n) + 90. The standard summation bounds give (first order in v)::

    |M2_hat - M2| <= v * M2 * ((L + 3) * (1 + s**2 + 2 * s * sqrt(1 + s**2)) + 2 * s**2 + 1)
    |mean_hat + mean_lo - mu| <= (L + 2) * v * sigma * sqrt(1 + s**2)

Nothing is of the size of |mean|, so |mean| >> std costs nothing. s is checked after the
fact from the computed sums: a channel with s > ``SHIFT_MAX_STD`` = 2 is summed once more
around ``K + c/n``, after which s is O(L v sqrt(1 + s_first**2)) (and s_first <= sqrt(n): a
sample mean lies within the data). So M2 is within 14 (L + 4) v of the exact value, below
2e-13 relative for n < 2**40, and mean + mean_lo within 2.3 (L + 2) v sigma;
the tests check 1e-12 (mean: relative to ``|mean| + std``) up to N*H*W = 1e8 values per
channel with mean 1e4, std 1, and with the second pass forced (``bnref.runtime.tuning(
sampled_shift=False)``: K = 0, so every channel with |mean| > 2 std is summed again; the bound
then needs s_first = |mean| / std well below 1 / (L v), ~1e13).

NaN anywhere in a channel propagates to that channel's statistics.
"""

from __future__ import annotations

import numpy as np

from bnref._kernels.blocks import Block
from bnref._kernels.config import SHIFT_MAX_STD, settings
from bnref._kernels.layout import Layout
from bnref._kernels.memory import load_minus


def channel_stats(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, mean_lo, M2)`` per channel, float64; ``mean + mean_lo`` is the mean to ~eps64 * std.

    One pass of shifted sums ``c = sum(x - K)``, ``q = sum((x - K)**2)`` with a per-channel
    shift K near the mean (from a sample), then ``mean = K + c/n``, ``M2 = q - c**2/n``.
    A channel whose shift turns out farther than ``SHIFT_MAX_STD`` standard deviations from
    its mean is summed once more with K = that mean (module doc: why this bounds the error).
    """
    L = Layout(x, axis)
    n = L.A * L.B
    shift = sample_mean(L)
    with np.errstate(all="ignore"):  # NaN / inf data: those channels are NaN
        cn, m2 = centred(*shifted_sums(L, shift), n)
        far = too_far(cn, m2, n)
        if np.any(far):
            shift = np.where(far, shift + cn, shift)
            cn, m2 = centred(*shifted_sums(L, shift), n)
        mean, mean_lo = two_sum(shift, cn)
    return mean, mean_lo, np.maximum(m2, 0.0)


# The arithmetic after the sums, shared by channel_stats (per-channel arrays) and the fused
# training forward (one channel's Python floats, bnref/_kernels/forward.py): the same
# operations, the same roundings.


def centred(c, q, n: int):
    """``(c/n, M2)`` from the shifted sums ``c = sum(x - K)``, ``q = sum((x - K)**2)``."""
    cn = c / n
    return cn, q - c * cn


def too_far(cn, m2, n: int):
    """Whether the shift is farther than ``SHIFT_MAX_STD`` std from the mean (False for NaN)."""
    return n * cn * cn > SHIFT_MAX_STD**2 * m2


def two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly (Knuth's TwoSum)."""
    s = a + b
    back = s - a
    return s, (a - (s - back)) + (b - back)


def sample_mean(L: Layout) -> np.ndarray:
    """Per-channel mean of a small sample spread over the data (a shift for ``shifted_sums``).

    Row mode: up to 4 runs x 8 values per channel; column mode: up to 8 rows. Any value
    works (accuracy is checked after the fact); a near one saves the second pass. With
    ``tuning(sampled_shift=False)``: 0 for every channel.
    """
    if not settings["sampled_shift"]:
        return np.zeros(L.C)
    vx = L.x
    if L.row_mode:
        sub = vx[:: max(1, L.A // 4), :, :: max(1, L.B // 8)]
        return np.add.reduce(sub.astype(np.float64), axis=(0, 2)) / (sub.shape[0] * sub.shape[2])
    sub = vx[:: max(1, L.A // 8)].astype(np.float64)
    sums = np.add.reduce(sub, axis=0)
    if L.B > 1:
        sums = np.add.reduce(sums.reshape(L.C, L.B), axis=1)
    return sums / (sub.shape[0] * L.B)


def shifted_sums(L: Layout, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel ``(sum(x - shift), sum((x - shift)**2))`` in float64, blocked and pairwise."""
    cp, qp = np.empty(L.part_shape), np.empty(L.part_shape)
    vx, k = L.x, L.const(shift)

    def work(blk: Block, bufs: tuple[np.ndarray, ...]) -> None:
        d = load_minus(bufs[0], vx[blk.idx], L.at(k, blk))
        L.put(cp, blk, L.block_sum(d))
        L.put(qp, blk, L.block_dot(d, d))

    L.run(work, bufs=1)
    return L.channel_totals(cp), L.channel_totals(qp)
