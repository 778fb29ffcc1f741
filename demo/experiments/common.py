"""What every experiment shares: the data split, paired statistics, tables, plots and seeds.

* :func:`get_split` — the fixed 3,500 / 1,500 train/test split (split seed :data:`SPLIT_SEED`).
* :func:`mean_std`, :func:`paired`, :func:`pct`, :func:`pp` — summaries over seeds and their text.
* :func:`stats_gap` — how far one set of BN statistics is from another.
* :func:`md_table`, :func:`pyplot`, :func:`write_outputs` — the ``.md`` / ``.json`` / ``.png``
  written under :data:`OUT_DIR`.
* :func:`run_seeds` — one run per seed, optionally in worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnref.conventions import FLAX, PYTORCH
from demo import data as D
from demo import model as M

OUT_DIR = Path(__file__).resolve().parent.parent.parent / "docs" / "experiments"
SPLIT_SEED = 0
TEST_FRACTION = 0.3
CONVENTIONS = {"pytorch": PYTORCH, "flax": FLAX}


@dataclass(frozen=True)
class Split:
    """The fixed train/test split every experiment uses."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    side: int


def get_split(dataset: str = "mnist5k", test_fraction: float = TEST_FRACTION) -> Split:
    """Load ``dataset`` and split it with :data:`SPLIT_SEED`."""
    d = D.load(dataset)
    return Split(*D.split(d, test_fraction, SPLIT_SEED), side=d.side)


# -- statistics helpers --------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired difference ``a - b``: mean and its standard error over pairs."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"mean": float(d.mean()), "se": se, "n": len(d)}


def pct(s: dict[str, float]) -> str:
    """``mean ± std`` of a fraction, in percent."""
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def pp(s: dict[str, float]) -> str:
    """A paired difference of fractions in percentage points, ``+x.xx ± se``."""
    return f"{100 * s['mean']:+.2f} ± {100 * s['se']:.2f}"


def stats_gap(ref: M.Stats, other: M.Stats) -> dict[str, float]:
    """How far ``other`` is from ``ref`` over all channels of all BN layers.

    ``mean_shift``: RMS of ``(mean_other - mean_ref) / std_ref``; ``log_var_ratio``: RMS of
    ``ln(var_other / var_ref)``.
    """
    shifts, logs = [], []
    for (m0, v0), (m1, v1) in zip(ref, other, strict=True):
        s0 = np.sqrt(v0.astype(np.float64) + M.EPS)
        shifts.append((m1 - m0) / s0)
        logs.append(np.log((v1.astype(np.float64) + M.EPS) / (v0 + M.EPS)))
    rms = lambda a: float(np.sqrt(np.mean(np.concatenate(a) ** 2)))  # noqa: E731
    return {"mean_shift": rms(shifts), "log_var_ratio": rms(logs)}


# -- output helpers ------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731  (a literal | would end the cell)
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(name: str, title: str, intro: str, tables: str, result: dict, fig) -> None:
    """``docs/experiments/{name}.md``, ``.json`` and ``.png`` (under :data:`OUT_DIR`)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"{name}.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    md = f"# {title}\n\n{intro.strip()}\n\n![{name}]({name}.png)\n\n{tables}"
    md += f"\nRaw numbers: [`{name}.json`]({name}.json). Regenerate: `make experiment`.\n"
    (OUT_DIR / f"{name}.md").write_text(md)
    fig.savefig(OUT_DIR / f"{name}.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- seeds ---------------------------------------------------------------------------------------


def run_seeds(fn: Callable[[int], dict], seeds: Sequence[int], jobs: int) -> list[dict]:
    """``[fn(s) for s in seeds]``, in ``jobs`` processes (results do not depend on ``jobs``)."""
    if jobs <= 1 or len(seeds) == 1:
        return [fn(s) for s in seeds]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(jobs, len(seeds))) as pool:
        return pool.map(fn, seeds)
