"""Every experiment by name, in run order, and how a selection of them is run.

To add an experiment: write a module that declares ``EXPERIMENT = Experiment(...)``
(:mod:`demo.experiments.spec`) and list it in :data:`EXPERIMENTS`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Sequence

from demo.experiments import (
    common,
    conv_estimators,
    conv_shift,
    domain_shift,
    early_export,
    large_batch,
    sample_count,
    small_batch,
    unfold_sources,
    weight_averaging,
)
from demo.experiments.spec import Experiment

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        small_batch.EXPERIMENT,
        large_batch.EXPERIMENT,
        weight_averaging.EXPERIMENT,
        sample_count.EXPERIMENT,
        domain_shift.EXPERIMENT,
        conv_shift.EXPERIMENT,
        unfold_sources.EXPERIMENT,
        conv_estimators.EXPERIMENT,
        early_export.EXPERIMENT,
    )
}


def run_one(experiment: Experiment, seeds: Sequence[int], jobs: int, shared: dict[str, object]) -> dict:
    """Run ``experiment``, computing into ``shared`` whatever input it needs that is not there yet."""
    for need in experiment.needs:
        if need.name not in shared:
            shared[need.name] = need.compute(seeds, jobs)
    return experiment.run(seeds, jobs, **{need.name: shared[need.name] for need in experiment.needs})


def run(names: Collection[str], seeds: Sequence[int], jobs: int) -> None:
    """Run the experiments in ``names`` in registry order; log each one's time to stderr."""
    shared: dict[str, object] = {}
    t_all = time.perf_counter()
    for name, experiment in EXPERIMENTS.items():
        if name not in names:
            continue
        t0 = time.perf_counter()
        run_one(experiment, seeds, jobs, shared)
        print(
            f"{name}: {time.perf_counter() - t0:.1f} s -> {common.OUT_DIR / name}.md",
            file=sys.stderr,
            flush=True,
        )
    print(f"total {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
