"""Experiments 1 and 2 share this: EMA vs Precise BN statistics of the same weights, per epoch.

:func:`per_epoch_run` trains once and, after every epoch, evaluates the weights with four sets
of statistics (:data:`VARIANTS`); :func:`per_epoch_experiment` runs it over seeds and writes
the tables, JSON and plot. :mod:`demo.experiments.small_batch` and
:mod:`demo.experiments.large_batch` only choose the training configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial

import numpy as np

from demo import model as M
from demo.experiments.common import (
    CONVENTIONS,
    SPLIT_SEED,
    Split,
    get_split,
    md_table,
    mean_std,
    paired,
    pct,
    pp,
    pyplot,
    run_seeds,
    stats_gap,
    write_outputs,
)

VARIANTS = ("ema_pytorch", "ema_flax", "precise_population", "precise_mean_of_variances")
LABELS = {
    "ema_pytorch": "EMA, PyTorch (momentum 0.1)",
    "ema_flax": "EMA, Keras/Flax (momentum 0.99)",
    "precise_population": "Precise BN, population",
    "precise_mean_of_variances": "Precise BN, mean of variances",
}
STYLES = {
    "ema_pytorch": "C0-o",
    "ema_flax": "C1-s",
    "precise_population": "C2-^",
    "precise_mean_of_variances": "C3--",
}
DIFFERENCES = (  # summary key, label, plot style
    ("population_minus_ema_pytorch", "population − EMA PyTorch", "C0-o"),
    ("population_minus_ema_flax", "population − EMA Keras/Flax", "C1-s"),
    ("mov_minus_population", "mean of variances − population", "C3--"),
)


def per_epoch_run(seed: int, cfg: M.TrainConfig, split: Split | None = None) -> dict:
    """Train once; after every epoch evaluate the same weights with four sets of statistics.

    Precise BN: one pass over the training set in stored order, batch size = training batch
    size, weights fixed. Also records how far each EMA is from the population statistics.
    """
    sp = split or get_split()
    cfg = replace(cfg, seed=seed)
    rows: list[dict] = []

    def on_epoch(epoch: int, params: M.Params, trackers: dict[str, M.EMATracker]) -> None:
        both = M.precise_stats(params, sp.x_train, cfg.batch_size, "both")
        row: dict = {"epoch": epoch, "ema_updates": trackers["pytorch"].updates}
        sets = {f"ema_{n}": t.stats for n, t in trackers.items()}
        sets.update({f"precise_{e}": s for e, s in both.items()})
        for key, st in sets.items():
            row[key] = M.accuracy(params, st, sp.x_test, sp.y_test)
            row[f"gap_{key}"] = stats_gap(both["population"], st)
        rows.append(row)

    M.train(sp.x_train, sp.y_train, cfg, CONVENTIONS, on_epoch)
    return {"seed": seed, "epochs": rows}


def summarize_epochs(runs: Sequence[dict]) -> list[dict]:
    """Per epoch: each variant's accuracy and statistics gap over seeds, and paired differences."""
    epochs = [r["epoch"] for r in runs[0]["epochs"]]
    col = lambda e, k: [r["epochs"][e - 1][k] for r in runs]  # noqa: E731
    summary = []
    for e in epochs:
        s = {"epoch": e, "ema_updates": runs[0]["epochs"][e - 1]["ema_updates"]}
        for v in VARIANTS:
            s[v] = mean_std(col(e, v))
            s[f"gap_{v}"] = {
                k: mean_std([g[k] for g in col(e, f"gap_{v}")]) for k in ("mean_shift", "log_var_ratio")
            }
        s["population_minus_ema_pytorch"] = paired(col(e, "precise_population"), col(e, "ema_pytorch"))
        s["population_minus_ema_flax"] = paired(col(e, "precise_population"), col(e, "ema_flax"))
        s["mov_minus_population"] = paired(col(e, "precise_mean_of_variances"), col(e, "precise_population"))
        summary.append(s)
    return summary


def epoch_tables(summary: Sequence[dict]) -> str:
    """The accuracy table and the paired-differences / EMA-gap table, in markdown."""
    header = ["epoch", "EMA updates", *(LABELS[v] for v in VARIANTS)]
    rows = [[s["epoch"], s["ema_updates"], *(pct(s[v]) for v in VARIANTS)] for s in summary]
    t1 = "Test accuracy (%), mean ± std over seeds:\n\n" + md_table(header, rows)
    header2 = [
        "epoch",
        "population − EMA PyTorch",
        "population − EMA Keras/Flax",
        "mean of variances − population",
        "EMA PyTorch gap (mean shift / log var)",
        "EMA Keras/Flax gap",
    ]
    rows2 = [
        [
            s["epoch"],
            pp(s["population_minus_ema_pytorch"]),
            pp(s["population_minus_ema_flax"]),
            pp(s["mov_minus_population"]),
            f"{s['gap_ema_pytorch']['mean_shift']['mean']:.3f} / {s['gap_ema_pytorch']['log_var_ratio']['mean']:.3f}",
            f"{s['gap_ema_flax']['mean_shift']['mean']:.3f} / {s['gap_ema_flax']['log_var_ratio']['mean']:.3f}",
        ]
        for s in summary
    ]
    t2 = (
        "\nPaired differences of test accuracy (percentage points, mean ± standard error over seeds), "
        "and how far each EMA is from the population statistics of the same weights (RMS over channels "
        "of the mean shift in population std units / of ln(var_EMA / var_population)):\n\n"
        + md_table(header2, rows2)
    )
    return t1 + t2


def _plot_error(ax, x: np.ndarray, summary: Sequence[dict]) -> None:
    for v in VARIANTS:
        m = np.array([100 * (1 - s[v]["mean"]) for s in summary])
        sd = np.array([100 * s[v]["std"] for s in summary])
        ax.plot(x, m, STYLES[v], label=LABELS[v], ms=4)
        ax.fill_between(x, m - sd, m + sd, color=STYLES[v][:2], alpha=0.12)
    ax.set(xlabel="epoch", ylabel="test error (%)", yscale="log", title="Test error, mean ± std")
    ax.legend(fontsize=8)


def _plot_differences(ax, x: np.ndarray, summary: Sequence[dict]) -> None:
    for key, lab, st in DIFFERENCES:
        ax.errorbar(
            x,
            [100 * s[key]["mean"] for s in summary],
            [100 * s[key]["se"] for s in summary],
            fmt=st,
            label=lab,
            ms=4,
            capsize=2,
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="epoch", ylabel="accuracy difference (pp)", title="Paired differences, mean ± SE")
    ax.legend(fontsize=8)


def _plot_gaps(ax, x: np.ndarray, summary: Sequence[dict]) -> None:
    for v, st in (("ema_pytorch", "C0-o"), ("ema_flax", "C1-s")):
        ax.plot(
            x,
            [s[f"gap_{v}"]["log_var_ratio"]["mean"] for s in summary],
            st,
            label=f"{LABELS[v]}: |ln var ratio|",
            ms=4,
        )
        ax.plot(
            x,
            [s[f"gap_{v}"]["mean_shift"]["mean"] for s in summary],
            st.replace("-", ":"),
            label=f"{LABELS[v]}: mean shift",
            ms=4,
            alpha=0.7,
        )
    ax.set(xlabel="epoch", ylabel="RMS over channels", yscale="log", title="EMA vs population statistics")
    ax.legend(fontsize=7)


def plot_epochs(summary: Sequence[dict], title: str):
    """Three panels: test error, paired differences, EMA-vs-population gap; returns the figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.array([s["epoch"] for s in summary])
    _plot_error(axes[0], x, summary)
    _plot_differences(axes[1], x, summary)
    _plot_gaps(axes[2], x, summary)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def per_epoch_experiment(
    name: str, cfg: M.TrainConfig, seeds: Sequence[int], jobs: int, title: str, intro: str
) -> dict:
    """Experiments 1 and 2: tables, JSON and plot of :func:`per_epoch_run` over seeds."""
    runs = run_seeds(partial(per_epoch_run, cfg=cfg), seeds, jobs)
    summary = summarize_epochs(runs)
    fig = plot_epochs(summary, title)
    result = {
        "config": asdict(cfg),
        "seeds": list(seeds),
        "split_seed": SPLIT_SEED,
        "summary": summary,
        "runs": runs,
    }
    write_outputs(name, title, intro, epoch_tables(summary), result, fig)
    return result
