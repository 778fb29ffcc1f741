"""What the conv-net experiments (6-9) share: the split, the trained nets, and ``recalibrate --source``.

* :func:`get_conv_split` — the fixed 4,000 / 1,000 train/test split (split seed 0).
* :data:`CONV_RUNS` — the trained conv nets, one per seed, computed once per invocation
  (:class:`~demo.experiments.spec.SharedInput`): weights, EMA statistics and Precise BN
  statistics over the 4,000 training images (batch :data:`SOURCE_BATCH`, stored order).
* :func:`tool_adapt` — ``onnx_tools.recalibrate(FOLDED, TARGET, source=SOURCE)``, what
  ``bnref-onnx recalibrate FOLDED --data TARGET --source SOURCE`` runs.
* :func:`target_split` — per seed, which test images calibrate (unlabeled) and which evaluate.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from bnref.conventions import KERAS, PYTORCH
from demo import convnet as C
from demo.experiments.common import Split, get_split, run_seeds
from demo.experiments.spec import SharedInput
from demo.model import EMATracker

CONV_TEST_FRACTION = 0.2  # 4,000 train / 1,000 test
CONV_MODEL = C.ConvConfig(batch_size=32, epochs=5, lr=0.1)
SOURCE_BATCH = 64  # Precise BN before folding, unfold and recalibration all use batches of 64
EARLY_EPOCH = 1  # experiment 9's checkpoint
POOL = 512  # calibration images: the first 512 of a seeded permutation of the test split
EPS_PRIME = 1e-5  # the inserted BNs' epsilon (bn_eps), tool and NumPy reference alike: the BN's own


def get_conv_split() -> Split:
    """The mnist5k digits split 4,000 / 1,000 (split seed :data:`~demo.experiments.common.SPLIT_SEED`)."""
    return get_split("mnist5k", CONV_TEST_FRACTION)


def target_split(seed: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pool, held)`` test indices: :data:`POOL` calibration images and the rest for evaluation."""
    perm = np.random.default_rng([seed, 5]).permutation(n_test)
    return perm[:POOL], perm[POOL:]


def conv_run(seed: int, split: Split | None = None, cfg: C.ConvConfig = CONV_MODEL) -> dict:
    """Train one conv net; its EMA (PyTorch convention) and Precise BN statistics, clean accuracy.

    ``early`` is the checkpoint after epoch :data:`EARLY_EPOCH` as it would be exported then: its
    weights, the Keras-convention EMA (momentum 0.99) at that point, and its Precise BN
    statistics. EMA tracking does not change training, so the final weights are the same.
    """
    sp = split or get_conv_split()
    trackers = {"pytorch": EMATracker(PYTORCH, cfg.widths), "keras": EMATracker(KERAS, cfg.widths)}
    early: dict = {}

    def keep_early(epoch: int, params: dict, live: dict) -> None:
        if epoch == EARLY_EPOCH:
            early.update(params=copy.deepcopy(params), ema=live["keras"].snapshot())

    params, trackers = C.train(sp.x_train, sp.y_train, replace(cfg, seed=seed), trackers, keep_early)
    ema = trackers["pytorch"].snapshot()
    precise = C.precise_stats(params, sp.x_train, SOURCE_BATCH)
    early["precise"] = C.precise_stats(early["params"], sp.x_train, SOURCE_BATCH)
    return {
        "seed": seed,
        "params": params,
        "ema": ema,
        "precise": precise,
        "early": early,
        "clean_acc_ema": C.accuracy(params, ema, sp.x_test, sp.y_test),
        "clean_acc_precise": C.accuracy(params, precise, sp.x_test, sp.y_test),
    }


def _compute_conv_runs(seeds: Sequence[int], jobs: int) -> list[dict]:
    return run_seeds(conv_run, seeds, jobs)


#: The trained conv nets of every seed, shared by experiments 6-9.
CONV_RUNS = SharedInput("conv_runs", _compute_conv_runs)


def tool_adapt(folded_model, x_target: np.ndarray, x_source: np.ndarray):
    """``bnref-onnx recalibrate FOLDED --data TARGET --source SOURCE``: its result.

    ``.model`` is the adapted ONNX model, ``.unfolded.statistics`` the inserted BNs' source
    statistics; source and target batches of :data:`SOURCE_BATCH`.
    """
    import onnx_tools
    from demo.conv_export import nchw

    return onnx_tools.recalibrate(
        folded_model, nchw(x_target), source=nchw(x_source), bn_eps=EPS_PRIME, batch_size=SOURCE_BATCH,
        provider="cpu",
    )


def logit_gap(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """``max |other - ref| / max |ref|`` and the top-1 agreement of two logit arrays."""
    return {
        "rel_max_diff": float(np.abs(other - ref).max() / np.abs(ref).max()),
        "top1_agreement": float((other.argmax(1) == ref.argmax(1)).mean()),
    }


__all__ = [
    "CONV_MODEL",
    "CONV_RUNS",
    "POOL",
    "SOURCE_BATCH",
    "EPS_PRIME",
    "get_conv_split",
    "target_split",
    "conv_run",
    "tool_adapt",
    "logit_gap",
]
