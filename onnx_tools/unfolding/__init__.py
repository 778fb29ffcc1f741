"""``bnref-onnx unfold``: BatchNormalization back into models whose exporter folded it.

* :mod:`onnx_tools.unfolding.sites` — which layers had a BN (the default rules, and how to
  override them);
* :mod:`onnx_tools.unfolding.insert` — the identity BN inserted after each site, its depth,
  and writing its statistics;
* :mod:`onnx_tools.unfolding.run` — :func:`unfold_model` / :func:`unfold`: source statistics,
  exact by depth, and writing the model;
* :mod:`onnx_tools.unfolding.waves` and :mod:`onnx_tools.unfolding.wave_run` — the network cut
  into waves by depth, run once each, with the activations later waves read cached on disk.
"""

from onnx_tools.unfolding.insert import InsertedBN
from onnx_tools.unfolding.run import (
    DEFAULT_BN_EPS,
    UnfoldResult,
    unfold,
    unfold_model,
)
from onnx_tools.unfolding.sites import Site, find_sites

__all__ = [
    "DEFAULT_BN_EPS",
    "InsertedBN",
    "Site",
    "UnfoldResult",
    "find_sites",
    "unfold",
    "unfold_model",
]
