"""A NumPy reference of ``unfold``: BatchNorm put back after each folded convolution.

The oracle that ``bnref-onnx unfold`` / ``recalibrate --source`` is checked against, on the conv
net of :mod:`demo.convnet`. After folded conv ``d`` (output ``z_d``) a BN is inserted with
running mean ``m_d`` and variance ``v_d``, scale ``sqrt(v_d + eps')`` and bias ``m_d``: at
inference it is the identity, whatever ``m_d`` and ``v_d`` are.

``(m_d, v_d)`` are the population statistics of ``z_d`` on the source images, collected as
Precise BN collects (every BN in training mode). In training mode each inserted BN's
scale/bias are its own statistics, so BN ``d`` depends on the values of BNs ``< d``: this
reference makes one pass per depth, which is exact (FACTS.md, "Folded BN and unfolding").
Recalibrating the unfolded network on target images then maps each channel's target moments
onto its source moments, which is what recalibrating the BN-kept network does when the folded
statistics were the population statistics of the same source batches.
"""

from __future__ import annotations

import numpy as np

from demo import convnet as C
from demo.model import Params, Stats

__all__ = ["unfolded_params", "unfold_stats", "unfold", "site_count"]


def site_count(folded: Params) -> int:
    """Number of folded convolutions (those with a bias ``c{i}``)."""
    return sum(1 for name in folded if name.startswith("c"))


def unfolded_params(folded: Params, inserted: Stats, eps_prime: float) -> Params:
    """The folded network with a BN after conv ``i``: scale ``sqrt(v_i + eps')``, bias ``m_i``.

    Sites without statistics yet get scale 1 and bias 0 (placeholders while unfolding).
    """
    out = dict(folded)
    for i in range(site_count(folded)):
        c = folded[f"c{i}"].shape[0]
        m, v = inserted[i] if i < len(inserted) else (np.zeros(c), np.ones(c) - eps_prime)
        out[f"gamma{i}"] = np.sqrt(np.asarray(v, np.float64) + eps_prime).astype(np.float32)
        out[f"beta{i}"] = np.asarray(m, np.float32)
    return out


def unfold_stats(folded: Params, x_source: np.ndarray, batch_size: int, eps_prime: float) -> Stats:
    """The inserted BNs' ``(mean, var)``: population statistics on ``x_source``, one pass per depth.

    Pass ``d`` runs the network in training mode with the statistics of BNs ``< d`` already
    fixed and keeps BN ``d``'s pooled moments of whole batches of ``batch_size`` (stored order).
    """
    known: Stats = []
    for d in range(site_count(folded)):
        net = unfolded_params(folded, known, eps_prime)
        agg = C.precise_aggregators(net, x_source, batch_size, eps_prime, layers=d + 1)[d]
        known.append((agg.mean.astype(np.float32), agg.var.astype(np.float32)))
    return known


def unfold(folded: Params, x_source: np.ndarray, batch_size: int, eps_prime: float) -> tuple[Params, Stats]:
    """``(params, stats)`` of the unfolded network: run it with ``forward_eval(..., eps=eps')``."""
    stats = unfold_stats(folded, x_source, batch_size, eps_prime)
    net = unfolded_params(folded, stats, eps_prime)
    return net, stats
