"""Strict JSON for everything bnref-onnx prints or writes as JSON.

Python's ``json`` writes NaN and Infinity as the bare tokens ``NaN`` and ``Infinity``, which
are not JSON: strict parsers (``jq``, JavaScript's ``JSON.parse``, Go, Rust's serde) reject
the whole document. :func:`strict_dumps` writes ``null`` in their place and adds a top-level
``"non_finite"`` list naming each such value by its JSON Pointer (RFC 6901), e.g.
``"/batchnorms/1/mean_shift_max"``, so nothing is lost silently; the list is empty when every
number is finite. NumPy scalars and arrays become plain numbers and lists.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def _pointer_part(key: object) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def finite_only(value: Any, path: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every non-finite float replaced by None; their paths go to ``found``."""
    found = [] if found is None else found
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        found.append(path or "/")
        return None
    if isinstance(value, dict):
        return {k: finite_only(v, f"{path}/{_pointer_part(k)}", found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_only(v, f"{path}/{i}", found) for i, v in enumerate(value)]
    return value


def strict_dumps(document: dict[str, Any], indent: int | None = 2) -> str:
    """``document`` as strict JSON text, with its ``"non_finite"`` list (see module docstring)."""
    found: list[str] = []
    clean = finite_only(document, "", found)
    clean["non_finite"] = found
    return json.dumps(clean, indent=indent, allow_nan=False)
