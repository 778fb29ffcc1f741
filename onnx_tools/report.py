"""Per-BN drift between the statistics a model stored and the recalibrated ones.

For each channel ``c``: the mean shift in units of the new standard deviation,
``|new_mean - old_mean| / sqrt(new_var + eps)``, and the variance ratio
``(new_var + eps) / (old_var + eps)`` (eps keeps dead channels finite). Each BN row summarizes
its channels: the largest and the root-mean-square shift, and the smallest, geometric-mean and
largest ratio. A stale model (EMA lag, weight averaging, a new domain) shows large shifts or
ratios far from 1 in its deeper layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnx_tools.jsonout import strict_dumps


@dataclass(frozen=True)
class BNDrift:
    """Drift summary of one BN (see the module docstring)."""

    key: str
    node: str
    channels: int
    mean_shift_max: float
    mean_shift_rms: float
    var_ratio_min: float
    var_ratio_geomean: float
    var_ratio_max: float


def bn_drift(
    key: str,
    node: str,
    old_mean: np.ndarray,
    old_var: np.ndarray,
    new_mean: np.ndarray,
    new_var: np.ndarray,
    eps: float,
) -> BNDrift:
    """Summarize the drift of one BN from its per-channel old/new mean and variance."""
    om, ov = np.asarray(old_mean, np.float64).ravel(), np.asarray(old_var, np.float64).ravel()
    nm, nv = np.asarray(new_mean, np.float64).ravel(), np.asarray(new_var, np.float64).ravel()
    with np.errstate(all="ignore"):  # NaN/Inf stored statistics: drift NaN, no warning
        shift = np.abs(nm - om) / np.sqrt(nv + eps)
        ratio = (nv + eps) / (ov + eps)
        return _drift(key, node, shift, ratio)


def _drift(key: str, node: str, shift: np.ndarray, ratio: np.ndarray) -> BNDrift:
    return BNDrift(
        key=key,
        node=node,
        channels=int(shift.size),
        mean_shift_max=float(shift.max()),
        mean_shift_rms=float(np.sqrt(np.mean(shift**2))),
        var_ratio_min=float(ratio.min()),
        var_ratio_geomean=float(np.exp(np.mean(np.log(ratio)))),
        var_ratio_max=float(ratio.max()),
    )


@dataclass
class DriftReport:
    """Drift rows for every rewritten BN and the facts of the run (``meta``)."""

    rows: list[BNDrift]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``--report`` writes)."""
        return {"meta": self.meta, "batchnorms": [asdict(r) for r in self.rows]}

    def to_json(self) -> str:
        """Indented strict JSON text: NaN/Inf become null, named in ``"non_finite"``."""
        return strict_dumps(self.to_dict()) + "\n"

    def format_table(self, max_rows: int | None = None) -> str:
        """Fixed-width table for the terminal."""
        head = ("BN", "C", "shift max", "shift rms", "var ratio min", "geomean", "max")
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        body = [
            (
                _short(r.node or r.key),
                str(r.channels),
                f"{r.mean_shift_max:.3g}",
                f"{r.mean_shift_rms:.3g}",
                f"{r.var_ratio_min:.3g}",
                f"{r.var_ratio_geomean:.3g}",
                f"{r.var_ratio_max:.3g}",
            )
            for r in rows
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
        lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                           for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
        for row in body:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if max_rows is not None and len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more (see --report)")
        lines.append("shift: |new mean - old mean| / new std; var ratio: new var / old var")
        return "\n".join(lines)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
