"""Per-channel moments: count, mean and M2 (sum of squared deviations), exactly mergeable.

``Moments`` is the currency of bnref: a batch's statistics (``Moments.from_array``), statistics
reported by someone else (``Moments.from_mean_var``), and the pooled statistics of many batches
(``a.merge(b)``) are all the same type.

Numerics (float64 throughout):

* ``from_array`` uses the corrected formula of Chan, Golub & LeVeque (1983, eq. 1.7) on data
  shifted by K, a per-channel value near the mean (the mean of a small sample)::

      d    = x - K
      mean = K + sum(d) / n
      M2   = sum(d**2) - sum(d)**2 / n

  Its error grows with ((K - mean) / std)**2 only, never with |mean|: a channel whose K turns
  out more than 2 std from its mean is summed again around its mean (K = the exact mean is
  the classic corrected two-pass). There is no ``E[x**2] - E[x]**2`` anywhere, so
  |mean| >> std loses nothing; M2 is within ~2e-13 relative (``bnref/_kernels/stats.py``).
* ``merge`` is the pairwise update of Chan et al. (1979), written in a symmetric form so that
  ``a.merge(b)`` and ``b.merge(a)`` are bitwise equal::

      n     = n_a + n_b
      mean  = mean_a * (n_a / n) + mean_b * (n_b / n)
      M2    = M2_a + M2_b + (mean_b - mean_a)**2 * n_a * n_b / n
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from bnref._kernels import channel_stats
from bnref._validation import check_array, check_nonneg_variance, normalize_axis, values_per_channel


@dataclass(frozen=True, eq=False)
class Moments:
    """Per-channel count, mean and M2 = sum((x - mean)**2), all float64 except the count.

    ``count`` is the number of values per channel (for NCHW input: N*H*W). The arrays are
    read-only, so a ``Moments`` can be shared freely.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float64, copy=True).reshape(-1)
        m2 = np.array(self.m2, dtype=np.float64, copy=True).reshape(-1)
        if mean.shape != m2.shape:
            raise ValueError(
                f"mean and m2 must have the same shape, got {mean.shape} and {m2.shape}"
            )
        count = int(self.count)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        mean.setflags(write=False)
        m2.setflags(write=False)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def empty(cls, num_channels: int) -> Moments:
        """Moments of no data: the identity of ``merge``."""
        return cls(0, np.zeros(num_channels), np.zeros(num_channels))

    @classmethod
    def from_array(cls, x: np.ndarray, axis: int = 1) -> Moments:
        """Moments over every axis of ``x`` but the channel ``axis`` (shifted sums, float64)."""
        x = check_array(x)
        axis = normalize_axis(axis, x.ndim)
        count = values_per_channel(x, axis)
        mean, _, m2 = channel_stats(x, axis)
        return cls(count, mean, m2)

    @classmethod
    def from_mean_var(cls, mean: np.ndarray, var: np.ndarray, count: int, ddof: int = 0) -> Moments:
        """Moments from per-channel mean and variance computed elsewhere.

        ``var`` is ``M2 / (count - ddof)``: ``ddof=0`` for a biased (population) variance,
        ``ddof=1`` for an unbiased one.
        """
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        var = np.asarray(var, dtype=np.float64).reshape(-1)
        if mean.shape != var.shape:
            raise ValueError(
                f"mean and var must have the same shape, got {mean.shape} and {var.shape}"
            )
        count = int(count)
        if count <= ddof:
            raise ValueError(f"count must be > ddof={ddof}, got count={count}")
        check_nonneg_variance(var)
        return cls(count, mean, var * (count - ddof))

    @classmethod
    def merge_all(cls, parts: Iterable[Moments]) -> Moments:
        """Merge many Moments by pairwise tree reduction (error grows with log of the count)."""
        items = list(parts)
        if not items:
            raise ValueError("merge_all needs at least one Moments")
        while len(items) > 1:
            nxt = [items[i].merge(items[i + 1]) for i in range(0, len(items) - 1, 2)]
            if len(items) % 2:
                nxt.append(items[-1])
            items = nxt
        return items[0]

    # -- queries ------------------------------------------------------------------------------

    @property
    def num_channels(self) -> int:
        """Number of channels C."""
        return self.mean.shape[0]

    def var(self, ddof: int = 0) -> np.ndarray:
        """Per-channel variance ``M2 / (count - ddof)``: ddof=0 biased, ddof=1 unbiased."""
        if self.count - ddof <= 0:
            raise ValueError(
                f"variance with ddof={ddof} needs count > {ddof}, but count={self.count}"
                + (" (one value per channel has no unbiased variance)" if self.count == 1 else "")
            )
        return self.m2 / (self.count - ddof)

    def std(self, ddof: int = 0) -> np.ndarray:
        """Per-channel standard deviation, ``sqrt(var(ddof))``."""
        return np.sqrt(self.var(ddof))

    # -- combination --------------------------------------------------------------------------

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of both data sets (Chan et al.), exact and order independent."""
        if not isinstance(other, Moments):
            raise TypeError(f"other must be Moments, got {type(other).__name__}")
        if other.num_channels != self.num_channels:
            raise ValueError(
                f"cannot merge Moments with {self.num_channels} and {other.num_channels} channels"
            )
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        # Symmetric in (a, b): every operation is commutative, so merge order cannot change bits.
        mean = self.mean * (n_a / n) + other.mean * (n_b / n)
        delta = other.mean - self.mean
        m2 = (self.m2 + other.m2) + delta * delta * (n_a * n_b / n)
        return Moments(n, mean, m2)

    def __repr__(self) -> str:
        return f"Moments(count={self.count}, channels={self.num_channels})"
