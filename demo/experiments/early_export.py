"""Experiment 9: a checkpoint exported early, its BN folded from a lagging EMA, then unfolded.

The weights after epoch :data:`~demo.experiments.conv_common.EARLY_EPOCH` of the conv nets of
experiment 6, exported as a Keras-convention model would be then: BN statistics from the EMA
with momentum 0.99, which after one epoch still carries its initial mean 0 / variance 1 and
lags the weights. Folded from that EMA, unfolding reproduces those statistics, error included;
folded from Precise BN of the same weights, it is exact. Same arms and measures as experiment 6
(:func:`demo.experiments.conv_shift.shift_seed`), on the main shifts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from demo.experiments import conv_shift as S
from demo.experiments.common import mean_std, run_seeds, write_outputs
from demo.experiments.conv_common import CONV_MODEL, CONV_RUNS, EARLY_EPOCH, POOL
from demo.experiments.spec import Experiment

NAME = "early_export"
TITLE = "9. An early checkpoint folded from a lagging EMA: unfolding keeps the EMA's error (conv net)"
SHIFTS = ("clean", "contrast+brightness", "noise")


def early_seed(run: dict) -> dict:
    """Experiment 6's arms for one seed's early checkpoint (its Keras-convention EMA as ``ema``)."""
    return S.shift_seed({"seed": run["seed"], **run["early"]}, SHIFTS)


def intro(seeds: Sequence[int]) -> str:
    """The protocol paragraph."""
    return f"""The conv nets of experiment 6 after epoch {EARLY_EPOCH} of {CONV_MODEL.epochs} ({4000 // CONV_MODEL.batch_size}
steps, learning rate still high), exported as a Keras/TF model would be at that point: BN statistics
from the Keras-convention EMA (momentum 0.99, biased batch variance), which after
{4000 // CONV_MODEL.batch_size * EARLY_EPOCH} updates still gives {0.99 ** (4000 // CONV_MODEL.batch_size * EARLY_EPOCH):.0%} weight to its initial mean 0 /
variance 1 and lags the moving weights. "EMA" columns: the BN-kept model with those statistics,
and the model folded from them; "Precise BN" columns: the same weights with Precise BN over the
4,000 training images. Then exactly experiment 6's protocol: {POOL} unlabeled calibration images per
shift, {1000 - POOL} for evaluation, unfold on the 4,000 training images with `bnref-onnx`. The BN-kept
recalibration does not depend on the stored statistics, so it is the same for both. {len(seeds)} seeds."""


def early_export(seeds: Sequence[int], jobs: int, conv_runs: Sequence[dict]) -> dict:
    """Experiment 9."""
    runs = run_seeds(early_seed, list(conv_runs), jobs)
    summary = S.summarize(runs, SHIFTS)
    summary["ema_vs_precise"] = {
        key: mean_std([r["ema_vs_precise"][key] for r in runs]) for key in ("mean_shift", "log_var_ratio")
    }
    gap = summary["ema_vs_precise"]
    tables = S.tables(summary, SHIFTS, 1000 - POOL) + (
        f"\nThe EMA's distance from the population (Precise BN) statistics of the same weights, RMS over "
        f"channels: mean {gap['mean_shift']['mean']:.2f} ± {gap['mean_shift']['std']:.2f} standard deviations, "
        f"ln variance ratio {gap['log_var_ratio']['mean']:.2f} ± {gap['log_var_ratio']['std']:.2f} (mean ± std over seeds).\n"
    )
    result = {"model": asdict(CONV_MODEL), "early_epoch": EARLY_EPOCH, "seeds": list(seeds), "summary": summary,
              "runs": runs}
    arms = (("none_ema", "as exported (EMA)"), *S.ARMS[1:])
    write_outputs(NAME, TITLE, intro(seeds), tables, result, S.plot(summary, SHIFTS, TITLE, arms))
    return result


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=early_export, needs=(CONV_RUNS,))
