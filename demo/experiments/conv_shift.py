"""Experiment 6: a conv net whose BN was folded, adapted to a deployment shift through ``unfold``.

Per seed and shift, on the same weights (paired): no adaptation; the BN-kept ONNX model
recalibrated on unlabeled target images (``bnref-onnx recalibrate``); and the folded ONNX model
(no BN node) unfolded on the 4,000 source images and then recalibrated (``bnref-onnx
recalibrate FOLDED --data TARGET --source SOURCE``), folded once from Precise BN statistics and
once from the training EMA. The NumPy reference of unfold (:mod:`demo.conv_unfold`) runs beside
the tool and checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from demo import conv_export as CX
from demo import conv_unfold as U
from demo import convnet as C
from demo import data as D
from demo.experiments.common import md_table, mean_std, paired, pct, pp, pyplot, stats_gap, write_outputs
from demo.experiments.conv_common import (
    CONV_MODEL,
    CONV_RUNS,
    EPS_PRIME,
    POOL,
    SOURCE_BATCH,
    get_conv_split,
    logit_gap,
    target_split,
    tool_adapt,
)
from demo.experiments.spec import Experiment

NAME = "conv_shift"
TITLE = "6. Folded models under deployment shift: BN-kept vs folded + unfold adaptation (conv net)"
FOLDS = ("precise", "ema")  # which statistics the BN was folded with


def _kept_arm(params, kept_model, cal, ev) -> tuple[np.ndarray, dict]:
    """BN-kept adaptation with the tool, checked against NumPy Precise BN on the same batches."""
    import onnx_tools

    adapted = onnx_tools.recalibrate(kept_model, CX.nchw(cal), batch_size=SOURCE_BATCH, provider="cpu").model
    logits = CX.run_logits(adapted, ev)
    ref = C.forward_eval(params, C.precise_stats(params, cal, SOURCE_BATCH), ev)
    return logits, logit_gap(ref, logits)


def _folded_arm(unfolded, folded_model, cal, ev, y, x_source, kept_logits) -> dict:
    """Folded + unfold + recalibrate: by the tool, and by the NumPy reference that checks it."""
    net, _ = unfolded
    ref = C.forward_eval(net, C.precise_stats(net, cal, SOURCE_BATCH, eps=EPS_PRIME), ev, eps=EPS_PRIME)
    rec = {"numpy": {"acc": float((ref.argmax(1) == y).mean()), **logit_gap(kept_logits, ref)}}
    logits = CX.run_logits(tool_adapt(folded_model, cal, x_source).model, ev)
    rec["tool"] = {
        "acc": float((logits.argmax(1) == y).mean()),
        **logit_gap(kept_logits, logits),
        "vs_numpy": logit_gap(ref, logits),
    }
    return rec


def shift_seed(run: dict, shifts: Sequence[str] | None = None, split=None) -> dict:
    """Every arm for one seed's trained net and every shift."""
    sp = split or get_conv_split()
    params, seed = run["params"], run["seed"]
    stats = {"precise": run["precise"], "ema": run["ema"]}
    pool, held = target_split(seed, len(sp.x_test))
    kept_model = CX.to_onnx(params, stats["precise"])
    folded = {k: C.fold(params, stats[k]) for k in FOLDS}
    folded_models = {k: CX.to_onnx(folded[k], None) for k in FOLDS}
    unfolded = {k: U.unfold(folded[k], sp.x_train, SOURCE_BATCH, EPS_PRIME) for k in FOLDS}
    out = {"seed": seed, "ema_vs_precise": stats_gap(stats["precise"], stats["ema"]), "shifts": {}}
    for shift in shifts or D.SHIFTS:
        xs = D.apply_shift(shift, sp.x_test, sp.side, seed=seed)
        cal, ev, y = xs[pool], xs[held], sp.y_test[held]
        kept_logits, kept_check = _kept_arm(params, kept_model, cal, ev)
        rec = {f"none_{k}": C.accuracy(params, stats[k], ev, y) for k in FOLDS}
        rec["kept_adapted"] = float((kept_logits.argmax(1) == y).mean())
        rec["kept_tool_vs_numpy"] = kept_check
        for k in FOLDS:
            rec[f"folded_{k}"] = _folded_arm(
                unfolded[k], folded_models[k], cal, ev, y, sp.x_train, kept_logits
            )
        out["shifts"][shift] = rec
    return out


def summarize(runs: Sequence[dict], shifts: Sequence[str]) -> dict:
    """Per shift: accuracies over seeds, paired differences, worst logit gaps."""
    out = {"shifts": {}}
    for sh in shifts:
        recs = [r["shifts"][sh] for r in runs]
        kept = [x["kept_adapted"] for x in recs]
        s = {f"none_{k}": mean_std([x[f"none_{k}"] for x in recs]) for k in FOLDS}
        s["kept_adapted"] = mean_std(kept)
        s["kept_minus_none"] = paired(kept, [x["none_precise"] for x in recs])
        s["kept_tool_vs_numpy_max"] = max(x["kept_tool_vs_numpy"]["rel_max_diff"] for x in recs)
        for k in FOLDS:
            arm = [x[f"folded_{k}"]["tool"] for x in recs]
            acc = [a["acc"] for a in arm]
            s[f"folded_{k}"] = {
                "acc": mean_std(acc),
                "minus_kept": paired(acc, kept),
                "max_rel_logit_diff": max(a["rel_max_diff"] for a in arm),
                "min_top1_agreement": min(a["top1_agreement"] for a in arm),
                "tool_vs_numpy_max": max(a["vs_numpy"]["rel_max_diff"] for a in arm),
            }
        out["shifts"][sh] = s
    return out


def tables(summary: dict, shifts: Sequence[str], held: int) -> str:
    """Accuracy per arm, then paired differences and logit agreement."""
    rows = [
        [sh, pct(s["none_precise"]), pct(s["none_ema"]), pct(s["kept_adapted"]),
         pct(s["folded_precise"]["acc"]), pct(s["folded_ema"]["acc"])]
        for sh in shifts for s in [summary["shifts"][sh]]
    ]
    t1 = f"Test accuracy (%) on {held} held-out shifted digits, mean ± std over seeds (folded arms: bnref-onnx):\n\n"
    t1 += md_table(
        ["shift", "no adaptation (Precise BN)", "no adaptation (EMA)", "BN-kept, recalibrated",
         "folded (Precise BN) + unfold + recalibrate", "folded (EMA) + unfold + recalibrate"],
        rows,
    )
    rows2 = []
    for sh in shifts:
        s = summary["shifts"][sh]
        fp, fe = s["folded_precise"], s["folded_ema"]
        rows2.append([
            sh, pp(s["kept_minus_none"]), pp(fp["minus_kept"]), f"{fp['max_rel_logit_diff']:.1e}",
            f"{100 * fp['min_top1_agreement']:.1f}", pp(fe["minus_kept"]), f"{fe['max_rel_logit_diff']:.1e}",
            f"{100 * fe['min_top1_agreement']:.1f}",
        ])
    t2 = "\nPaired differences (pp, mean ± SE over seeds) and how close the folded arms' logits are to the "
    t2 += "BN-kept adapted logits (largest |Δlogit| / max |logit| and lowest top-1 agreement over seeds):\n\n"
    t2 += md_table(
        ["shift", "BN-kept − none", "folded (Precise) − BN-kept", "max Δlogit", "top-1 agree (%)",
         "folded (EMA) − BN-kept", "max Δlogit", "top-1 agree (%)"],
        rows2,
    )
    worst = {k: max(summary["shifts"][sh][f"folded_{k}"]["tool_vs_numpy_max"] for sh in shifts) for k in FOLDS}
    kept = max(summary["shifts"][sh]["kept_tool_vs_numpy_max"] for sh in shifts)
    t3 = (
        "\nEnd to end, `bnref-onnx` vs NumPy (largest |Δlogit| / max |logit| over every seed and shift): "
        f"folded (Precise BN) + unfold + recalibrate vs the NumPy reference of unfold {worst['precise']:.1e}, "
        f"folded (EMA) {worst['ema']:.1e}; BN-kept recalibration vs NumPy Precise BN {kept:.1e}.\n"
    )
    return t1 + t2 + t3


ARMS = (("none_precise", "no adaptation"), ("kept_adapted", "BN-kept, recalibrated"),
        ("folded_precise", "folded (Precise BN) + unfold"), ("folded_ema", "folded (EMA) + unfold"))


def plot(summary: dict, shifts: Sequence[str], title: str = TITLE, arms: Sequence[tuple[str, str]] = ARMS):
    """Grouped bars: accuracy of every arm (summary key, label) under every shift."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(arms)
    for j, (key, label) in enumerate(arms):
        cells = [summary["shifts"][sh][key] for sh in shifts]
        cells = [c["acc"] if "acc" in c else c for c in cells]
        xs = np.arange(len(shifts)) + (j - (len(arms) - 1) / 2) * width
        ax.bar(xs, [100 * c["mean"] for c in cells], width, yerr=[100 * c["std"] for c in cells],
               capsize=2, color=f"C{j}", label=label)
    ax.set_xticks(np.arange(len(shifts)), shifts)
    ax.set(ylabel="test accuracy (%), mean ± std", ylim=(0, 100), title=title.split(": ")[0])
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def intro(seeds: Sequence[int]) -> str:
    """The protocol paragraph."""
    engine = (
        "`onnx_tools.recalibrate(FOLDED, TARGET, source=SOURCE)` (what `bnref-onnx recalibrate FOLDED --data "
        "TARGET --source SOURCE` runs), checked against the NumPy reference of unfold (`demo/conv_unfold.py`)"
    )
    return f"""A conv net (5 × [Conv 3×3 → BatchNorm → ReLU], widths {CONV_MODEL.widths}, global average
pool, linear; NumPy with bnref's forward/backward; {CONV_MODEL.epochs} epochs, batch {CONV_MODEL.batch_size},
lr {CONV_MODEL.lr} cosine) is trained on 4,000 MNIST-5k digits. Its BN statistics are Precise BN
`population` over the 4,000 training images (batch {SOURCE_BATCH}) or the PyTorch-convention EMA of
training. Per seed the 1,000 test digits are split into {POOL} calibration images (labels never used)
and {1000 - POOL} evaluation images; each shift of experiment 5 is applied to both. Arms, on the same
weights: the exported model as is; the BN-kept ONNX model recalibrated on the calibration images
(`onnx_tools.recalibrate`, batch {SOURCE_BATCH}); the folded ONNX model (no BN node: W′ = W·γ/√(v+ε),
b′ = (b−μ)·γ/√(v+ε) + β, folded in NumPy) unfolded on the 4,000 training images and recalibrated on the
same calibration images, by {engine}. ε′ of the inserted BNs: {EPS_PRIME:g}. {len(seeds)} seeds."""


def conv_shift(seeds: Sequence[int], jobs: int, conv_runs: Sequence[dict]) -> dict:
    """Experiment 6."""
    from demo.experiments.common import run_seeds

    runs = run_seeds(shift_seed, list(conv_runs), jobs)
    shifts = list(runs[0]["shifts"])
    summary = summarize(runs, shifts)
    summary["ema_vs_precise"] = {
        key: mean_std([r["ema_vs_precise"][key] for r in runs]) for key in ("mean_shift", "log_var_ratio")
    }
    summary["clean_acc"] = {k: mean_std([r[f"clean_acc_{k}"] for r in conv_runs]) for k in FOLDS}
    result = {"model": asdict(CONV_MODEL), "seeds": list(seeds), "summary": summary, "runs": runs}
    write_outputs(NAME, TITLE, intro(seeds), tables(summary, shifts, 1000 - POOL), result, plot(summary, shifts))
    return result


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=conv_shift, needs=(CONV_RUNS,))
