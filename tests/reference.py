"""Independent reference computations for the tests (not bnref's code path).

Written the plainest way: move the channel axis last, flatten, and use NumPy's float64
mean/var, or exact rational arithmetic where the test needs the last bit.
"""

from fractions import Fraction

import numpy as np


def to_rows(x, axis):
    """(values, C) float64 view: every value of a channel in one column."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return x.reshape(-1, x.shape[-1])


def naive_train(x, scale, bias, eps, axis):
    """Training-mode BN in float64, written from the formula."""
    r = to_rows(x, axis)
    mean = r.mean(axis=0)
    var = r.var(axis=0)
    y = (r - mean) / np.sqrt(var + eps) * np.asarray(scale, np.float64) + np.asarray(
        bias, np.float64
    )
    xm = np.moveaxis(np.asarray(x), axis, -1)
    return np.moveaxis(y.reshape(xm.shape), -1, axis), mean, var


def naive_eval(x, scale, bias, mean, var, eps, axis):
    r = to_rows(x, axis)
    y = (r - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + eps)
    y = y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
    xm = np.moveaxis(np.asarray(x), axis, -1)
    return np.moveaxis(y.reshape(xm.shape), -1, axis)


def exact_mean_m2(values):
    """Exact mean and M2 of a 1-D float array with rational arithmetic, rounded once."""
    fr = [Fraction(float(v)) for v in values]
    n = len(fr)
    mean = sum(fr) / n
    m2 = sum((v - mean) ** 2 for v in fr)
    return float(mean), float(m2)
