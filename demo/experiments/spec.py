"""What an experiment is: a name, a title, a run, and the shared inputs it needs.

Each experiment module declares one :class:`Experiment` (``EXPERIMENT``); the registry
(:mod:`demo.experiments.registry`) lists them in run order. A :class:`SharedInput` is a costly
intermediate result that several experiments use (the SWA runs of experiment 3, reused by
experiment 4): the registry computes it once per invocation, the first time an experiment
needs it, and passes it to ``run`` as the keyword argument named after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SharedInput:
    """An intermediate result computed once and passed to every experiment that needs it."""

    name: str  # the keyword under which ``Experiment.run`` receives it
    compute: Callable[[Sequence[int], int], object]  # (seeds, jobs) -> value


@dataclass(frozen=True)
class Experiment:
    """One experiment: ``run(seeds, jobs, **needs)`` writes ``docs/experiments/{name}.*``."""

    name: str  # command-line name and output file stem
    title: str  # the heading of its ``.md``
    run: Callable[..., dict]  # (seeds, jobs, **{need.name: value}) -> the JSON result
    needs: tuple[SharedInput, ...] = ()
