"""Experiment 5: the ONNX model under deployment shifts, before/after ``bnref-onnx`` recalibration.

Recalibration runs on unlabeled shifted images, with and without a prior; every recalibration
without a prior is also checked end to end: ONNX tool vs NumPy Precise BN on the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

import numpy as np

from bnref.conventions import PYTORCH
from demo import data as D
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
    run_seeds,
    write_outputs,
)
from demo.experiments.spec import Experiment

NAME = "domain_shift"
TITLE = "5. Deployment shift: recalibrating the ONNX model on unlabeled shifted images"
SHIFT_MODEL = M.TrainConfig(batch_size=32, epochs=8, lr=0.05)
CALIB_SIZES = (16, 32, 64, 128, 256, 512, 750)
PRIORS = (0.0, 64.0, 512.0)
CALIB_BATCH = 64
POOL = 750  # calibration images come from the first 750 of a seeded permutation of the test split


def end_to_end_check(
    shift: str, n: int, bs: int, params: M.Params, fixed, x_cal, x_ev, y_ev, acc_onnx: float
) -> dict:
    """The statistics ``onnx_tools`` wrote into ``fixed`` vs NumPy Precise BN on the same batches.

    ``fixed`` was recalibrated on ``x_cal`` in batches of ``bs``; ``acc_onnx`` is its accuracy
    on ``(x_ev, y_ev)``.
    """
    from demo import export as X

    ref = M.precise_stats(params, x_cal, bs)
    got = X.bn_stats(fixed)
    pairs = list(zip(got, ref, strict=True))
    return {
        "shift": shift,
        "n": n,
        "batch_size": bs,
        "max_mean_err_std_units": float(
            max(np.max(np.abs(g[0] - r[0]) / np.sqrt(r[1] + M.EPS)) for g, r in pairs)
        ),
        "max_var_rel_err": float(max(np.max(np.abs(g[1] / r[1] - 1)) for g, r in pairs)),
        "acc_onnx": acc_onnx,
        "acc_numpy": M.accuracy(params, ref, x_ev, y_ev),
        "pred_disagreements": int(
            (X.run_logits(fixed, x_ev).argmax(1) != M.predict(params, ref, x_ev)).sum()
        ),
    }


def shift_record(
    model, params: M.Params, shift: str, x_cal_all, x_ev, y_ev, sizes, priors, e2e: list
) -> dict:
    """Accuracy before and after recalibrating on the first n of ``x_cal_all``, for each n and prior."""
    import onnx_tools
    from demo import export as X

    rec = {"before": X.onnx_accuracy(model, x_ev, y_ev), "after": {}}
    for n in sizes:
        x_cal = x_cal_all[:n]
        bs = min(CALIB_BATCH, n)
        stats = onnx_tools.collect(model, x_cal, batch_size=bs, provider="cpu")
        rec["after"][str(n)] = {}
        for n0 in priors:
            applied = onnx_tools.apply_stats(model, stats, prior_strength=n0 or None)
            acc = X.onnx_accuracy(applied.model, x_ev, y_ev)
            rec["after"][str(n)][str(n0)] = acc
            if n0 == 0:  # end to end: the tool's statistics vs NumPy Precise BN on the same batches
                e2e.append(end_to_end_check(shift, n, bs, params, applied.model, x_cal, x_ev, y_ev, acc))
    return rec


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
    from demo import export as X

    sp = split or get_split()
    params, trackers = M.train(sp.x_train, sp.y_train, replace(cfg, seed=seed), {"pytorch": PYTORCH})
    model = X.to_onnx(params, trackers["pytorch"].stats)
    perm = np.random.default_rng([seed, 5]).permutation(len(sp.x_test))
    pool, held = perm[:POOL], perm[POOL:]
    out = {
        "seed": seed,
        "clean_source_acc": X.onnx_accuracy(model, sp.x_test[held], sp.y_test[held]),
        "shifts": {},
    }
    e2e: list[dict] = []
    for shift in shifts or D.SHIFTS:
        xs = D.apply_shift(shift, sp.x_test, sp.side, seed=seed)
        out["shifts"][shift] = shift_record(
            model, params, shift, xs[pool], xs[held], sp.y_test[held], sizes, priors, e2e
        )
    out["e2e"] = e2e
    return out


def summarize_shifts(runs: Sequence[dict], shifts: Sequence[str]) -> dict:
    """Per shift, size and prior: accuracy over seeds and the paired gain over "before"."""
    summary: dict = {"clean_source_acc": mean_std([r["clean_source_acc"] for r in runs]), "shifts": {}}
    for sh in shifts:
        before = [r["shifts"][sh]["before"] for r in runs]
        s = {"before": mean_std(before), "after": {}}
        for n in CALIB_SIZES:
            s["after"][str(n)] = {}
            for n0 in PRIORS:
                a = [r["shifts"][sh]["after"][str(n)][str(n0)] for r in runs]
                s["after"][str(n)][str(n0)] = {"acc": mean_std(a), "minus_before": paired(a, before)}
        summary["shifts"][sh] = s
    return summary


def summarize_end_to_end(runs: Sequence[dict], eval_images: int) -> dict:
    """The worst ONNX-vs-NumPy discrepancy over every seed, shift and calibration size."""
    e2e = [x for r in runs for x in r["e2e"]]
    return {
        "checks": len(e2e),
        "max_mean_err_std_units": max(x["max_mean_err_std_units"] for x in e2e),
        "max_var_rel_err": max(x["max_var_rel_err"] for x in e2e),
        "max_acc_diff_pp": max(100 * abs(x["acc_onnx"] - x["acc_numpy"]) for x in e2e),
        "max_pred_disagreements": max(x["pred_disagreements"] for x in e2e),
        "eval_images": eval_images,
    }


def _prior_label(n0: float) -> str:
    return "no prior" if n0 == 0 else f"N0 = {n0:g}"


def shift_tables(summary: dict, shifts: Sequence[str], eval_images: int) -> str:
    """Accuracy before/after per shift and prior, then the paired after − before table."""
    rows = [
        [
            sh,
            _prior_label(n0),
            pct(s["before"]),
            *(pct(s["after"][str(n)][str(n0)]["acc"]) for n in CALIB_SIZES),
        ]
        for sh in shifts
        for s in [summary["shifts"][sh]]
        for n0 in PRIORS
    ]
    t1 = (
        f"Test accuracy (%) on {eval_images} held-out shifted digits, mean ± std over seeds; "
        "columns: number of unlabeled shifted calibration images:\n\n"
        + md_table(["shift", "prior", "before (EMA)", *map(str, CALIB_SIZES)], rows)
    )
    rows2 = [
        [
            sh,
            _prior_label(n0),
            *(pp(summary["shifts"][sh]["after"][str(n)][str(n0)]["minus_before"]) for n in CALIB_SIZES),
        ]
        for sh in shifts
        for n0 in PRIORS
    ]
    t2 = "\nAfter − before (pp, paired, mean ± SE over seeds):\n\n" + md_table(
        ["shift", "prior", *map(str, CALIB_SIZES)], rows2
    )
    return t1 + t2


def end_to_end_table(e2e_sum: dict) -> str:
    """The one-row summary of the ONNX-vs-NumPy check, in markdown."""
    header = [
        "checks",
        "max |Δmean| / std",
        "max |Δvar| / var",
        "max |Δaccuracy| (pp)",
        "max differing predictions",
    ]
    row = [
        e2e_sum["checks"],
        f"{e2e_sum['max_mean_err_std_units']:.1e}",
        f"{e2e_sum['max_var_rel_err']:.1e}",
        f"{e2e_sum['max_acc_diff_pp']:.2f}",
        f"{e2e_sum['max_pred_disagreements']} of {e2e_sum['eval_images']}",
    ]
    return (
        "\nEnd to end, `bnref-onnx` vs NumPy: for every seed, shift and calibration size, the statistics "
        "`onnx_tools` wrote into the ONNX model are compared with `bnref.PreciseBN` over the same batches "
        "of the NumPy network (float64 inside bnref, float32 in onnxruntime):\n\n" + md_table(header, [row])
    )


def _plot_shift(top, bottom, s: dict, sh: str, clean_mean: float) -> None:
    top.axhline(100 * s["before"]["mean"], color="k", ls="--", lw=1, label="before (EMA stats)")
    top.axhline(100 * clean_mean, color="grey", ls=":", lw=1, label="clean test, EMA")
    bottom.axhline(0, color="k", lw=0.8)
    for j, n0 in enumerate(PRIORS):
        cells = [s["after"][str(n)][str(n0)] for n in CALIB_SIZES]
        label = "recalibrated" if n0 == 0 else f"recalibrated, N0={n0:g}"
        for ax, key, err in ((top, "acc", "std"), (bottom, "minus_before", "se")):
            ax.errorbar(
                CALIB_SIZES,
                [100 * c[key]["mean"] for c in cells],
                [100 * c[key][err] for c in cells],
                fmt=f"C{j}-o",
                ms=3,
                capsize=2,
                label=label,
            )
    top.set(title=sh, ylim=(0, 100))
    bottom.set(xscale="log", xlabel="calibration images")
    bottom.set_xticks(CALIB_SIZES, [str(n) for n in CALIB_SIZES], fontsize=7)
    bottom.minorticks_off()


def plot_shifts(summary: dict, shifts: Sequence[str]):
    """One column per shift: accuracy (top) and gain (bottom) against calibration images."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(shifts), figsize=(3.4 * len(shifts), 6.6), sharex=True)
    for j_ax, sh in enumerate(shifts):
        _plot_shift(
            axes[0, j_ax], axes[1, j_ax], summary["shifts"][sh], sh, summary["clean_source_acc"]["mean"]
        )
    axes[0, 0].set_ylabel("test accuracy (%), mean ± std")
    axes[1, 0].set_ylabel("after − before (pp), mean ± SE")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "5. ONNX model under deployment shift, before/after bnref-onnx recalibrate", fontsize=11, y=1.0
    )
    fig.tight_layout()
    return fig


def intro(seeds: Sequence[int]) -> str:
    """The protocol paragraph of ``domain_shift.md``."""
    return f"""The network (batch {SHIFT_MODEL.batch_size}, {SHIFT_MODEL.epochs} epochs, lr {SHIFT_MODEL.lr} cosine) is exported to ONNX
(Gemm + BatchNormalization + Relu) with its PyTorch-convention EMA statistics. The 1,500 test
digits are split per seed into 750 calibration images (labels never used) and 750 evaluation
images; each shift is applied to both. `onnx_tools.collect` + `apply_stats` (what
`bnref-onnx recalibrate` runs) collect Precise BN `population` statistics over the first n
calibration images (batch min(n, {CALIB_BATCH})), optionally blended with the stored statistics
(`--prior-strength N0`: weights N0/(N0+n) old, n/(N0+n) new). Shifts: *contrast+brightness*
0.5·x + 0.35; *noise* Gaussian σ = 0.5 per pixel; *inverted* 1 − x; *rotated 90°*. The last two are
the limit: inversion is a per-channel affine map with a negative gain, rotation permutes the
pixels, and BN can neither flip a sign nor move pixels. {len(seeds)} seeds."""


def domain_shift(seeds: Sequence[int], jobs: int) -> dict:
    """Experiment 5 and the end-to-end check."""
    runs = run_seeds(shift_run, seeds, jobs)
    shifts = list(runs[0]["shifts"])
    eval_images = len(get_split().x_test) - POOL
    summary = summarize_shifts(runs, shifts)
    summary["end_to_end"] = summarize_end_to_end(runs, eval_images)
    tables = shift_tables(summary, shifts, eval_images) + end_to_end_table(summary["end_to_end"])
    fig = plot_shifts(summary, shifts)
    result = {
        "model": asdict(SHIFT_MODEL),
        "calib_sizes": CALIB_SIZES,
        "priors": PRIORS,
        "calib_batch": CALIB_BATCH,
        "seeds": list(seeds),
        "summary": summary,
        "runs": runs,
    }
    write_outputs(NAME, TITLE, intro(seeds), tables, result, fig)
    return result


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=domain_shift)
