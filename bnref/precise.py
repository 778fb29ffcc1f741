"""Precise BatchNorm: aggregate per-batch statistics of a fixed model into population statistics.

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (arXiv 2105.07576), Sec. 3.2: run the model
in training mode over many mini-batches, record each BN input's per-batch mean and variance,
and aggregate them with equal weight per sample. Two estimators are in use:

``population`` (the paper, fvcore's ``_PopulationVarianceEstimator`` since 2021-05)
    The pooled statistics of every value seen: with batches B of sizes n_B,
    ``mean = sum(n_B * mu_B) / n`` and ``var = (sum(M2_B) + sum(n_B * (mu_B - mean)**2)) / n``
    — the paper's ``E[mu_B**2 + sigma_B**2] - E[mu_B]**2``. Biased; ``bessel=True`` multiplies
    by ``n / (n - 1)`` (the paper's appendix option; refused with ``mean_of_variances``).

``mean_of_variances`` (pycls, SuperGradients, mmpretrain, ``torch.optim.swa_utils.update_bn``)
    Equal weight per *batch*, whatever its size: ``mean = mean_B(mu_B)``,
    ``var = mean_B(unbiased sigma_B**2)``.

When they differ: with equal batch sizes the means agree and
``var_population - var_mov ≈ Var_B(mu_B) * (1 - 1/k) - var / (m - 1)`` (k batches of m values).
For i.i.d. values Var_B(mu_B) ≈ var/m and the two nearly coincide; for correlated values (the
pixels of one image, which BN layers see) Var_B(mu_B) >> var/m, and ``mean_of_variances``
*underestimates* the population variance by that between-batch term.

A ``PreciseBN`` always tracks the state of both estimators, so collected statistics can be
reported either way (``with_estimator``), saved (``state_dict``) and merged across shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnref.moments import Moments

ESTIMATORS = ("population", "mean_of_variances")


def _check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}"
        )
    return estimator


def _check_bessel(estimator: str, bessel: bool) -> bool:
    """``bessel`` as a bool; refused (not silently ignored) with ``mean_of_variances``."""
    if bessel and estimator != "population":
        raise ValueError(
            f"bessel=True with estimator {estimator!r}: Bessel's correction applies only to the "
            "population estimator (mean_of_variances already averages unbiased batch variances)"
        )
    return bool(bessel)


@dataclass(eq=False)
class PreciseBN:
    """Streaming Precise BatchNorm aggregator for one BN layer: ``update`` once per batch.

    Attributes:
        estimator: ``"population"`` or ``"mean_of_variances"`` — which one ``mean``/``var`` report.
        bessel: for ``population`` only, report ``n / (n - 1)`` times the pooled variance;
            ``bessel=True`` with ``mean_of_variances`` (which already averages unbiased batch
            variances) raises ``ValueError``, here and in ``with_estimator``/``from_state_dict``.
    """

    estimator: str = "population"
    bessel: bool = False
    _pooled: Moments | None = field(default=None, init=False, repr=False)
    _num_batches: int = field(default=0, init=False, repr=False)
    _batch_mean_avg: np.ndarray | None = field(default=None, init=False, repr=False)  # equal weight per batch
    _batch_var_avg: np.ndarray | None = field(default=None, init=False, repr=False)  # unbiased, per batch

    def __post_init__(self) -> None:
        _check_estimator(self.estimator)
        self.bessel = _check_bessel(self.estimator, self.bessel)

    # -- streaming ------------------------------------------------------------------------------

    def update(self, batch_moments: Moments) -> None:
        """Add one batch's statistics. Refuses non-finite values and batches of one value."""
        if not isinstance(batch_moments, Moments):
            raise TypeError(
                f"batch_moments must be bnref.Moments, got {type(batch_moments).__name__}"
            )
        k = self._num_batches
        if batch_moments.count < 2:
            raise ValueError(
                f"batch {k} has {batch_moments.count} value(s) per channel; a batch needs at least 2 "
                "for a variance (one sample into a BN after a fully connected layer normalizes to 0)"
            )
        bad = ~(np.isfinite(batch_moments.mean) & np.isfinite(batch_moments.m2))
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"batch {k} has non-finite statistics (channel {c}: mean={batch_moments.mean[c]}, "
                f"m2={batch_moments.m2[c]}); refusing it, one bad batch would poison the aggregate"
            )
        if self._pooled is not None and batch_moments.num_channels != self._pooled.num_channels:
            raise ValueError(
                f"batch {k} has {batch_moments.num_channels} channels, earlier batches had "
                f"{self._pooled.num_channels}"
            )
        unbiased = batch_moments.var(ddof=1)
        if self._pooled is None:
            self._pooled = batch_moments
            self._batch_mean_avg = batch_moments.mean.copy()
            self._batch_var_avg = unbiased
        else:
            self._pooled = self._pooled.merge(batch_moments)
            # Running equal-weight averages: avg += (value - avg) / k.
            self._batch_mean_avg = self._batch_mean_avg + (
                batch_moments.mean - self._batch_mean_avg
            ) / (k + 1)
            self._batch_var_avg = self._batch_var_avg + (unbiased - self._batch_var_avg) / (k + 1)
        self._num_batches = k + 1

    def update_from_array(self, x: np.ndarray, axis: int = 1) -> None:
        """``update(Moments.from_array(x, axis))``."""
        self.update(Moments.from_array(x, axis))

    def merge(self, other: PreciseBN) -> PreciseBN:
        """Aggregate of both (e.g. two shards); keeps this one's estimator and Bessel option."""
        if not isinstance(other, PreciseBN):
            raise TypeError(f"other must be PreciseBN, got {type(other).__name__}")
        if other._pooled is None:
            return self.with_estimator(self.estimator, self.bessel)
        if self._pooled is None:
            return other.with_estimator(self.estimator, self.bessel)
        ka, kb = self._num_batches, other._num_batches
        k = ka + kb
        out = PreciseBN(self.estimator, self.bessel)
        out._pooled = self._pooled.merge(other._pooled)
        out._num_batches = k
        # Symmetric weighted averages: merge order cannot change the bits.
        out._batch_mean_avg = self._batch_mean_avg * (ka / k) + other._batch_mean_avg * (kb / k)
        out._batch_var_avg = self._batch_var_avg * (ka / k) + other._batch_var_avg * (kb / k)
        return out

    def with_estimator(self, estimator: str, bessel: bool = False) -> PreciseBN:
        """The same collected state, reported with another estimator.

        Raises ``ValueError`` for ``bessel=True`` with ``mean_of_variances``.
        """
        out = PreciseBN(estimator, bessel)
        out._pooled, out._num_batches = self._pooled, self._num_batches
        out._batch_mean_avg, out._batch_var_avg = self._batch_mean_avg, self._batch_var_avg
        return out

    # -- results --------------------------------------------------------------------------------

    def _require_data(self) -> Moments:
        if self._pooled is None:
            raise ValueError("PreciseBN has no batches yet: call update() first")
        return self._pooled

    @property
    def count(self) -> int:
        """Number of values per channel seen (samples x spatial positions)."""
        return 0 if self._pooled is None else self._pooled.count

    @property
    def num_batches(self) -> int:
        """Number of batches seen."""
        return self._num_batches

    @property
    def moments(self) -> Moments:
        """Pooled moments of every value seen (the population estimator's state)."""
        return self._require_data()

    @property
    def mean(self) -> np.ndarray:
        """Aggregated per-channel mean (float64) for the chosen estimator."""
        pooled = self._require_data()
        return pooled.mean if self.estimator == "population" else self._batch_mean_avg

    @property
    def var(self) -> np.ndarray:
        """Aggregated per-channel variance (float64) for the chosen estimator."""
        pooled = self._require_data()
        if self.estimator == "population":
            return pooled.var(ddof=1 if self.bessel else 0)
        return self._batch_var_avg

    # -- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays that reproduce this aggregator exactly (both estimators' state)."""
        pooled = self._require_data()
        return {
            "count": np.asarray(pooled.count, dtype=np.int64),
            "num_batches": np.asarray(self._num_batches, dtype=np.int64),
            "mean": pooled.mean,
            "m2": pooled.m2,
            "batch_mean_avg": self._batch_mean_avg,
            "batch_var_avg": self._batch_var_avg,
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, np.ndarray], estimator: str = "population", bessel: bool = False
    ) -> PreciseBN:
        """Rebuild an aggregator saved with ``state_dict``.

        Raises ``ValueError`` for missing arrays and for ``bessel=True`` with
        ``mean_of_variances`` (checked before the state is read).
        """
        out = cls(estimator, bessel)  # validates the arguments first
        missing = {"count", "num_batches", "mean", "m2", "batch_mean_avg", "batch_var_avg"} - set(
            state
        )
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        out._pooled = Moments(int(state["count"]), state["mean"], state["m2"])
        out._num_batches = int(state["num_batches"])
        out._batch_mean_avg = np.asarray(state["batch_mean_avg"], dtype=np.float64)
        out._batch_var_avg = np.asarray(state["batch_var_avg"], dtype=np.float64)
        return out


def blend_prior(
    old_mean: np.ndarray,
    old_var: np.ndarray,
    new_mean: np.ndarray,
    new_var: np.ndarray,
    n: int,
    prior_strength: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend stored (source) statistics with new ones, as Schneider et al. (NeurIPS 2020) do.

    ``mean = N0/(N0+n) * old_mean + n/(N0+n) * new_mean``, the same for the variance, where
    ``N0 = prior_strength`` and ``n`` the number of new samples. ``N0 = 0`` keeps only the new
    statistics; large ``N0`` trusts the old ones. Used for test-time adaptation with few samples.
    """
    n0 = float(prior_strength)
    if not np.isfinite(n0) or n0 < 0:
        raise ValueError(f"prior_strength must be finite and >= 0, got {prior_strength}")
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    w_old = n0 / (n0 + n)
    w_new = n / (n0 + n)
    mean = w_old * np.asarray(old_mean, np.float64) + w_new * np.asarray(new_mean, np.float64)
    var = w_old * np.asarray(old_var, np.float64) + w_new * np.asarray(new_var, np.float64)
    return mean, var
