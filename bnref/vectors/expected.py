"""Expected values and natural scales of one case, in float64, from bnref itself.

Every quantity ``q`` comes with a per-element natural scale; a result passes where
``|got - want| <= k * eps_dtype * scale + 2**-1022`` (``k`` by dtype: ``bnref.testing``'s
``Tolerance.for_dtype``, bfloat16 like float16). With
``x_hat`` and ``inv_std = 1 / sqrt(var + eps)`` from the float64 statistics, ``rms`` the
per-channel root mean square of dy, sums over every axis but the channels, and
``c = |mean| * inv_std`` per channel (the conditioning of subtracting the mean: rounding the
mean, or ``x * a`` in a folded ``x * a + b``, costs ``eps_dtype * c`` whatever the algorithm):

==================  =============================================================
quantity            natural scale
==================  =============================================================
y_train             ``|scale| (1 + |x_hat| + c) + |bias|`` (batch statistics)
y_eval              the same with the running statistics
dx                  ``|scale| inv_std (|dy| + rms (1 + |x_hat|) (1 + c))``
dscale              ``sum |dy x_hat| + c sum |dy| + 1``
dbias               ``sum |dy| + 1``
new_running_mean    ``|new| + |old| + std`` (the batch's biased std)
new_running_var     ``|new| + |old|``
precise_mean        ``|mean| + std`` (pooled)
precise_var(_..)    ``var + |mean| std`` (pooled mean and std)
==================  =============================================================

These are ``bnref.testing``'s scales plus the ``c`` terms, which matter only where
|mean| >> std (the ``large_mean`` case): there an ``E[x**2] - E[x]**2`` variance still fails.
"""

from __future__ import annotations

import numpy as np

from bnref._validation import channel_shape, reduce_axes
from bnref.backward import batch_norm_train_backward
from bnref.conventions import Convention
from bnref.forward import batch_norm_eval, batch_norm_train
from bnref.moments import Moments
from bnref.precise import PreciseBN
from bnref.vectors.cases import Case


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _forward(case: Case, ax: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Moments]:
    x = _f64(case.x)
    shp = channel_shape(x.ndim, ax, -1)
    s, b = _f64(case.scale), _f64(case.bias)
    y, cache = batch_norm_train(x, s, b, eps=case.eps, axis=ax)
    x_hat = (x - cache.mean.reshape(shp)) * cache.inv_std.reshape(shp)
    c = np.abs(cache.mean) * cache.inv_std
    rm, rv = _f64(case.running_mean), _f64(case.running_var)
    inv_e = 1.0 / np.sqrt(rv + case.eps)
    xh_e = (x - rm.reshape(shp)) * inv_e.reshape(shp)
    c_e = np.abs(rm) * inv_e

    def y_scale(xh, cc):
        return np.abs(s).reshape(shp) * (1 + np.abs(xh) + cc.reshape(shp)) + np.abs(b).reshape(shp)

    out = {
        "y_train": (y, y_scale(x_hat, c)),
        "y_eval": (batch_norm_eval(x, s, b, rm, rv, eps=case.eps, axis=ax), y_scale(xh_e, c_e)),
    }
    dy = _f64(case.dy)
    dx, ds, db = batch_norm_train_backward(dy, cache)
    axes = reduce_axes(x.ndim, ax)
    rms = np.sqrt(np.mean(dy * dy, axis=axes, keepdims=True))
    out["dx"] = (dx, (np.abs(s) * cache.inv_std).reshape(shp)
                 * (np.abs(dy) + rms * (1 + np.abs(x_hat)) * (1 + c.reshape(shp))))
    abs_dy = np.sum(np.abs(dy), axis=axes)
    out["dscale"] = (ds, np.sum(np.abs(dy * x_hat), axis=axes) + c * abs_dy + 1.0)
    out["dbias"] = (db, abs_dy + 1.0)
    return out, cache.moments


def _running(case: Case, conv: Convention, moments: Moments, omitted: dict[str, str]):
    if conv.unbiased_running_var and moments.count < 2:
        why = f"{conv.name} updates with the unbiased variance, undefined for one value per channel"
        omitted.update(new_running_mean=why, new_running_var=why)
        return {}
    old_m, old_v = _f64(case.running_mean), _f64(case.running_var)
    new_m, new_v = conv.update(old_m, old_v, moments, momentum=case.momentum)
    return {
        "new_running_mean": (new_m, np.abs(new_m) + np.abs(old_m) + moments.std()),
        "new_running_var": (new_v, np.abs(new_v) + np.abs(old_v)),
    }


def _precise(case: Case, ax: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if case.precise_x is None:
        return {}
    p = PreciseBN("population")
    for batch in case.precise_x:
        p.update_from_array(_f64(batch), axis=ax)
    mov = p.with_estimator("mean_of_variances")
    mean, std = p.mean, np.sqrt(p.var)
    var_scale = p.var + np.abs(mean) * std
    return {
        "precise_mean": (mean, np.abs(mean) + std),
        "precise_var": (p.var, var_scale),
        "precise_var_batch_avg": (mov.var, var_scale),
    }


def expected(case: Case, conv: Convention) -> tuple[dict, dict[str, str]]:
    """``({quantity: (want, natural_scale)}, {omitted quantity: why})``, float64 arrays."""
    ax = case.axis % case.x.ndim
    omitted = dict(case.omitted)
    out, moments = _forward(case, ax)  # the batch's moments, as the forward pass computed them
    out.update(_running(case, conv, moments, omitted))
    out.update(_precise(case, ax))
    return out, omitted
