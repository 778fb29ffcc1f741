"""Experiment 7: how many source images ``unfold`` needs.

The folded conv net (BN folded from Precise BN over all 4,000 training images) is unfolded on
a random draw of n source images and recalibrated on the unlabeled shifted target; the result
is compared, on the same weights, with recalibrating the BN-kept model (paired). With all 4,000
images in the order they were folded with, unfolding is exact (experiment 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from demo import conv_export as CX
from demo import convnet as C
from demo import data as D
from demo.experiments.common import (
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
from demo.experiments.conv_common import (
    CONV_RUNS,
    POOL,
    SOURCE_BATCH,
    get_conv_split,
    logit_gap,
    target_split,
    tool_adapt,
)
from demo.experiments.spec import Experiment

NAME = "unfold_sources"
TITLE = "7. How many source images unfold needs (conv net, folded model)"
COUNTS = (64, 128, 256, 512, 1024, 2048, 4000)
SHIFTS = ("contrast+brightness", "noise")
DRAWS = 3  # random source draws per count (4,000: the one stored order)


def _source(sp, seed: int, n: int, draw: int) -> np.ndarray:
    if n >= len(sp.x_train):
        return sp.x_train
    return sp.x_train[np.random.default_rng([seed, 7, draw]).permutation(len(sp.x_train))[:n]]


def _draw_cell(folded_model, x_src, targets, y) -> dict:
    """One source draw: per shift, unfold on ``x_src`` and recalibrate (the tool); vs the BN-kept arm.

    ``ustats`` are the inserted BNs' statistics.
    """
    cell = {}
    for sh, (cal, ev, kept) in targets.items():
        res = tool_adapt(folded_model, cal, x_src)
        logits = CX.run_logits(res.model, ev)
        cell[sh] = {"acc": float((logits.argmax(1) == y).mean()), **logit_gap(kept, logits)}
    cell["ustats"] = list(res.unfolded.statistics.values())  # the same for every shift: the last one's
    return cell


def sources_seed(run: dict, split=None) -> dict:
    """Every count, draw and shift for one seed's net."""
    sp = split or get_conv_split()
    params, seed = run["params"], run["seed"]
    folded = C.fold(params, run["precise"])
    folded_model = CX.to_onnx(folded, None)
    pool, held = target_split(seed, len(sp.x_test))
    targets = {}
    for sh in SHIFTS:
        xs = D.apply_shift(sh, sp.x_test, sp.side, seed=seed)
        cal, ev = xs[pool], xs[held]
        kept = C.forward_eval(params, C.precise_stats(params, cal, SOURCE_BATCH), ev)
        targets[sh] = (cal, ev, kept)
    y = sp.y_test[held]
    out = {"seed": seed, "kept": {}, "counts": {}}
    for sh in SHIFTS:
        out["kept"][sh] = float((targets[sh][2].argmax(1) == y).mean())
    # How far the inserted BNs' statistics are from those the model was folded with
    # (in the folded conv's output units: mean beta, variance gamma^2 v/(v + eps)).
    folded_output = _folded_output_stats(params, run["precise"])
    for n in COUNTS:
        cells = []
        for draw in range(1 if n >= len(sp.x_train) else DRAWS):
            cell = _draw_cell(folded_model, _source(sp, seed, n, draw), targets, y)
            cell["stats_gap"] = stats_gap(folded_output, cell.pop("ustats"))
            cells.append(cell)
        out["counts"][str(n)] = cells
    return out


def _folded_output_stats(params, stats) -> list:
    """The population statistics of each folded conv's output on the folding data: (beta, gamma^2 v/(v+eps))."""
    out = []
    for i, (_, v) in enumerate(stats):
        g = params[f"gamma{i}"].astype(np.float64)
        out.append((params[f"beta{i}"], (g * g * v / (v + C.EPS)).astype(np.float32)))
    return out


def summarize(runs: Sequence[dict]) -> dict:
    """Per count and shift: accuracy, paired gap to the BN-kept adaptation, worst logit gap."""
    out = {}
    for n in map(str, COUNTS):
        s = {}
        for sh in SHIFTS:
            acc = [np.mean([c[sh]["acc"] for c in r["counts"][n]]) for r in runs]
            s[sh] = {
                "acc": mean_std(acc),
                "minus_kept": paired(acc, [r["kept"][sh] for r in runs]),
                "max_rel_logit_diff": max(c[sh]["rel_max_diff"] for r in runs for c in r["counts"][n]),
                "min_top1_agreement": min(c[sh]["top1_agreement"] for r in runs for c in r["counts"][n]),
            }
        for key in ("mean_shift", "log_var_ratio"):
            s[key] = mean_std([np.mean([c["stats_gap"][key] for c in r["counts"][n]]) for r in runs])
        out[n] = s
    return out


def tables(summary: dict, runs: Sequence[dict]) -> str:
    """One row per source count."""
    kept = {sh: mean_std([r["kept"][sh] for r in runs]) for sh in SHIFTS}
    rows = []
    for n in map(str, COUNTS):
        s = summary[n]
        row = [n]
        for sh in SHIFTS:
            c = s[sh]
            row += [pct(c["acc"]), pp(c["minus_kept"]), f"{c['max_rel_logit_diff']:.1e}", f"{100 * c['min_top1_agreement']:.1f}"]
        row += [f"{s['mean_shift']['mean']:.3f}", f"{s['log_var_ratio']['mean']:.3f}"]
        rows.append(row)
    head = ["source images"]
    for sh in SHIFTS:
        head += [f"{sh}: accuracy (%)", "− BN-kept (pp)", "max Δlogit", "top-1 agree (%)"]
    head += ["stats: mean shift (std units)", "stats: RMS ln var ratio"]
    note = "BN-kept recalibrated, for reference: " + ", ".join(f"{sh} {pct(kept[sh])} %" for sh in SHIFTS)
    return f"{note}.\n\n" + md_table(head, rows)


def plot(summary: dict, runs: Sequence[dict]):
    """Accuracy (top) and paired gap to BN-kept adaptation (bottom) against source images."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    for j, sh in enumerate(SHIFTS):
        cells = [summary[str(n)][sh] for n in COUNTS]
        top.errorbar(COUNTS, [100 * c["acc"]["mean"] for c in cells], [100 * c["acc"]["std"] for c in cells],
                     fmt=f"C{j}-o", ms=3, capsize=2, label=f"{sh}, folded + unfold")
        top.axhline(100 * np.mean([r["kept"][sh] for r in runs]), color=f"C{j}", ls="--", lw=1,
                    label=f"{sh}, BN-kept recalibrated")
        bottom.errorbar(COUNTS, [100 * c["minus_kept"]["mean"] for c in cells],
                        [100 * c["minus_kept"]["se"] for c in cells], fmt=f"C{j}-o", ms=3, capsize=2, label=sh)
    bottom.axhline(0, color="k", lw=0.8)
    top.set(ylabel="accuracy (%), mean ± std", title=TITLE.split(" (")[0])
    bottom.set(xscale="log", xlabel="source images given to unfold", ylabel="folded − BN-kept (pp), ± SE")
    bottom.set_xticks(COUNTS, [str(n) for n in COUNTS], fontsize=7)
    bottom.minorticks_off()
    top.legend(fontsize=7)
    fig.tight_layout()
    return fig


def intro(seeds: Sequence[int]) -> str:
    """The protocol paragraph."""
    how = "`onnx_tools.recalibrate(FOLDED, TARGET, source=SOURCE)`"
    return f"""The conv nets of experiment 6, folded from Precise BN statistics over all 4,000 training
images (batch {SOURCE_BATCH}, stored order). Unfold gets n training images (a seeded random draw, {DRAWS}
draws per n; n = 4,000 is the stored order the model was folded with), batch {SOURCE_BATCH}; the
unfolded model is recalibrated on {POOL} unlabeled shifted test images and evaluated on the other
{1000 - POOL}, by {how}. Paired against recalibrating the BN-kept model on the same images (NumPy
Precise BN; experiment 6 checks that `bnref-onnx` gives the same). The last two
columns compare the inserted BNs' statistics with those of the folding data (RMS over channels of
the mean difference in standard deviations, and of ln of the variance ratio). {len(seeds)} seeds."""


def unfold_sources(seeds: Sequence[int], jobs: int, conv_runs: Sequence[dict]) -> dict:
    """Experiment 7."""
    runs = run_seeds(sources_seed, list(conv_runs), jobs)
    summary = summarize(runs)
    result = {"counts": COUNTS, "shifts": SHIFTS, "draws": DRAWS, "seeds": list(seeds),
              "summary": summary, "runs": runs}
    write_outputs(NAME, TITLE, intro(seeds), tables(summary, runs), result, plot(summary, runs))
    return result


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=unfold_sources, needs=(CONV_RUNS,))
