"""Shared machinery of the conformance suite: inputs, comparisons and the result recorder.

Every comparison is ``bnref.testing.check_case`` (or the same ``assert_within`` bound for the
quantities it does not cover): ``|got - want| <= k * eps_dtype * natural_scale`` elementwise,
``k`` from ``bnref.testing.Tolerance.for_dtype``. The recorder keeps, per row (framework API x
dtype) and quantity, the worst ratio error/allowed and the worst natural-scale relative error
(= ratio * k * eps_dtype); ``scripts/make_conformance.py`` renders them.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np

import bnref
from bnref.conventions import Convention
from bnref.testing import BatchNormImpl, BNCase, Mismatch, Tolerance, assert_within, check_case

#: Matrix columns, in order. ``running_k``: running statistics after several updates.
QUANTITIES = (
    "y_train",
    "y_eval",
    "dx",
    "dscale",
    "dbias",
    "running_mean",
    "running_var",
    "running_k",
    "precise_mean",
    "precise_var",
)

#: Environment variable naming the JSON file the session writes its results to.
JSON_ENV = "BNREF_CONFORMANCE_JSON"

#: bfloat16 (``ml_dtypes``, a dependency of bnref-onnx) as a NumPy dtype.
BF16 = np.dtype(ml_dtypes.bfloat16)


# -- inputs ---------------------------------------------------------------------------------------


def shape_with_channels(rank: int, axis: int, channels: int = 3) -> tuple[int, ...]:
    """A small shape of ``rank`` with ``channels`` at ``axis`` (>= 4 values per channel)."""
    rest = {2: [6], 3: [4, 5], 4: [2, 3, 4], 5: [2, 2, 3, 2]}[rank]
    ax = axis % rank
    # batch first, channels at ``ax``, the remaining sides in order elsewhere
    out = [channels if i == ax else rest.pop(0) for i in range(rank)]
    return tuple(out)


def make_case(
    shape: tuple[int, ...],
    axis: int,
    dtype=np.float32,
    seed: int = 0,
    mean_over_std: float = 3.0,
    log10_std: tuple[float, float] = (-2.0, 2.0),
) -> BNCase:
    """A reproducible ``BNCase``: per-channel std log-uniform in ``10**log10_std``, mean up to
    ``mean_over_std`` stds off zero, signed gamma, random beta/running stats and upstream dy."""
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    c = shape[ax]
    cs = [1] * len(shape)
    cs[ax] = c
    std = 10.0 ** rng.uniform(*log10_std, size=c)
    loc = rng.uniform(-mean_over_std, mean_over_std, size=c) * std
    x = rng.standard_normal(shape) * std.reshape(cs) + loc.reshape(cs)
    dt = np.dtype(dtype)
    return BNCase(
        x=x.astype(dt),
        scale=(rng.uniform(0.2, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dt),
        bias=rng.standard_normal(c).astype(dt),
        running_mean=(loc + 0.1 * std * rng.standard_normal(c)).astype(dt),
        running_var=(std**2 * rng.uniform(0.5, 2.0, c)).astype(dt),
        dy=rng.standard_normal(shape).astype(dt),
        axis=axis,
    )


def batches(shape, axis, dtype, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` batches of ``shape`` from one per-channel distribution (for repeated updates)."""
    base = make_case(shape, axis, dtype, seed)
    rng = np.random.default_rng(seed + 1000)
    ax = axis % len(shape)
    cs = [1] * len(shape)
    cs[ax] = shape[ax]
    x64 = base.x.astype(np.float64)
    mu = bnref.Moments.from_array(x64, ax)
    out = []
    for _ in range(k):
        z = rng.standard_normal(shape)
        out.append((z * mu.std().reshape(cs) + mu.mean.reshape(cs)).astype(dtype))
    return out


def config_id(v) -> str:
    """A test id for a ``(rank, axis, eps, momentum)`` configuration or a dtype."""
    return np.dtype(v).name if not isinstance(v, tuple) else "rank{}-axis{}-eps{}-mom{}".format(*v)


def with_eps(conv: Convention, eps: float | None) -> Convention:
    """``conv`` with a non-default eps (what a user passing ``eps=`` gets: still floored at
    ``conv.min_eps``, as ``Convention.effective_eps`` says)."""
    return conv if eps is None else replace(conv, eps=eps)


# -- recorder -------------------------------------------------------------------------------------


@dataclass
class Matrix:
    """Worst error/allowed ratio per (row, quantity), written to JSON at the session's end."""

    rows: dict = field(default_factory=dict)

    def record(
        self,
        framework: str,
        api: str,
        version: str,
        dtype,
        quantity: str,
        ratio: float,
        tol: Tolerance,
        variant: str = "",
    ) -> None:
        """Keep the worst ``ratio`` (error / allowed) seen for this row and quantity."""
        if quantity not in QUANTITIES:
            raise ValueError(f"unknown quantity {quantity!r}; expected one of {QUANTITIES}")
        dt = np.dtype(dtype).name
        key = f"{framework} | {api} | {dt}"
        row = self.rows.setdefault(
            key,
            {
                "framework": framework,
                "api": api,
                "version": version,
                "dtype": dt,
                "cells": {},
                "variants": [],
            },
        )
        cell = row["cells"].setdefault(
            quantity, {"ratio": 0.0, "rel": 0.0, "k": tol.k, "eps_dtype": tol.eps, "checks": 0}
        )
        ratio = float(ratio)
        cell["checks"] += 1
        if not ratio <= cell["ratio"]:  # NaN/inf (a failure) always wins
            cell["ratio"] = ratio
            cell["rel"] = ratio * tol.bound
        if variant and variant not in row["variants"]:
            row["variants"].append(variant)

    def record_all(self, framework, api, version, dtype, ratios: dict, tol, variant=""):
        """``record`` every quantity of a ``check_case`` result."""
        for q, r in ratios.items():
            self.record(framework, api, version, dtype, q, r, tol, variant)

    def dump(self, path: str) -> None:
        """Write the results (merged into an existing file's rows of other frameworks)."""
        data = {
            "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "numpy": np.__version__,
            "bnref": bnref.__version__,
            "quantities": list(QUANTITIES),
            "rows": self.rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")


# -- comparisons ----------------------------------------------------------------------------------


def compare(
    matrix: Matrix,
    framework: str,
    api: str,
    version: str,
    impl: BatchNormImpl,
    conv: Convention,
    case: BNCase,
    *,
    momentum: float | None = None,
    tol: Tolerance | None = None,
    variant: str = "",
) -> dict[str, float]:
    """``check_case`` on one case; record every quantity's ratio (a failure records inf)."""
    tol = tol or Tolerance.for_dtype(case.x.dtype)
    try:
        ratios = check_case(impl, conv, case, tol, momentum)
    except Mismatch as e:
        matrix.record(framework, api, version, case.x.dtype, e.quantity, np.inf, tol, variant)
        raise
    matrix.record_all(framework, api, version, case.x.dtype, ratios, tol, variant)
    return ratios


def check_updates(
    matrix: Matrix,
    framework: str,
    api: str,
    version: str,
    step,
    ref_step,
    xs: list[np.ndarray],
    running_mean: np.ndarray,
    running_var: np.ndarray,
    *,
    axis: int,
    variant: str = "",
    tol: Tolerance | None = None,
) -> float:
    """Running statistics after each of several updates, framework vs bnref.

    ``step(x) -> (mean, var)`` runs one framework training step on its own persistent state;
    ``ref_step(mean, var, moments) -> (mean, var)`` is bnref's update (``Convention.update`` or
    ``update_cumulative``). Allowed error: ``k * eps * (|want| + running std)`` per update.
    """
    dt = xs[0].dtype
    tol = tol or Tolerance.for_dtype(dt)
    rm, rv = running_mean.astype(np.float64), running_var.astype(np.float64)
    worst = 0.0
    for i, x in enumerate(xs):
        got_m, got_v = step(x)
        rm, rv = ref_step(rm, rv, bnref.Moments.from_array(x.astype(np.float64), axis))
        try:
            worst = max(
                worst,
                assert_within(f"running_mean after update {i + 1}", got_m, rm, np.abs(rm) + np.sqrt(rv), tol),
                assert_within(f"running_var after update {i + 1}", got_v, rv, np.abs(rv), tol),
            )
        except AssertionError:
            matrix.record(framework, api, version, dt, "running_k", np.inf, tol, variant)
            raise
    matrix.record(framework, api, version, dt, "running_k", worst, tol, variant)
    return worst


def replay(means: np.ndarray, variances: np.ndarray):
    """A ``check_updates`` step that answers with statistics a worker already recorded, one
    update per call (``means[i]``, ``variances[i]``)."""
    it = iter(range(len(means)))

    def step(_x):
        i = next(it)
        return means[i], variances[i]

    return step


def check_precise(
    matrix: Matrix,
    framework: str,
    api: str,
    version: str,
    dtype,
    got_mean: np.ndarray,
    got_var: np.ndarray,
    ref: bnref.PreciseBN,
    *,
    variant: str = "",
    tol: Tolerance | None = None,
    name: str = "",
) -> None:
    """Aggregated (Precise BN) statistics vs ``ref``. Natural scale: ``|mean| + std`` for the
    mean, ``var + mean**2`` for the variance (the scale of E[x^2], which population estimators
    that subtract E[x]^2 work at)."""
    tol = tol or Tolerance.for_dtype(dtype)
    mean, var = ref.mean, ref.var
    try:
        rm = assert_within(
            f"{name}precise mean", got_mean, mean, np.abs(mean) + np.sqrt(var), tol, quantity="precise_mean"
        )
        rv = assert_within(f"{name}precise var", got_var, var, var + mean * mean, tol, quantity="precise_var")
    except Mismatch as e:
        matrix.record(framework, api, version, dtype, e.quantity, np.inf, tol, variant)
        raise
    matrix.record(framework, api, version, dtype, "precise_mean", rm, tol, variant)
    matrix.record(framework, api, version, dtype, "precise_var", rv, tol, variant)
