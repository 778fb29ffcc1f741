"""Experiment 4: Precise BN from ~10^2, ~10^3 and all training samples, random draws.

It reuses the SWA weights of experiment 3 (:data:`~demo.experiments.weight_averaging.SWA_RUNS`),
which must be recalibrated anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from demo import model as M
from demo.experiments.common import (
    Split,
    get_split,
    md_table,
    mean_std,
    paired,
    pct,
    pp,
    pyplot,
    stats_gap,
    write_outputs,
)
from demo.experiments.spec import Experiment
from demo.experiments.weight_averaging import SWA_PHASE, SWA_RUNS

NAME = "sample_count"
TITLE = "4. How many samples Precise BN needs"
SAMPLE_COUNTS = (128, 1024, None)  # ~10^2, ~10^3, all (3,488 = 109 whole batches of 32)
KEYS = [("all" if n is None else str(n)) for n in SAMPLE_COUNTS]
DRAWS = 10


def n_used(key: str, bs: int) -> int:
    """How many samples a count uses: "all" means every whole batch of ``bs``."""
    return 3500 // bs * bs if key == "all" else int(key)


def seed_draws(run: dict, sp: Split, bs: int) -> dict:
    """For one seed's SWA weights: accuracy and statistics gap of every draw of every count."""
    params, seed = run["_swa_params"], run["seed"]
    ref = M.precise_stats(params, sp.x_train, bs)  # all samples, stored order
    rec = {"seed": seed}
    for n in SAMPLE_COUNTS:
        key = "all" if n is None else str(n)
        accs, gaps = [], []
        for d in range(DRAWS):
            st = M.precise_stats(
                params, sp.x_train, bs, rng=np.random.default_rng([seed, 4, d]), num_samples=n
            )
            accs.append(M.accuracy(params, st, sp.x_test, sp.y_test))
            gaps.append(stats_gap(ref, st))
        rec[key] = {
            "acc": accs,
            "mean_shift": [g["mean_shift"] for g in gaps],
            "log_var_ratio": [g["log_var_ratio"] for g in gaps],
        }
    return rec


def summarize_counts(per_seed: Sequence[dict]) -> dict:
    """Per count: accuracy over seeds, spread over draws, worst draw, paired gap to "all"."""
    summary = {}
    for k in KEYS:
        seed_means = [np.mean(r[k]["acc"]) for r in per_seed]
        within = [np.std(r[k]["acc"], ddof=1) for r in per_seed]
        allv = np.concatenate([r[k]["acc"] for r in per_seed])
        summary[k] = {
            "acc_over_seeds": mean_std(seed_means),
            "within_seed_std": float(np.mean(within)),
            "worst_draw": float(allv.min()),
            "minus_all": paired(seed_means, [np.mean(r["all"]["acc"]) for r in per_seed]),
            "mean_shift": mean_std([np.mean(r[k]["mean_shift"]) for r in per_seed]),
            "log_var_ratio": mean_std([np.mean(r[k]["log_var_ratio"]) for r in per_seed]),
        }
    return summary


def count_table(summary: dict, bs: int) -> str:
    """One markdown row per sample count."""
    rows = []
    for k in KEYS:
        s, n = summary[k], n_used(k, bs)
        rows.append(
            [
                f"{n} ({n // bs} batches)",
                pct(s["acc_over_seeds"]),
                f"{100 * s['within_seed_std']:.2f}",
                f"{100 * s['worst_draw']:.2f}",
                pp(s["minus_all"]),
                f"{s['mean_shift']['mean']:.3f}",
                f"{s['log_var_ratio']['mean']:.3f}",
            ]
        )
    header = [
        "samples",
        "test acc (%) mean ± std over seeds",
        "std over draws (pp)",
        "worst draw (%)",
        "− all samples (pp ± SE)",
        "mean shift (RMS, std units)",
        "RMS ln var ratio",
    ]
    return md_table(header, rows)


def plot_counts(per_seed: Sequence[dict], bs: int):
    """Every draw's accuracy change and variance error against the sample count; returns the figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = [n_used(k, bs) for k in KEYS]
    for i, r in enumerate(per_seed):
        base = np.mean(r["all"]["acc"])
        for x, k in zip(xs, KEYS, strict=True):
            jitter = x * np.exp(0.05 * (i - (len(per_seed) - 1) / 2) + np.linspace(-0.02, 0.02, DRAWS))
            axes[0].plot(jitter, 100 * (np.array(r[k]["acc"]) - base), ".", color=f"C{i}", ms=4)
            axes[1].plot(jitter, r[k]["log_var_ratio"], ".", color=f"C{i}", ms=4)
    axes[0].axhline(0, color="k", lw=0.8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("Precise BN samples (random draw)")
    axes[0].set(
        ylabel="accuracy − same seed's all-sample mean (pp)",
        title="every draw (colour = seed)",
    )
    axes[1].set(yscale="log", ylabel="RMS ln(var / var_all)", title="variance error vs all-sample stats")
    fig.suptitle("4. How many samples Precise BN needs (SWA weights, batch 32)", fontsize=11)
    return fig


def intro(seeds: Sequence[int], bs: int) -> str:
    """The protocol paragraph of ``sample_count.md``."""
    return f"""The SWA weights of experiment 3 (which must be recalibrated) get Precise BN (`population`,
batch {bs}) from a random draw of 128 (~10²), 1,024 (~10³) or all 3,488 (109 whole batches)
training digits; {DRAWS} draws per seed, {len(seeds)} seeds. "all" differs between draws only in how
the samples are grouped into batches. Statistics error is measured against the all-samples
statistics in stored order."""


def sample_count(seeds: Sequence[int], jobs: int, swa_runs: list[dict]) -> dict:
    """Experiment 4, on the SWA weights of experiment 3 (which need recalibration anyway)."""
    sp = get_split()
    bs = SWA_PHASE.batch_size
    per_seed = [seed_draws(r, sp, bs) for r in swa_runs]
    summary = summarize_counts(per_seed)
    fig = plot_counts(per_seed, bs)
    result = {
        "batch_size": bs,
        "draws": DRAWS,
        "sample_counts": KEYS,
        "seeds": list(seeds),
        "summary": summary,
        "runs": per_seed,
    }
    write_outputs(NAME, TITLE, intro(seeds, bs), count_table(summary, bs), result, fig)
    return result


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=sample_count, needs=(SWA_RUNS,))
