"""``python -m demo.experiments [NAME ...] [--seeds N] [--jobs J]`` (``make experiment``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from demo import experiments as package
from demo.experiments import registry


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiments named on the command line (default: all) and write their outputs."""
    known = list(registry.EXPERIMENTS)
    ap = argparse.ArgumentParser(
        prog="python -m demo.experiments", description=package.__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"experiments to run: {', '.join(known)} (default: all)",
    )
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    args = ap.parse_args(argv)
    names = args.names or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        ap.error(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(known)}")
    registry.run(names, list(range(args.seeds)), args.jobs)
    return 0
