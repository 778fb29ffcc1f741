"""Other choices of "batch" (Wu & Johnson 2021, Secs. 4-5): ghost BN and per-domain BN.

Ghost (virtual) BatchNorm — tf.keras 2's ``virtual_batch_size`` (Hoffer et al. 2017): split the
batch along axis 0 into consecutive sub-batches of ``virtual_batch_size`` samples and normalize
each with its own statistics. Defining property: the result equals running
``batch_norm_train`` on each piece separately and concatenating.

Per-domain BatchNorm (paper Sec. 5.2): samples from different domains in one batch are
normalized with their own domain's statistics, with a shared affine transform; at inference
each domain keeps its own population statistics (``DomainPreciseBN``: one ``PreciseBN`` per
domain).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from bnref._validation import check_array, normalize_axis
from bnref.backward import batch_norm_train_backward
from bnref.forward import BatchNormCache, batch_norm_train
from bnref.moments import Moments
from bnref.precise import PreciseBN


@dataclass(frozen=True, eq=False)
class GroupedCache:
    """Caches of a batch normalized in groups of samples (ghost batches or domains)."""

    groups: tuple[np.ndarray, ...]  # sample indices (along axis 0) of each group
    caches: tuple[BatchNormCache, ...]
    keys: tuple[Hashable, ...]  # ghost index, or domain label
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def moments(self) -> dict[Hashable, Moments]:
        """Each group's batch statistics, by key."""
        return {k: c.moments for k, c in zip(self.keys, self.caches, strict=True)}


def _grouped_forward(x, groups, keys, scale, bias, eps, axis):
    x = check_array(x)
    axis = normalize_axis(axis, x.ndim)
    if axis == 0:
        raise ValueError("axis must not be 0 (the batch axis) for grouped BatchNorm")
    y = np.empty_like(x)
    caches = []
    for idx in groups:
        y_g, c = batch_norm_train(x[idx], scale, bias, eps=eps, axis=axis)
        y[idx] = y_g
        caches.append(c)
    return y, GroupedCache(tuple(groups), tuple(caches), tuple(keys), x.shape, x.dtype)


def ghost_batch_norm_train(
    x: np.ndarray,
    scale: np.ndarray | None,
    bias: np.ndarray | None,
    virtual_batch_size: int,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, GroupedCache]:
    """Ghost BatchNorm: normalize each run of ``virtual_batch_size`` samples on its own.

    The batch size must be a multiple of ``virtual_batch_size`` (as tf.keras 2 required).
    """
    x = check_array(x)
    vbs = int(virtual_batch_size)
    if vbs < 1 or x.shape[0] % vbs:
        raise ValueError(
            f"virtual_batch_size must be >= 1 and divide the batch size {x.shape[0]}, got {virtual_batch_size}"
        )
    groups = [np.arange(i, i + vbs) for i in range(0, x.shape[0], vbs)]
    return _grouped_forward(x, groups, range(len(groups)), scale, bias, eps, axis)


def domain_batch_norm_train(
    x: np.ndarray,
    domains: np.ndarray,
    scale: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, GroupedCache]:
    """Per-domain BatchNorm: samples with equal ``domains[i]`` share statistics; affine shared."""
    x = check_array(x)
    domains = np.asarray(domains)
    if domains.shape != (x.shape[0],):
        raise ValueError(
            f"domains must have shape ({x.shape[0]},) (one label per sample), got {domains.shape}"
        )
    keys = list(dict.fromkeys(domains.tolist()))  # first-seen order
    groups = [np.flatnonzero(domains == k) for k in keys]
    return _grouped_forward(x, groups, keys, scale, bias, eps, axis)


def grouped_batch_norm_backward(
    dy: np.ndarray, cache: GroupedCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of ghost or per-domain BN: per-group backward, summed parameter gradients."""
    dy = np.asarray(dy)
    if dy.shape != cache.shape:
        raise ValueError(f"dy must have shape {cache.shape}, got {dy.shape}")
    dx = np.empty(cache.shape, dtype=cache.dtype)
    dscale = dbias = 0.0
    for idx, c in zip(cache.groups, cache.caches, strict=True):
        dx_g, ds, db = batch_norm_train_backward(dy[idx], c)
        dx[idx] = dx_g
        dscale = dscale + ds.astype(np.float64)
        dbias = dbias + db.astype(np.float64)
    return dx, np.asarray(dscale).astype(cache.dtype), np.asarray(dbias).astype(cache.dtype)


class DomainPreciseBN:
    """One ``PreciseBN`` per domain (paper Sec. 5.2: domain-specific population statistics)."""

    def __init__(self, estimator: str = "population", bessel: bool = False) -> None:
        PreciseBN(estimator, bessel)  # validates the arguments
        self.estimator = estimator
        self.bessel = bessel
        self.domains: dict[Hashable, PreciseBN] = {}

    def update(self, domain: Hashable, batch_moments: Moments) -> None:
        """Add one batch of ``domain``'s statistics."""
        self.domains.setdefault(domain, PreciseBN(self.estimator, self.bessel)).update(
            batch_moments
        )

    def update_grouped(self, cache: GroupedCache) -> None:
        """Add every domain's statistics from a ``domain_batch_norm_train`` cache."""
        for key, m in cache.moments.items():
            self.update(key, m)

    def __getitem__(self, domain: Hashable) -> PreciseBN:
        try:
            return self.domains[domain]
        except KeyError:
            raise KeyError(
                f"no statistics for domain {domain!r}; known: {list(self.domains)}"
            ) from None

    def merge(self, other: DomainPreciseBN) -> DomainPreciseBN:
        """Domain-wise merge of two aggregators."""
        out = DomainPreciseBN(self.estimator, self.bessel)
        for key in dict.fromkeys([*self.domains, *other.domains]):
            a, b = self.domains.get(key), other.domains.get(key)
            if a is None:
                a = PreciseBN(self.estimator, self.bessel)
            out.domains[key] = (
                a.merge(b) if b is not None else a.with_estimator(self.estimator, self.bessel)
            )
        return out
