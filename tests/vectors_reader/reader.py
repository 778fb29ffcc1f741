"""A second BatchNorm implementation that checks bnref's vectors from the files alone.

It never imports bnref (``test_vectors.py`` checks its imports, and runs it in a process
where bnref cannot be imported): plain NumPy in float64, written from the formulas in
docs/vectors.md, reading only ``manifest.json`` and the ``.npz`` files. It is what an
implementer in another language would write, and each of its steps is a module-level
function so that the tests can plant a bug in one and see the vectors catch it.

Usage: ``python reader.py DIR`` (exit status 1 and one line per failure if any).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

SUPPORTED_VERSION = 1


# -- reading ----------------------------------------------------------------------------------------


def decode(stored: np.ndarray, entry: dict) -> np.ndarray:
    """An input as float64: bfloat16 bits become float32 bits (upper half), then float64."""
    if entry["dtype"] == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)


def load_case(root: Path, case: dict) -> dict[str, np.ndarray]:
    """Every array of one case, inputs decoded to float64; refuses a file whose sha256 differs."""
    data = (root / case["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != case["sha256"]:
        raise ValueError(f"{case['file']}: sha256 differs from the manifest")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:  # the bytes just checked
        arrays = {k: z[k] for k in z.files}
    for name, entry in case["inputs"].items():
        a = arrays[name]
        if (a.dtype.name, list(a.shape)) != (entry["stored_as"], entry["shape"]):
            raise ValueError(f"{case['file']}: {name} stored as {a.dtype} {list(a.shape)}, manifest says "
                             f"{entry['stored_as']} {entry['shape']}")
        arrays[name] = decode(a, entry)
    return arrays


# -- the implementation, channel axis moved last and flattened to rows ------------------------------


def rows(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.moveaxis(x, axis, -1)
    return x.reshape(-1, x.shape[-1])


def unrows(r: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(r.reshape(np.moveaxis(like, axis, -1).shape), -1, axis)


def moments(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass mean and biased variance per column."""
    mean = r.mean(axis=0)
    return mean, ((r - mean) ** 2).mean(axis=0)


def normalize(r, mean, var, eps, scale, bias):
    """``(x - mean) / sqrt(var + eps) * scale + bias``: eps inside the square root."""
    return (r - mean) / np.sqrt(var + eps) * scale + bias


def backward(r, dy, mean, var, eps, scale):
    """Training-mode gradients ``(dx, dscale, dbias)``."""
    inv = 1.0 / np.sqrt(var + eps)
    x_hat = (r - mean) * inv
    dbias = dy.sum(axis=0)
    dscale = (dy * x_hat).sum(axis=0)
    n = r.shape[0]
    dx = scale * inv * (dy - dbias / n - x_hat * dscale / n)
    return dx, dscale, dbias


def batch_weight(convention: dict, momentum: float) -> float:
    """The weight of the batch statistic: the momentum, or 1 - momentum, by the convention."""
    return momentum if convention["momentum_weights"] == "batch" else 1.0 - momentum


def running_update(old_mean, old_var, mean, var, n, convention, momentum):
    """One EMA step; PyTorch-like conventions feed the unbiased batch variance."""
    w = batch_weight(convention, momentum)
    v = var * n / (n - 1) if convention["unbiased_running_var"] else var
    return (1 - w) * old_mean + w * mean, (1 - w) * old_var + w * v


def precise(batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Population statistics of all batches pooled, and the average of unbiased batch variances."""
    mean, var = moments(np.concatenate(batches))
    per_batch = [b.var(axis=0, ddof=1) for b in batches]
    return {"precise_mean": mean, "precise_var": var, "precise_var_batch_avg": np.mean(per_batch, axis=0)}


def compute(case: dict, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every quantity this implementation produces for the case."""
    axis, eps, conv = case["axis"], case["eps"], case["convention"]
    x = a["x"]
    r = rows(x, axis)
    mean, var = moments(r)
    out = {
        "y_train": unrows(normalize(r, mean, var, eps, a["scale"], a["bias"]), x, axis),
        "y_eval": unrows(normalize(r, a["running_mean"], a["running_var"], eps, a["scale"], a["bias"]), x, axis),
    }
    dx, ds, db = backward(r, rows(a["dy"], axis), mean, var, eps, a["scale"])
    out.update(dx=unrows(dx, x, axis), dscale=ds, dbias=db)
    n = r.shape[0]
    if n > 1 or not conv["unbiased_running_var"]:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["new_running_mean"], out["new_running_var"] = running_update(
                a["running_mean"], a["running_var"], mean, var, n, conv, case["momentum"])
    if "precise_x" in a:
        out.update(precise([rows(b, axis) for b in a["precise_x"]]))
    return out


# -- checking ----------------------------------------------------------------------------------------


def check_case(root: Path, case: dict, tiny: float) -> tuple[int, list[str]]:
    """``(quantities compared, failures)`` for one case."""
    a = load_case(root, case)
    got = compute(case, a)
    compared, failures = 0, []
    for q, spec in case["expected"].items():
        if q not in got:
            failures.append(f"{case['id']}: {q}: not computed")
            continue
        want, scale = a[q], a[spec["scale"]]
        shapes = {tuple(spec["shape"]), np.shape(got[q]), want.shape, scale.shape}
        if len(shapes) > 1:  # compared elementwise: a broadcast would hide missing elements
            failures.append(f"{case['id']}: {q}: shapes differ: {sorted(shapes)}")
            continue
        compared += 1
        err = np.abs(np.asarray(got[q], np.float64) - want)
        allowed = spec["bound"] * scale + tiny
        bad = ~(err <= allowed)  # NaN counts as bad
        if bad.any():
            i = int(np.argmax(np.where(bad, err / allowed, 0)))
            failures.append(f"{case['id']}: {q}: |error| {err.flat[i]:.3g} > allowed {allowed.flat[i]:.3g} "
                            f"(element {i}: got {np.ravel(got[q])[i]!r}, want {want.flat[i]!r})")
    return compared, failures


def check_directory(root) -> tuple[int, int, list[str]]:
    """``(cases, quantities checked, failures)`` for every case of a vectors directory."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    if manifest.get("format") != "bnref-vectors" or manifest.get("format_version") != SUPPORTED_VERSION:
        raise ValueError(f"not bnref-vectors version {SUPPORTED_VERSION}: {manifest.get('format')!r} "
                         f"{manifest.get('format_version')!r}")
    tiny = manifest["tolerance"]["tiny"]
    checked, failures = 0, []
    for case in manifest["cases"]:
        n, f = check_case(root, case, tiny)
        checked += n
        failures += f
    return len(manifest["cases"]), checked, failures


if __name__ == "__main__":
    cases, checked, failures = check_directory(sys.argv[1])
    for line in failures:
        print(line)
    print(f"{cases} cases, {checked} quantities checked, {len(failures)} outside tolerance")
    sys.exit(1 if failures else 0)
