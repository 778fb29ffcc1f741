"""bnref: a framework-agnostic NumPy reference for Batch Normalization.

Where each concept lives:

* ``bnref.moments``      — ``Moments``: per-channel count/mean/M2, accurate shifted sums and exact merge.
* ``bnref.forward``      — ``batch_norm_train`` / ``batch_norm_eval``.
* ``bnref.backward``     — ``batch_norm_train_backward`` / ``batch_norm_eval_backward``.
* ``bnref.conventions``  — each framework's momentum/eps/Bessel/axis conventions as data, and
  ``convert`` to port BN parameters between them (its arithmetic: ``bnref.porting``).
* ``bnref.vectors``      — ``python -m bnref.vectors``: test vectors (.npz + JSON) for any language.
* ``bnref.precise``      — ``PreciseBN`` (Precise BatchNorm aggregation) and ``blend_prior``.
* ``bnref.ghost``        — ghost (virtual) BN and per-domain BN.
* ``bnref.runtime``      — threads, tuning and the memory the kernels keep between calls.
* ``bnref.testing``      — test *your* BN against the oracle: ``strategies`` (hypothesis), ``ranges``,
  ``tolerances`` (``Tolerance``, ``assert_within``), ``check`` (``check_batch_norm``).
* ``bnref._kernels``     — private: the blocked, threaded kernels that touch every element
  (``layout``, ``blocks``, ``sums``, ``pool``, ``memory``, ``stats``, ``float32``, ``forward``,
  ``backward``); each numerical proof sits beside its kernel (``bnref/_kernels/__init__.py``).

All computation is float64; results come back in the input's dtype.
"""

from bnref import conventions, runtime
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
    "runtime",
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
