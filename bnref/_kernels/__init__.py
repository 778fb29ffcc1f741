"""Low-level per-channel kernels: the only code that touches every element of x.

Everything else in bnref works on per-channel vectors; these functions stream the data, in
float64 (results rounded once to the input's dtype), in blocks spread over a small thread
pool. One job per file, each with the proof of what it computes beside it:

* ``config.py``  — tuning constants and the settings in force (changed via ``bnref.runtime``).
* ``layout.py``  — any input viewed as (A, C, B) or (A, C*B) in memory order, row and column
  modes, the cached plan (``plan``), the fused whole-channel layout; ``blocks.py`` cuts the
  view into blocks and units of work; ``sums.py`` sums blocks as trees of bounded depth.
* ``pool.py``    — the thread pool that runs units of work (bitwise independent of threads).
* ``memory.py``  — per-thread scratch, the constants' arena, kept-memory accounting.
* ``stats.py``   — ``channel_stats``: shifted sums, the second pass, the statistics' bound.
* ``float32.py`` — what the float32 paths share: the split mean and the constants' guards.
* ``forward.py`` — ``normalize_affine``, ``train_forward``: y's float64, fused and float32
  paths and their bounds.
* ``backward.py`` — ``grad_sums``, ``train_input_grad``, ``eval_backward``,
  ``train_backward``: the gradient sums, dx's paths and their bounds.

Bounds, with natural scales (forward.py, backward.py; tests/test_accuracy_contract.py checks
them against an extended-precision reference, |mean| / std up to ~1e9): statistics within
1e-12 relative (M2; mean relative to |mean| + std); float32 y the float64 answer rounded once
(<= 0.5 eps32; opt-in float32 path <= 2 eps32), training dx <= 2.5 eps32, inference dx,
dscale, dbias <= 1 eps32: all within the numerical contract (docs/guarantees.md) for float32 input,
4 eps32. float16: the float64 result rounded once. float64: a few eps64. NaN anywhere in a
channel propagates to that channel's statistics and outputs.
"""

from bnref._kernels.backward import eval_backward, grad_sums, train_backward, train_input_grad
from bnref._kernels.forward import normalize_affine, train_forward
from bnref._kernels.stats import channel_stats

__all__ = [
    "channel_stats",
    "normalize_affine",
    "train_forward",
    "grad_sums",
    "train_input_grad",
    "eval_backward",
    "train_backward",
]
