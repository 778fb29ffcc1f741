"""``make demo-folded``: a deployed conv net whose BatchNorm was folded away meets a new camera.

Most CNN files people hold have no BN node: exporters fold BN into the preceding convolution
by default. This demo plays the deployment story with the real command line:

1. train a NumPy conv net with BatchNorm (bnref's forward/backward) on 4,000 real MNIST digits,
   take Precise BN statistics, and export it **folded** (Conv with folded weight and bias, no BN
   node), as torch.onnx / tf2onnx / onnxsim do by default: ``folded.onnx``;
2. ``bnref-onnx inspect folded.onnx``: no BN to recalibrate, and what to do about it;
3. deploy it on test digits seen through another camera: accuracy collapses;
4. ``bnref-onnx recalibrate folded.onnx --data target.npy --source source.npy -o adapted.onnx``:
   unfold on unlabeled source-domain images (a BN after each folded Conv, the identity at
   inference), then recalibrate on unlabeled target images;
5. accuracy before/after for every shift, next to recalibrating the BN-kept twin of the model.

``python -m demo.run_demo_folded [--out DIR] [--seed S] [--source-images N]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from demo import conv_export as CX
from demo import convnet as C
from demo import data as D
from demo.experiments.conv_common import CONV_MODEL, SOURCE_BATCH, get_conv_split, target_split
from demo.run_demo import MAIN_SHIFT, cli_command, recalibrate_cli, slug


def run_cli(args: list[str]) -> None:
    """Run ``bnref-onnx ARGS`` with its command line shown; output straight to the terminal."""
    print("$ bnref-onnx " + " ".join(args), flush=True)
    subprocess.run([*cli_command(), *args], check=True)


def train_and_export(seed: int, out: Path, t0: float):
    """Step 1: train, Precise BN over the training images, fold, export ``folded.onnx`` and ``kept.onnx``."""
    sp = get_conv_split()
    cfg = replace(CONV_MODEL, seed=seed)
    params, _ = C.train(sp.x_train, sp.y_train, cfg)
    stats = C.precise_stats(params, sp.x_train, SOURCE_BATCH)
    print(
        f"trained conv net 5 x [Conv 3x3 -> BN -> ReLU] {cfg.widths} (NumPy, bnref forward/backward): "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, {time.perf_counter() - t0:.1f} s; Precise BN over the "
        f"{len(sp.x_train)} training images"
    )
    folded, kept = out / "folded.onnx", out / "kept.onnx"
    CX.X.save(CX.to_onnx(C.fold(params, stats), None), folded)
    CX.X.save(CX.to_onnx(params, stats), kept)
    return sp, folded, kept


def save_data(sp, seed: int, n_source: int, out: Path) -> tuple[Path, np.ndarray, dict[str, Path]]:
    """Unlabeled source images, and per shift unlabeled target images; returns the held-out indices."""
    source = out / "source.npy"
    pick = np.random.default_rng([seed, 7]).permutation(len(sp.x_train))[:n_source]
    np.save(source, CX.nchw(sp.x_train[pick]))
    pool, held = target_split(seed, len(sp.x_test))
    targets = {}
    for shift in D.SHIFTS:
        if shift == "clean":
            continue
        xs = D.apply_shift(shift, sp.x_test, sp.side, seed=seed)
        targets[shift] = out / f"target_{slug(shift)}.npy"
        np.save(targets[shift], CX.nchw(xs[pool]))
    return source, held, targets


def adapt_shift(sp, seed, shift, paths, held, out: Path) -> tuple[str, float, float, float, float]:
    """Step 4 for one shift: recalibrate the folded model with ``--source`` and the BN-kept twin."""
    folded, kept, source, target = paths
    loud = shift == MAIN_SHIFT
    adapted, kept_adapted = out / f"adapted_{slug(shift)}.onnx", out / f"kept_{slug(shift)}.onnx"
    recalibrate_cli(folded, target, adapted, quiet=not loud, extra=["--source", str(source)])
    recalibrate_cli(kept, target, kept_adapted, quiet=True)
    xs = D.apply_shift(shift, sp.x_test, sp.side, seed=seed)[held]
    y = sp.y_test[held]
    before = CX.onnx_accuracy(onnx.load(str(folded)), xs, y)
    a = CX.run_logits(onnx.load(str(adapted)), xs)
    k = CX.run_logits(onnx.load(str(kept_adapted)), xs)
    gap = float(np.abs(a - k).max() / np.abs(k).max())
    return shift, before, float((a.argmax(1) == y).mean()), float((k.argmax(1) == y).mean()), gap


def print_summary(rows, clean: float, held: int, n_source: int) -> None:
    """Step 5: the before/after table."""
    print(f"\nAccuracy on {held} held-out test digits under each shift (ONNX models, onnxruntime):\n")
    head = ["shift", "folded as deployed", f"unfold ({n_source}) + recal.", "BN-kept twin recal.", "max Δlogit"]
    print(f"  {head[0]:<22}{head[1]:>20}{head[2]:>24}{head[3]:>22}{head[4]:>12}")
    print(f"  {'(none)':<22}{100 * clean:>19.2f}%")
    for shift, before, after, kept, gap in rows:
        print(f"  {shift:<22}{100 * before:>19.2f}%{100 * after:>23.2f}%{100 * kept:>21.2f}%{gap:>12.1e}")
    print(
        "\nReading: the folded file had no BN left, yet unfolding on unlabeled source images and recalibrating\n"
        "on unlabeled target images adapts it as recalibrating the BN-kept model does. Max Δlogit (largest\n"
        "difference of the two adapted models' logits over the largest logit) is not 0 because unfold saw\n"
        f"{n_source} of the 4000 images the statistics were folded from; with all of them it is ~1e-5. Unfolding\n"
        "reproduces the statistics the model was folded with (an EMA error at export time is kept; γ, β are not\n"
        "recoverable). 5 seeds: docs/folded_deployment.md, docs/experiments/conv_shift.md, unfold_sources.md."
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m demo.run_demo_folded", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/demo_folded", help="folder for models and data (default out/demo_folded)")
    ap.add_argument("--seed", type=int, default=0, help="training/shift seed (default 0)")
    ap.add_argument("--source-images", type=int, default=1024, help="unlabeled source images for unfold (default 1024)")
    args = ap.parse_args(argv)
    if not SOURCE_BATCH <= args.source_images <= 4000:
        ap.error(f"--source-images must be in [{SOURCE_BATCH}, 4000], got {args.source_images}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sp, folded, kept = train_and_export(args.seed, out, t0)
    source, held, targets = save_data(sp, args.seed, args.source_images, out)
    clean = CX.onnx_accuracy(onnx.load(str(folded)), sp.x_test[held], sp.y_test[held])
    print(f"exported {folded} with BN folded into each Conv (no BatchNormalization node); clean accuracy "
          f"{100 * clean:.2f}%\n")
    run_cli(["inspect", str(folded)])
    xs = D.apply_shift(MAIN_SHIFT, sp.x_test, sp.side, seed=args.seed)
    before = CX.onnx_accuracy(onnx.load(str(folded)), xs[held], sp.y_test[held])
    print(f"\nnew camera ({MAIN_SHIFT}: 0.5·x + 0.35): accuracy {100 * before:.2f}% as deployed.")
    print(f"Unfolding on {args.source_images} unlabeled source images, then recalibrating on "
          f"{len(np.load(targets[MAIN_SHIFT], mmap_mode='r'))} unlabeled images from the new camera:")
    rows = [adapt_shift(sp, args.seed, sh, (folded, kept, source, targets[sh]), held, out) for sh in targets]
    print_summary(rows, clean, len(held), args.source_images)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; files in {out}/")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
