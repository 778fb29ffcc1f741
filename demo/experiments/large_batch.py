"""Experiment 2: batch 256, only 13 EMA updates per epoch: EMA vs Precise BN, per epoch."""

from __future__ import annotations

from collections.abc import Sequence

from demo import model as M
from demo.experiments.per_epoch import per_epoch_experiment
from demo.experiments.spec import Experiment

NAME = "large_batch"
LARGE = M.TrainConfig(batch_size=256, epochs=15, lr=0.4)
UPDATES_PER_EPOCH = 3500 // LARGE.batch_size
TITLE = (
    f"2. Large training batch ({LARGE.batch_size}, {UPDATES_PER_EPOCH} EMA updates per epoch): "
    "EMA vs Precise BN"
)


def intro(seeds: Sequence[int]) -> str:
    """The protocol paragraph of ``large_batch.md``."""
    per_epoch = UPDATES_PER_EPOCH
    return f"""Same network and protocol as experiment 1, but batch {LARGE.batch_size} (lr {LARGE.lr} cosine to 0
over {LARGE.epochs} epochs): only {per_epoch} optimizer steps, hence {per_epoch} EMA updates, per epoch.
With momentum 0.99 an EMA still holds 0.99^{per_epoch} = {0.99**per_epoch:.0%} of its initial value
(mean 0, variance 1) after the first epoch and 0.99^{per_epoch * LARGE.epochs} = {0.99 ** (per_epoch * LARGE.epochs):.0%}
after the last one."""


def large_batch(seeds: Sequence[int], jobs: int) -> dict:
    """Experiment 2."""
    return per_epoch_experiment(NAME, LARGE, seeds, jobs, TITLE, intro(seeds))


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=large_batch)
