"""Experiment 1: batch 16, EMA (PyTorch 0.1, Keras/Flax 0.99) vs Precise BN, per epoch."""

from __future__ import annotations

from collections.abc import Sequence

from demo import model as M
from demo.experiments.per_epoch import per_epoch_experiment
from demo.experiments.spec import Experiment

NAME = "small_batch"
SMALL = M.TrainConfig(batch_size=16, epochs=8, lr=0.05)
TITLE = f"1. Small training batch ({SMALL.batch_size}): EMA vs Precise BN, per epoch"


def intro(seeds: Sequence[int]) -> str:
    """The protocol paragraph of ``small_batch.md``."""
    return f"""MLP 784-256-128-10 with BN after each hidden Linear, SGD momentum 0.9, lr {SMALL.lr} cosine
to 0 over {SMALL.epochs} epochs, batch {SMALL.batch_size}, weight decay {SMALL.weight_decay}, {len(seeds)} seeds.
After every epoch the *same weights* are evaluated on the 1,500 test digits with four sets of BN
statistics: the EMA tracked during training in PyTorch's convention (momentum 0.1, unbiased
variance) and in Keras/Flax's (momentum 0.99, biased), and Precise BN over one pass of the 3,500
training digits in training mode (batch {SMALL.batch_size}, weights fixed), `population` and
`mean_of_variances`."""


def small_batch(seeds: Sequence[int], jobs: int) -> dict:
    """Experiment 1."""
    return per_epoch_experiment(NAME, SMALL, seeds, jobs, TITLE, intro(seeds))


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=small_batch)
