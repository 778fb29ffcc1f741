"""Experiment 3: SWA — averaged weights with averaged / last / recalibrated statistics.

:func:`swa_run` (one seed) is also the input of experiment 4 (:data:`SWA_RUNS`): its
``"_swa_params"`` entry holds the averaged weights and is left out of the JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

import numpy as np

from demo import model as M
from demo.experiments.common import (
    CONVENTIONS,
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
from demo.experiments.spec import Experiment, SharedInput

NAME = "weight_averaging"
TITLE = "3. Weight averaging (SWA): averaged weights need their own statistics"
SWA_PRE = M.TrainConfig(batch_size=32, epochs=6, lr=0.05, schedule="cosine", final_lr_factor=0.4)
SWA_PHASE = M.TrainConfig(batch_size=32, epochs=6, lr=0.05, schedule="constant")
SWA_VARIANTS = {
    "last": "last checkpoint, its own EMA (no averaging)",
    "swa_avg_ema": "SWA weights + averaged EMA statistics",
    "swa_last_ema": "SWA weights + last checkpoint's EMA statistics",
    "swa_population": "SWA weights + Precise BN, population",
    "swa_mean_of_variances": "SWA weights + Precise BN, mean of variances (torch update_bn)",
}
KEYS = [*SWA_VARIANTS, "last_population"]
SHORT_LABELS = {  # x tick labels of the plot
    "last": "last ckpt\n+ its EMA",
    "swa_avg_ema": "SWA\n+ averaged EMA",
    "swa_last_ema": "SWA\n+ last ckpt's EMA",
    "swa_population": "SWA\n+ Precise BN\n(population)",
    "swa_mean_of_variances": "SWA\n+ Precise BN\n(mean of var.,\nupdate_bn)",
    "last_population": "last ckpt\n+ Precise BN\n(population)",
}


def average_stats(stats: Sequence[M.Stats]) -> M.Stats:
    """Element-wise average of several statistics sets (what averaging state dicts does)."""
    return [
        (np.mean([s[i][0] for s in stats], axis=0), np.mean([s[i][1] for s in stats], axis=0))
        for i in range(len(stats[0]))
    ]


def average_params(params: Sequence[M.Params]) -> M.Params:
    """Element-wise average of several weight sets (SWA / uniform soup)."""
    return {k: np.mean([p[k] for p in params], axis=0).astype(np.float32) for k in params[0]}


def swa_run(
    seed: int, split: Split | None = None, pre: M.TrainConfig = SWA_PRE, phase: M.TrainConfig = SWA_PHASE
) -> dict:
    """Train, then average the checkpoints of the last ``phase.epochs`` epochs (constant lr)."""
    sp = split or get_split()
    params, trackers = M.train(sp.x_train, sp.y_train, replace(pre, seed=seed), CONVENTIONS)
    ckpts: list[tuple[M.Params, M.Stats]] = []
    M.train(
        sp.x_train,
        sp.y_train,
        replace(phase, seed=seed),
        params=params,
        trackers=trackers,
        stream=2,
        on_epoch=lambda e, p, t: ckpts.append(({k: v.copy() for k, v in p.items()}, t["pytorch"].snapshot())),
    )
    swa = average_params([c[0] for c in ckpts])
    last_p, last_s = ckpts[-1]
    both = M.precise_stats(swa, sp.x_train, phase.batch_size, "both")
    sets = {
        "last": (last_p, last_s),
        "swa_avg_ema": (swa, average_stats([c[1] for c in ckpts])),
        "swa_last_ema": (swa, last_s),
        "swa_population": (swa, both["population"]),
        "swa_mean_of_variances": (swa, both["mean_of_variances"]),
    }
    out = {"seed": seed}
    for k, (p, s) in sets.items():
        out[k] = M.accuracy(p, s, sp.x_test, sp.y_test)
        out[f"gap_{k}"] = stats_gap(both["population"], s) if p is swa else None
    out["last_population"] = M.accuracy(
        last_p, M.precise_stats(last_p, sp.x_train, phase.batch_size), sp.x_test, sp.y_test
    )
    out["_swa_params"] = swa  # for experiment 4 (not written to JSON)
    return out


SWA_RUNS = SharedInput("swa_runs", lambda seeds, jobs: run_seeds(swa_run, seeds, jobs))


def summarize_swa(runs: Sequence[dict]) -> tuple[dict, dict, dict, dict]:
    """Per-variant accuracies over seeds, their summaries, paired differences and statistics gaps."""
    acc = {k: [r[k] for r in runs] for k in KEYS}
    summary = {k: mean_std(v) for k, v in acc.items()}
    diffs = {
        "swa_population - swa_avg_ema": paired(acc["swa_population"], acc["swa_avg_ema"]),
        "swa_population - swa_last_ema": paired(acc["swa_population"], acc["swa_last_ema"]),
        "swa_mean_of_variances - swa_population": paired(acc["swa_mean_of_variances"], acc["swa_population"]),
        "swa_population - last": paired(acc["swa_population"], acc["last"]),
        "last_population - last": paired(acc["last_population"], acc["last"]),
    }
    gaps = {
        k: {g: mean_std([r[f"gap_{k}"][g] for r in runs]) for g in ("mean_shift", "log_var_ratio")}
        for k in SWA_VARIANTS
        if k.startswith("swa_")
    }
    return acc, summary, diffs, gaps


def swa_tables(summary: dict, diffs: dict, gaps: dict) -> str:
    """The accuracy / gap table and the paired-differences table, in markdown."""
    labels = {**SWA_VARIANTS, "last_population": "last checkpoint + Precise BN, population"}
    rows = [
        [
            labels[k],
            pct(summary[k]),
            f"{gaps[k]['mean_shift']['mean']:.3f} / {gaps[k]['log_var_ratio']['mean']:.3f}"
            if k in gaps
            else "—",
        ]
        for k in KEYS
    ]
    t1 = md_table(
        ["weights + statistics", "test accuracy (%)", "gap to population (mean shift / ln var)"], rows
    )
    t2 = "\nPaired differences (pp, mean ± SE over seeds):\n\n" + md_table(
        ["difference", "pp"], [[k.replace("_", " "), pp(v)] for k, v in diffs.items()]
    )
    return t1 + t2


def plot_swa(acc: dict):
    """Bars (mean ± std) and per-seed dots of each variant's accuracy; returns the figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, k in enumerate(KEYS):
        v = 100 * np.array(acc[k])
        ax.bar(i, v.mean(), yerr=v.std(ddof=1), color=f"C{i}", alpha=0.7, capsize=3)
        ax.plot(np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), v, "k.", ms=3)
    ax.set_xticks(range(len(KEYS)), [SHORT_LABELS[k] for k in KEYS], fontsize=8)
    lo = min(100 * min(acc[k]) for k in KEYS)
    ax.set(
        ylabel="test accuracy (%)",
        ylim=(max(0, lo - 1), min(100, 100 * max(max(a) for a in acc.values()) + 0.5)),
        title="3. SWA: which statistics go with averaged weights (bars: mean ± std, dots: seeds)",
    )
    return fig


def intro(seeds: Sequence[int]) -> str:
    """The protocol paragraph of ``weight_averaging.md``."""
    return f"""Train {SWA_PRE.epochs} epochs (batch {SWA_PRE.batch_size}, lr {SWA_PRE.lr} cosine to {SWA_PRE.lr * SWA_PRE.final_lr_factor:g}),
then {SWA_PHASE.epochs} epochs at a constant lr {SWA_PHASE.lr}, keeping a checkpoint (weights + PyTorch-convention
EMA) after each; the SWA weights are the average of those {SWA_PHASE.epochs} checkpoints (BN scale and bias
included). The averaged weights are evaluated with the averaged EMA statistics (what averaging
whole state dicts gives), with the last checkpoint's EMA (what `AveragedModel` keeps without
`update_bn`), and with Precise BN statistics of the averaged weights (one training-mode pass,
batch {SWA_PHASE.batch_size}). {len(seeds)} seeds."""


def weight_averaging(seeds: Sequence[int], jobs: int, swa_runs: list[dict] | None = None) -> dict:
    """Experiment 3 (``swa_runs``: the :func:`swa_run` of each seed, computed here if not given)."""
    runs = swa_runs or SWA_RUNS.compute(seeds, jobs)
    acc, summary, diffs, gaps = summarize_swa(runs)
    fig = plot_swa(acc)
    result = {
        "pre": asdict(SWA_PRE),
        "swa_phase": asdict(SWA_PHASE),
        "seeds": list(seeds),
        "summary": summary,
        "paired": diffs,
        "gaps": gaps,
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs],
    }
    write_outputs(NAME, TITLE, intro(seeds), swa_tables(summary, diffs, gaps), result, fig)
    return result


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=weight_averaging, needs=(SWA_RUNS,))
