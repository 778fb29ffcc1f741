"""Inputs shared by the porting tests and ``generate_golden.py`` (NumPy only, seeded).

Each channel's variance is chosen where a porting mistake shows: 0 and far below every eps
(eps is all there is), near the eps, and ordinary. Inputs are NCHW; frameworks that want
channels last get ``np.moveaxis(x, 1, -1)``.
"""

from __future__ import annotations

import numpy as np

VARIANCES = np.array([0.0, 1e-7, 2e-5, 1e-3, 0.5, 40.0])


def parameters(seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """``scale, bias, mean, var`` for ``len(VARIANCES)`` channels (signed scale)."""
    rng = np.random.default_rng(seed)
    c = VARIANCES.size
    return {
        "scale": (rng.uniform(0.3, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype),
        "bias": rng.standard_normal(c).astype(dtype),
        "mean": (3 * rng.standard_normal(c)).astype(dtype),
        "var": VARIANCES.astype(dtype),
    }


def inputs(seed: int, p: dict[str, np.ndarray], n: int = 4, hw: int = 3) -> np.ndarray:
    """NCHW input spread a few stds (at least 1e-2) around each channel's mean."""
    rng = np.random.default_rng(seed + 1)
    c = p["var"].size
    std = np.sqrt(p["var"].astype(np.float64)) + 1e-2
    z = rng.standard_normal((n, c, hw, hw)) * 2
    x = z * std.reshape(1, c, 1, 1) + p["mean"].astype(np.float64).reshape(1, c, 1, 1)
    return x.astype(p["var"].dtype)
