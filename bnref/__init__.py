"""bnref: a framework-agnostic NumPy reference for Batch Normalization.

Where each concept lives:

* ``bnref.moments``      — ``Moments``: per-channel count/mean/M2, accurate shifted sums and exact merge.
* ``bnref.forward``      — ``batch_norm_train`` / ``batch_norm_eval``.
* ``bnref.backward``     — ``batch_norm_train_backward`` / ``batch_norm_eval_backward``.
* ``bnref.conventions``  — each framework's momentum/eps/Bessel/axis conventions as data.
* ``bnref.precise``      — ``PreciseBN`` (Precise BatchNorm aggregation) and ``blend_prior``.
* ``bnref.ghost``        — ghost (virtual) BN and per-domain BN.
* ``bnref.testing``      — hypothesis strategies and checks to test *your* BN against the oracle.

All computation is float64; results come back in the input's dtype.
"""

from bnref import conventions
from bnref._version import __version__
from bnref.backward import batch_norm_eval_backward, batch_norm_train_backward
from bnref.forward import BatchNormCache, batch_norm_eval, batch_norm_train
from bnref.ghost import (
    DomainPreciseBN,
    GroupedCache,
    domain_batch_norm_train,
    ghost_batch_norm_train,
    grouped_batch_norm_backward,
)
from bnref.moments import Moments
from bnref.precise import ESTIMATORS, PreciseBN, blend_prior

__all__ = [
    "__version__",
    "conventions",
    "Moments",
    "BatchNormCache",
    "batch_norm_train",
    "batch_norm_eval",
    "batch_norm_train_backward",
    "batch_norm_eval_backward",
    "PreciseBN",
    "ESTIMATORS",
    "blend_prior",
    "ghost_batch_norm_train",
    "domain_batch_norm_train",
    "grouped_batch_norm_backward",
    "GroupedCache",
    "DomainPreciseBN",
]
