"""Command line ``bnref-onnx`` (also ``python -m onnx_tools``): a thin layer over the API.

Exit status: 0 success, 1 a user-facing error (one line ``bnref-onnx: error: ...``, no
traceback unless ``--debug``; nothing written, the input untouched), 2 a usage error, 130 on
Ctrl-C and 143 on SIGTERM (no partial file either).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import traceback
from collections.abc import Sequence

import bnref
from onnx_tools import modelio, recalibrate
from onnx_tools.apply import apply_stats
from onnx_tools.collect import collect
from onnx_tools.compare import compare_models
from onnx_tools.errors import BnrefOnnxError, Interrupted
from onnx_tools.graph import EXPORT_ADVICE, batchnorms_in_subgraphs, find_batchnorms
from onnx_tools.modelio import atomic_write_bytes, check_output, load_model, write_model
from onnx_tools.report import DriftReport
from onnx_tools.stats import load_stats, merge_stats, save_stats

PROG = "bnref-onnx"
logger = logging.getLogger("onnx_tools")


def _version() -> str:
    import onnx

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = "not installed"
    return f"{PROG} {bnref.__version__} (onnx {onnx.__version__}, onnxruntime {ort_version})"


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected I/K (e.g. 0/4), got {text!r}")
    i, k = int(m.group(1)), int(m.group(2))
    if k < 1 or i >= k:
        raise argparse.ArgumentTypeError(f"shard I/K needs 0 <= I < K, got {text!r}")
    return i, k


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _add_collection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("collection options")
    g.add_argument("--batch-size", type=_positive_int, default=64,
                   help="normalization batch size (default 64; a static batch dim overrides)")
    g.add_argument("--num-samples", type=_positive_int, default=None,
                   help="use at most N samples (default: all)")
    g.add_argument("--estimator", choices=["population", "mean_of_variances"],
                   default="population",
                   help="population: pooled biased variance (fvcore, the paper); "
                   "mean_of_variances: mean of unbiased batch variances (torch update_bn)")
    g.add_argument("--bessel", action="store_true",
                   help="population only: write n/(n-1) times the pooled variance")
    g.add_argument("--provider", choices=["auto", "cuda", "cpu"], default="auto",
                   help="onnxruntime execution provider (default auto: CUDA if it really runs)")
    g.add_argument("--shuffle", action="store_true", help="take samples in a seeded random order")
    g.add_argument("--seed", type=int, default=0, help="seed for --shuffle (default 0)")
    g.add_argument("--keep-partial", action="store_true",
                   help="keep a final batch smaller than --batch-size (dropped by default)")
    g.add_argument("--include", metavar="REGEX", help="only BN whose node/output name matches")
    g.add_argument("--exclude", metavar="REGEX", help="skip BN whose node/output name matches")
    _add_images(p)


def _add_images(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image folder options (DATA is a directory)")
    g.add_argument("--image-crop", type=_positive_int, help="center crop size (default: model's)")
    g.add_argument("--image-resize", type=_positive_int,
                   help="shorter side before cropping (default crop/0.875)")
    g.add_argument("--image-mode", choices=["RGB", "L"], help="pillow mode (default from model)")
    g.add_argument("--image-scale", type=float, help="pixel scale (default 1/255)")
    g.add_argument("--image-mean", type=_floats, help="per-channel mean (default ImageNet)")
    g.add_argument("--image-std", type=_floats, help="per-channel std (default ImageNet)")
    g.add_argument("--image-layout", choices=["NCHW", "NHWC"], help="default from the model")


def _image_options(args: argparse.Namespace):
    from onnx_tools.data import ImageOptions

    given = {
        "crop": args.image_crop, "resize": args.image_resize, "mode": args.image_mode,
        "scale": args.image_scale, "mean": args.image_mean, "std": args.image_std,
        "layout": args.image_layout,
    }
    given = {k: v for k, v in given.items() if v is not None}
    return ImageOptions(**given) if given else None


def _output_group(p: argparse.ArgumentParser, *, short: bool) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    names = ["--output", "-o"] if short else ["--output"]
    g.add_argument(*names, dest="output", metavar="OUT", help="write the new model here")
    g.add_argument("--in-place", action="store_true", help="overwrite the input model")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (exposed for documentation and tests)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar, report table or notes")
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Recalibrate the BatchNormalization statistics of an ONNX model with "
        "Precise BatchNorm (training-mode batch statistics aggregated over calibration data).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", parents=[common], help="list BN nodes and their statistics")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("recalibrate", parents=[common], help="collect and apply in one go")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DATA",
                   help=".npy, .npz, image folder, module:function or file.py:function")
    _output_group(p, short=True)
    _add_collection(p)
    p.add_argument("--prior-strength", type=_nonneg_float, metavar="N0",
                   help="blend old and new statistics (Schneider et al. 2020)")
    p.add_argument("--report", metavar="REPORT.json", help="write the drift report as JSON")

    p = sub.add_parser("collect", parents=[common], help="collect statistics into a STATS file")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DATA")
    p.add_argument("--output", "-o", required=True, metavar="STATS")
    p.add_argument("--shard", type=_shard, metavar="I/K", help="take whole batches I, I+K, ...")
    _add_collection(p)

    p = sub.add_parser("merge", parents=[common], help="merge STATS shards (any order)")
    p.add_argument("stats", nargs="+", metavar="STATS")
    p.add_argument("--output", "-o", required=True, metavar="STATS")

    p = sub.add_parser("apply", parents=[common], help="write a STATS file into a model")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("stats", metavar="STATS")
    _output_group(p, short=True)
    p.add_argument("--prior-strength", type=_nonneg_float, metavar="N0")
    p.add_argument("--report", metavar="REPORT.json")

    p = sub.add_parser("compare", parents=[common], help="compare two models on data")
    p.add_argument("model_a", metavar="MODEL_A")
    p.add_argument("model_b", metavar="MODEL_B")
    p.add_argument("--data", required=True, metavar="DATA")
    p.add_argument("--labels", metavar="LABELS.npy")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--num-samples", type=_positive_int, default=None)
    p.add_argument("--provider", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_images(p)
    return parser


def _collect_kwargs(args: argparse.Namespace) -> dict:
    return {
        "batch_size": args.batch_size,
        "num_samples": args.num_samples,
        "estimator": args.estimator,
        "bessel": args.bessel,
        "provider": args.provider,
        "shuffle": args.shuffle,
        "seed": args.seed,
        "keep_partial": args.keep_partial,
        "include": args.include,
        "exclude": args.exclude,
        "image_options": _image_options(args),
        "progress": None if not args.quiet else False,
    }


def _print(text: str) -> None:
    print(text, flush=True)


def _cmd_inspect(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    bns = find_batchnorms(loaded.model, loaded.base_dir)
    nested = batchnorms_in_subgraphs(loaded.model)
    if args.json:
        out = {"model": args.model, "batchnorms": [bn.to_dict() for bn in bns],
               "in_subgraphs": nested}
        if not bns:
            out["advice"] = f"no BatchNormalization: {EXPORT_ADVICE}"
        _print(json.dumps(out, indent=2))
        return 0
    if not bns:
        _print(f"{args.model}: no BatchNormalization node in the main graph; {EXPORT_ADVICE}.")
    for bn in bns:
        s = bn.summary()
        stats = "not stored"
        if s["var_mean"] is not None and s["mean_abs_mean"] is not None:
            stats = (f"|mean| avg {s['mean_abs_mean']:.4g}, var min/avg/max "
                     f"{s['var_min']:.4g}/{s['var_mean']:.4g}/{s['var_max']:.4g}")
        _print(f"{bn.label}  (output {bn.output})")
        _print(f"  channels {bn.channels}, eps {bn.epsilon:g}, momentum {bn.momentum:g}, "
               f"opset {bn.opset}{', training_mode=1' if bn.training_mode else ''}")
        for role in ("mean", "var", "scale", "bias"):
            _print(f"  {role:5s}: {bn.sources[role].describe()}")
        _print(f"  stats: {stats}")
    if nested:
        _print("BatchNormalization inside control-flow bodies (not supported): "
               + "; ".join(nested))
    if bns:
        _print(f"{len(bns)} BatchNormalization node(s)")
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before any work (so nothing is half-done) when an output cannot be written."""
    if getattr(args, "in_place", False):
        check_output(args.model, in_place=True)
    else:
        check_output(args.output, input_path=getattr(args, "model", None))
    if getattr(args, "report", None):
        check_output(args.report, what="report")


def _finish(args: argparse.Namespace, report: DriftReport, out: str) -> None:
    if args.report:
        atomic_write_bytes(report.to_json().encode("utf-8"), args.report)
    if not args.quiet:
        _print(report.format_table(max_rows=40))
        _print(f"wrote {out}")


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    _check_outputs(args)
    result = recalibrate(
        args.model, args.data, output=None if args.in_place else args.output, in_place=args.in_place,
        prior_strength=args.prior_strength, **_collect_kwargs(args),
    )
    _finish(args, result.report, args.model if args.in_place else args.output)
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    _check_outputs(args)
    stats = collect(args.model, args.data, shard=args.shard, **_collect_kwargs(args))
    save_stats(stats, args.output)
    if not args.quiet:
        shard = f" (shard {stats.shards[0]}/{stats.num_shards})" if stats.num_shards > 1 else ""
        _print(f"collected {len(stats.bns)} BN over {stats.num_samples} samples in "
               f"{stats.num_batches} batches{shard} -> {args.output}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    _check_outputs(args)
    merged = merge_stats([load_stats(p) for p in args.stats])
    save_stats(merged, args.output)
    if not args.quiet:
        state = "complete" if merged.complete else (
            f"shards {merged.shards} of {merged.num_shards}: incomplete")
        _print(f"merged {len(args.stats)} file(s): {merged.num_samples} samples, "
               f"{merged.num_batches} batches ({state}) -> {args.output}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    _check_outputs(args)
    result = apply_stats(args.model, args.stats, prior_strength=args.prior_strength)
    out = result.loaded.path if args.in_place else args.output
    write_model(result.model, out, like=result.loaded, in_place=args.in_place)
    _finish(args, result.report, out)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    result = compare_models(
        args.model_a, args.model_b, args.data, labels=args.labels,
        batch_size=args.batch_size, num_samples=args.num_samples, provider=args.provider,
        image_options=_image_options(args),
    )
    _print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 0


COMMANDS = {
    "inspect": _cmd_inspect,
    "recalibrate": _cmd_recalibrate,
    "collect": _cmd_collect,
    "merge": _cmd_merge,
    "apply": _cmd_apply,
    "compare": _cmd_compare,
}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        return f"{PROG}: {level}: {record.getMessage()}"


def _raise_interrupted(signum: int, frame) -> None:
    modelio.interrupt(signum)  # raises now, or right after a write's final renames


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread
            pass
    try:
        return COMMANDS[args.command](args)
    except Interrupted as exc:
        print(f"{PROG}: interrupted (signal {exc.signum}); no partial output left", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no partial output left", file=sys.stderr)
        return 130
    except BnrefOnnxError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
