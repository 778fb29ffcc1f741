"""Test vectors for BatchNorm implementations in any language: ``.npz`` files and a JSON manifest.

``python -m bnref.vectors [--convention NAME] [--dtype DTYPE] -o DIR`` (omitted: all) writes
one ``<convention>-<dtype>-<case>.npz`` per case and ``manifest.json`` into the new directory
DIR. Each file holds the inputs (``x``, ``scale``, ``bias``, ``running_mean``, ``running_var``,
``dy``, ``precise_x``) in the case's dtype (bfloat16 as its uint16 bits), and per expected
quantity its float64 value and natural scale (``scale_<quantity>``); the manifest says the
convention (eps, momentum and its meaning, Bessel), the channel axis, each array's dtype, the
tolerance ``k * eps_dtype`` per quantity, and why a quantity is absent. The format, version
``FORMAT_VERSION``, is documented in docs/vectors.md; the cases in ``bnref.vectors.cases``;
expected values and scales in ``bnref.vectors.expected``; writing in ``bnref.vectors.store``.

Generation is deterministic: the same bnref version writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnref._version import __version__
from bnref.conventions import ALL, Convention, by_name
from bnref.testing.tolerances import Tolerance
from bnref.vectors.cases import SEED, Case, build_cases
from bnref.vectors.expected import expected
from bnref.vectors.store import encode, npz_bytes, sha256, write_directory

__all__ = ["FORMAT", "FORMAT_VERSION", "DTYPES", "CONVENTIONS", "build", "generate"]

FORMAT = "bnref-vectors"
#: Bumped whenever a file's layout, a case's content or a tolerance changes.
FORMAT_VERSION = 1
DTYPES = ("float64", "float32", "float16", "bfloat16")
CONVENTIONS = tuple(c.name for c in ALL)
_TINY64 = float(np.finfo(np.float64).tiny)
_INPUTS = ("x", "scale", "bias", "running_mean", "running_var", "dy", "precise_x")


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return np.dtype(name)


def _convention_entry(conv: Convention) -> dict:
    return {"name": conv.name, "momentum": conv.momentum, "momentum_weights": conv.momentum_weights,
            "eps": conv.eps, "min_eps": conv.min_eps, "unbiased_running_var": conv.unbiased_running_var,
            "channel_axis": conv.channel_axis}


def _case_file(conv: Convention, case: Case, dtype_name: str) -> tuple[str, bytes, dict]:
    want, omitted = expected(case, conv)
    arrays, entries = {}, {}
    for name in _INPUTS:
        a = getattr(case, name)
        if a is not None:
            arrays[name], entries[name] = encode(a)
    tol = Tolerance.for_dtype(_dtype(dtype_name))
    quantities = {}
    for q, (value, scale) in want.items():
        arrays[q], arrays[f"scale_{q}"] = np.asarray(value, np.float64), np.asarray(scale, np.float64)
        quantities[q] = {"k": tol.k, "eps_dtype": tol.eps, "bound": tol.bound, "scale": f"scale_{q}",
                         "shape": list(np.shape(value))}
    data = npz_bytes(arrays)
    ident = f"{conv.name}-{dtype_name}-{case.name}"
    entry = {
        "id": ident, "file": f"{ident}.npz", "sha256": sha256(data), "case": case.name,
        "description": case.description, "convention": _convention_entry(conv), "dtype": dtype_name,
        "axis": case.axis, "eps": case.eps, "momentum": case.momentum,
        "batch_weight": conv.batch_weight(case.momentum), "values_per_channel": case.x.size // case.scale.size,
        "inputs": entries, "expected": quantities, "omitted": omitted,
    }
    return entry["file"], data, entry


def build(conventions=None, dtypes=None) -> tuple[dict[str, bytes], dict]:
    """``({file name: bytes}, manifest)`` for the given convention names and dtype names (None: all)."""
    convs = [by_name(c) if isinstance(c, str) else c for c in (conventions or CONVENTIONS)]
    names = list(dtypes or DTYPES)
    for d in names:
        _dtype(d)  # refuse an unknown dtype before any work
    files, cases = {}, []
    for conv in convs:
        for d in names:
            for case in build_cases(conv, _dtype(d)):
                fname, data, entry = _case_file(conv, case, d)
                files[fname] = data
                cases.append(entry)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "bnref_version": __version__,
        "seed": SEED, "conventions": [c.name for c in convs], "dtypes": names,
        "tolerance": {"rule": "|got - want| <= bound * scale + tiny", "tiny": _TINY64,
                      "k": {d: Tolerance.for_dtype(_dtype(d)).k for d in names}},
        "inputs": list(_INPUTS), "cases": cases,
    }
    return files, manifest


def generate(out: str | Path, conventions=None, dtypes=None) -> dict:
    """Write the vectors into the new directory ``out`` (all or nothing); return the manifest."""
    files, manifest = build(conventions, dtypes)
    write_directory(Path(out), files, manifest)
    return manifest
