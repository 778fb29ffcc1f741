"""Experiment 8: when ``population`` and ``mean_of_variances`` part on conv feature maps.

With batches of B images of H x W pixels, ``mean_of_variances`` averages within-batch
variances, which miss the between-batch variance of the batch mean: in relative terms
``(var_pop - var_mov) / var_pop ≈ rho / B - 1 / (m - 1)`` with ``m = B * H * W`` values per
batch and ``rho = Var_images(per-image channel mean) / var`` (FACTS.md; bnref.precise). For the
MLP (H = W = 1, rho = 1) the two terms cancel; for correlated pixels rho >> 1/(HW) and they part.

Part A runs Precise BN over the training images at several batch sizes (both estimators from one
training-mode pass) and measures the gap per layer and what it costs in accuracy, on clean test
images and when recalibrating on the contrast-shifted target. Part B is the control: the same
feature maps (inference mode, fixed statistics) batched by image or as i.i.d. pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import bnref
from demo import convnet as C
from demo import data as D
from demo.experiments.common import md_table, mean_std, paired, pp, pyplot, run_seeds, write_outputs
from demo.experiments.conv_common import CONV_RUNS, get_conv_split, target_split
from demo.experiments.spec import Experiment
from demo.model import one_blas_thread

NAME = "conv_estimators"
TITLE = "8. population vs mean_of_variances on conv feature maps"
BATCHES = (2, 4, 8, 16, 32, 64, 128)
CONTROL_BATCHES = (2, 8, 32, 128)
CONTROL_IMAGES = 1024
SHIFT = "contrast+brightness"


def _rel_gap(agg: bnref.PreciseBN) -> np.ndarray:
    pop, mov = agg.with_estimator("population").var, agg.with_estimator("mean_of_variances").var
    return (pop - mov) / pop


def _as_stats(aggs, estimator: str):
    return [(a.with_estimator(estimator).mean.astype(np.float32), a.with_estimator(estimator).var.astype(np.float32)) for a in aggs]


def sweep_seed(run: dict, sp, pool, held) -> dict:
    """Part A for one net: per batch size, the gap per layer and accuracy with each estimator."""
    params = run["params"]
    xs = D.apply_shift(SHIFT, sp.x_test, sp.side, seed=run["seed"])
    out = {}
    for b in BATCHES:
        aggs = C.precise_aggregators(params, sp.x_train, b)
        target = C.precise_aggregators(params, xs[pool], b)
        rec = {"gap_mean": [float(_rel_gap(a).mean()) for a in aggs], "gap_max": [float(_rel_gap(a).max()) for a in aggs]}
        for est in bnref.ESTIMATORS:
            rec[f"clean_{est}"] = C.accuracy(params, _as_stats(aggs, est), sp.x_test, sp.y_test)
            rec[f"shift_{est}"] = C.accuracy(params, _as_stats(target, est), xs[held], sp.y_test[held])
        out[str(b)] = rec
    return out


def _feature_maps(params, stats, x) -> list[np.ndarray]:
    """Every conv output (BN input) in inference mode: NHWC float64."""
    maps: list[np.ndarray] = []
    with one_blas_thread():
        C.forward_eval(params, stats, x, conv_outputs=maps)
    return [z.astype(np.float64) for z in maps]


def _gap_of_batches(values: np.ndarray, m: int) -> float:
    """Mean relative gap over channels of ``values`` (rows x C) cut into batches of ``m`` rows."""
    agg = bnref.PreciseBN()
    for s in range(0, len(values) - m + 1, m):
        agg.update(bnref.Moments.from_array(values[s : s + m], axis=1))
    return float(_rel_gap(agg).mean())


def control_seed(run: dict, sp) -> list[dict]:
    """Part B for one net: per layer, rho and the gap for image batches, i.i.d. pixels, predicted."""
    rng = np.random.default_rng([run["seed"], 8])
    maps = _feature_maps(run["params"], run["precise"], sp.x_train[:CONTROL_IMAGES])
    out = []
    for z in maps:
        n, h, w, c = z.shape
        rho = z.mean(axis=(1, 2)).var(axis=0) / z.reshape(-1, c).var(axis=0)
        flat = z.reshape(-1, c)  # image-major: consecutive rows are one image's pixels
        shuffled = flat[rng.permutation(len(flat))]
        rec = {"hw": h * w, "rho": float(rho.mean()), "images": {}, "iid": {}, "predicted": {}}
        for b in CONTROL_BATCHES:
            m, k = b * h * w, n // b
            rec["images"][str(b)] = _gap_of_batches(flat, m)
            rec["iid"][str(b)] = _gap_of_batches(shuffled, m)
            rec["predicted"][str(b)] = float(np.mean(rho / b * (1 - 1 / k) - 1 / (m - 1)))
        out.append(rec)
    return out


def estimators_seed(run: dict) -> dict:
    """Parts A and B for one seed."""
    sp = get_conv_split()
    pool, held = target_split(run["seed"], len(sp.x_test))
    return {"seed": run["seed"], "sweep": sweep_seed(run, sp, pool, held), "control": control_seed(run, sp)}


def summarize(runs: Sequence[dict]) -> dict:
    """Part A over seeds (gaps, paired accuracy differences) and part B averaged over seeds."""
    layers = len(runs[0]["control"])
    sweep = {}
    for b in map(str, BATCHES):
        cells = [r["sweep"][b] for r in runs]
        sweep[b] = {"gap_mean": [mean_std([c["gap_mean"][i] for c in cells]) for i in range(layers)],
                    "gap_max": [max(c["gap_max"][i] for c in cells) for i in range(layers)]}
        for where in ("clean", "shift"):
            pop, mov = ([c[f"{where}_{e}"] for c in cells] for e in bnref.ESTIMATORS)
            sweep[b][where] = {"population": mean_std(pop), "mean_of_variances": mean_std(mov),
                               "pop_minus_mov": paired(pop, mov)}
    control = []
    for i in range(layers):
        recs = [r["control"][i] for r in runs]
        control.append({"hw": recs[0]["hw"], "rho": float(np.mean([x["rho"] for x in recs]))}
                       | {kind: {b: float(np.mean([x[kind][b] for x in recs])) for b in map(str, CONTROL_BATCHES)}
                          for kind in ("images", "iid", "predicted")})
    return {"sweep": sweep, "control": control}


def tables(s: dict) -> str:
    """Part A (gap per layer and accuracy per batch size) and part B (the control)."""
    layers = len(s["control"])
    rows = []
    for b in map(str, BATCHES):
        c = s["sweep"][b]
        rows.append([b, *(f"{100 * g['mean']:.2f}" for g in c["gap_mean"]),
                     f"{100 * c['clean']['population']['mean']:.2f}", pp(c["clean"]["pop_minus_mov"]),
                     f"{100 * c['shift']['population']['mean']:.2f}", pp(c["shift"]["pop_minus_mov"])])
    head = ["batch", *(f"gap layer {i} (%)" for i in range(layers)), "clean acc, population (%)",
            "population − mov (pp)", f"{SHIFT} recalibrated, population (%)", "population − mov (pp)"]
    t1 = ("**A. Precise BN at batch B** over the 4,000 training images (one training-mode pass, both "
          "estimators): mean over channels of (var_pop − var_mov) / var_pop per layer, mean over seeds; "
          "accuracy with each estimator's statistics (paired over seeds, mean ± SE):\n\n" + md_table(head, rows))
    rows2 = []
    for i, c in enumerate(s["control"]):
        rows2.append([f"{i} ({int(np.sqrt(c['hw']))}×{int(np.sqrt(c['hw']))})", f"{c['rho']:.3f}",
                      *(f"{100 * c['images'][b]:.2f} / {100 * c['iid'][b]:.3f} / {100 * c['predicted'][b]:.2f}"
                        for b in map(str, CONTROL_BATCHES))])
    t2 = (f"\n**B. The control**: the same conv outputs ({CONTROL_IMAGES} training images, inference mode, "
          "fixed statistics) cut into batches of B whole images, or into batches of the same size of i.i.d. "
          "pixels (shuffled across images); ρ = Var over images of the per-image channel mean / variance. "
          "Cells: gap (%) for image batches / i.i.d. pixels / predicted ρ/B·(1−1/k) − 1/(m−1):\n\n"
          + md_table(["layer (H×W)", "ρ", *(f"B = {b}" for b in CONTROL_BATCHES)], rows2))
    return t1 + t2


def plot(s: dict):
    """Gap against batch size per layer (left) and its accuracy cost (right)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, c in enumerate(s["control"]):
        left.plot(BATCHES, [100 * s["sweep"][str(b)]["gap_mean"][i]["mean"] for b in BATCHES], f"C{i}-o", ms=3,
                  label=f"layer {i} ({c['hw']} px), Precise BN pass")
        left.plot(CONTROL_BATCHES, [100 * c["images"][str(b)] for b in CONTROL_BATCHES], f"C{i}x", ms=5)
        left.plot(CONTROL_BATCHES, [100 * c["predicted"][str(b)] for b in CONTROL_BATCHES], f"C{i}:", lw=1)
        left.plot(CONTROL_BATCHES, [100 * c["iid"][str(b)] for b in CONTROL_BATCHES], f"C{i}--", lw=1)
    left.axhline(0, color="k", lw=0.8)
    left.set(xscale="log", xlabel="batch size B", ylabel="(var_pop − var_mov) / var_pop (%)",
             title="gap per layer: Precise BN pass (o), fixed maps (x),\npredicted ρ/B − 1/(m−1) (dotted), "
             "i.i.d. pixels (dashed)")
    for j, where in enumerate(("clean", "shift")):
        cells = [s["sweep"][str(b)][where]["pop_minus_mov"] for b in BATCHES]
        right.errorbar(BATCHES, [100 * c["mean"] for c in cells], [100 * c["se"] for c in cells], fmt=f"C{j}-o",
                       ms=3, capsize=2, label="clean test" if where == "clean" else f"{SHIFT}, recalibrated")
    right.axhline(0, color="k", lw=0.8)
    right.set(xscale="log", xlabel="batch size B", ylabel="accuracy: population − mov (pp), ± SE", ylim=(-0.5, 0.5),
              title="what the gap costs")
    for ax in (left, right):
        ax.set_xticks(BATCHES, [str(b) for b in BATCHES], fontsize=7)
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def intro(seeds: Sequence[int]) -> str:
    """The protocol paragraph."""
    return f"""The conv nets of experiment 6 (feature maps 28×28, 14×14, 14×14, 7×7, 7×7). A: Precise BN
(`bnref.PreciseBN`, NumPy) over the 4,000 training images in batches of B, both estimators from the same
training-mode pass; accuracy on the 1,000 clean test images, and after recalibrating on {SHIFT} (512
unlabeled shifted test images, batch B; evaluated on the other 488). `mean_of_variances` (mov) is
what pycls, SuperGradients, mmpretrain and `torch.optim.swa_utils.update_bn` compute; `population` is
the paper's and fvcore's (and `bnref-onnx`'s default). {len(seeds)} seeds."""


def conv_estimators(seeds: Sequence[int], jobs: int, conv_runs: Sequence[dict]) -> dict:
    """Experiment 8."""
    runs = run_seeds(estimators_seed, list(conv_runs), jobs)
    summary = summarize(runs)
    result = {"batches": BATCHES, "control_batches": CONTROL_BATCHES, "seeds": list(seeds),
              "summary": summary, "runs": runs}
    write_outputs(NAME, TITLE, intro(seeds), tables(summary), result, plot(summary))
    return result


EXPERIMENT = Experiment(name=NAME, title=TITLE, run=conv_estimators, needs=(CONV_RUNS,))
