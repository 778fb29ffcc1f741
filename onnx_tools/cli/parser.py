"""The ``bnref-onnx`` argument parser: subcommands, their options and the value types.

Values are parsed here (a malformed number is a usage error, exit 2); what they mean is
checked once, by the API the command calls.
"""

from __future__ import annotations

import argparse
import re

import bnref
from onnx_tools.options import PROVIDERS

PROG = "bnref-onnx"


def version() -> str:
    """``bnref-onnx X (onnx Y, onnxruntime Z)``."""
    import onnx

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = "not installed"
    return f"{PROG} {bnref.__version__} (onnx {onnx.__version__}, onnxruntime {ort_version})"


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (it imports onnx and onnxruntime)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the versions of bnref-onnx, onnx and onnxruntime and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: D102
        print(version())
        parser.exit()


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected I/K (e.g. 0/4), got {text!r}")
    i, k = int(m.group(1)), int(m.group(2))
    if k < 1 or i >= k:
        raise argparse.ArgumentTypeError(f"shard I/K needs 0 <= I < K, got {text!r}")
    return i, k


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, else a usage error saying ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


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


def _add_collection(p: argparse.ArgumentParser, *, bn_selection: bool = True) -> None:
    g = p.add_argument_group("collection options")
    g.add_argument("--batch-size", type=_positive_int, default=64,
                   help="normalization batch size (default 64; a static batch dim overrides)")
    g.add_argument("--num-samples", type=_positive_int, default=None,
                   help="use at most N samples (default: all)")
    g.add_argument("--estimator", choices=list(bnref.ESTIMATORS),
                   default="population",
                   help="population: pooled biased variance (fvcore, the paper); "
                   "mean_of_variances: mean of unbiased batch variances (torch update_bn)")
    g.add_argument("--bessel", action="store_true",
                   help="population only: write n/(n-1) times the pooled variance")
    g.add_argument("--provider", choices=list(PROVIDERS), default="auto",
                   help="onnxruntime execution provider (default auto: CUDA if it really runs)")
    g.add_argument("--shuffle", action="store_true", help="take samples in a seeded random order")
    g.add_argument("--seed", type=_nonneg_int, default=None,
                   help="seed for --shuffle (default 0; refused without --shuffle)")
    g.add_argument("--keep-partial", action="store_true",
                   help="keep a final batch smaller than --batch-size (dropped by default)")
    if bn_selection:  # unfold runs every BN in training mode
        g.add_argument("--include", metavar="REGEX", help="only BN whose node/output name matches")
        g.add_argument("--exclude", metavar="REGEX", help="skip BN whose node/output name matches")
    g.add_argument("--no-prefetch", action="store_true",
                   help="read each batch on the main thread instead of one batch ahead on a "
                   "background thread (for readers tied to their thread, e.g. sqlite3)")
    _add_images(p)


def _add_images(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image folder options (DATA is a directory)")
    g.add_argument("--image-crop", type=_positive_int, help="center crop size (default: model's)")
    g.add_argument("--image-resize", type=_positive_int,
                   help="shorter side before cropping (default crop/0.875)")
    g.add_argument("--image-mode", choices=["RGB", "L"], help="pillow mode (default from model)")
    g.add_argument("--image-scale", type=float,
                   help="factor on 8-bit pixel values (default 1/255; 16-bit images are "
                   "mapped to the 8-bit range first)")
    g.add_argument("--image-mean", type=_floats, help="per-channel mean (default ImageNet)")
    g.add_argument("--image-std", type=_floats, help="per-channel std (default ImageNet)")
    g.add_argument("--image-layout", choices=["NCHW", "NHWC"], help="default from the model")
    g.add_argument("--image-exif-transpose", action="store_true",
                   help="apply the EXIF orientation tag (default: images as stored, like "
                   "pillow and torchvision)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave out unreadable images (counted and named in the notes) "
                   "instead of failing")
    g.add_argument("--decode-threads", type=_positive_int, metavar="N",
                   help="threads decoding each batch's images (default: one per CPU, at "
                   "most 8; the batches are the same whatever N)")
    g.add_argument("--no-jpeg-draft", action="store_true",
                   help="always decode JPEGs at full size (default: libjpeg's 1/2-1/8 "
                   "draft while it keeps 2.5x the resize target)")


def _add_unfold(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unfold options (folded models)")
    g.add_argument("--sites-include", metavar="REGEX",
                   help="also insert a BN after the layers whose node/output name matches")
    g.add_argument("--sites-exclude", metavar="REGEX",
                   help="insert no BN after the layers whose node/output name matches")
    g.add_argument("--linear-sites", action="store_true",
                   help="also Gemm/MatMul layers (a BN1d folded into a fully connected layer)")
    g.add_argument("--bn-eps", type=_positive_float, metavar="E", default=None,
                   help="epsilon of the inserted BNs (default 1e-5; see docs/unfold.md)")
    g.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="where activations are cached between waves (default: the system's "
                   "temporary folder; removed at the end)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _output_group(p: argparse.ArgumentParser, *, short: bool) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    names = ["--output", "-o"] if short else ["--output"]
    g.add_argument(*names, dest="output", metavar="OUT", help="write the new model here")
    g.add_argument("--in-place", action="store_true", help="overwrite the input model")


#: Each subcommand: one-line help, description, examples (shown by ``COMMAND --help``).
SUBCOMMANDS = {
    "inspect": (
        "list BN nodes and their statistics",
        "List every BatchNormalization node of the main graph: channels, eps, momentum, where "
        "its scale/bias/mean/var are stored (initializer, Constant, Identity alias, shared), "
        "and a summary of the stored statistics. No BN usually means it was folded at export.",
        ["bnref-onnx inspect model.onnx", "bnref-onnx inspect model.onnx --json"],
    ),
    "recalibrate": (
        "collect and apply in one go",
        "Run the model with every selected BN in training mode over DATA, aggregate each BN's "
        "batch statistics (Precise BatchNorm), and write a model with the new mean/var. The "
        "input model is never modified unless --in-place.",
        ["bnref-onnx recalibrate model.onnx --data calib.npz -o fixed.onnx",
         "bnref-onnx recalibrate model.onnx --data images/ -o fixed.onnx --batch-size 32 "
         "--report drift.json"],
    ),
    "unfold": (
        "put BN back into a model whose exporter folded it",
        "Insert a BatchNormalization after each convolution the exporter folded a BN into, "
        "with the population statistics of its output on SOURCE data (every BN in training "
        "mode, exact by depth). The new model computes what the input does at inference; "
        "recalibrate it on target data to adapt it as if BN had been kept. `inspect` lists "
        "the sites.",
        ["bnref-onnx unfold folded.onnx --data source_images/ -o unfolded.onnx",
         "bnref-onnx recalibrate folded.onnx --data target/ --source source/ -o adapted.onnx"],
    ),
    "collect": (
        "collect statistics into a STATS file",
        "Collect the Precise BatchNorm statistics of the model over DATA into a STATS file, "
        "to apply later or to merge with other shards (--shard I/K takes whole batches I, "
        "I+K, ...; merging all K shards gives exactly one unsharded run).",
        ["bnref-onnx collect model.onnx --data calib.npy -o stats.npz",
         "bnref-onnx collect model.onnx --data calib.npy -o s0.npz --shard 0/2"],
    ),
    "merge": (
        "merge STATS shards (any order)",
        "Merge STATS files of the shards of one collection run, in any order, into one.",
        ["bnref-onnx merge s0.npz s1.npz -o stats.npz"],
    ),
    "apply": (
        "write a STATS file into a model",
        "Write the statistics of a STATS file into the BN mean/var of the model it was "
        "collected on (a STATS file from another model, checkpoint or input size is refused).",
        ["bnref-onnx apply model.onnx stats.npz -o fixed.onnx",
         "bnref-onnx apply model.onnx stats.npz -o fixed.onnx --prior-strength 64"],
    ),
    "compare": (
        "compare two models on data",
        "Run both models over DATA in inference mode and compare every output: the largest "
        "difference, and for classifier outputs (N, classes) the top-1 agreement and, with "
        "--labels, each model's accuracy.",
        ["bnref-onnx compare model.onnx fixed.onnx --data val.npz --labels val_labels.npy"],
    ),
}


def _subcommand(sub: argparse._SubParsersAction, name: str,
                common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    help_text, description, examples = SUBCOMMANDS[name]
    p = sub.add_parser(
        name, parents=[common], help=help_text, description=description,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    p.set_defaults(subparser=p)  # so a misspelled option is reported with this usage
    return p


def _add_model_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = _subcommand(sub, "inspect", common)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _subcommand(sub, "recalibrate", common)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DATA",
                   help=".npy, .npz, image folder, module:function or file.py:function")
    _output_group(p, short=True)
    _add_collection(p)
    p.add_argument("--prior-strength", type=_nonneg_float, metavar="N0",
                   help="blend old and new statistics (Schneider et al. 2020)")
    p.add_argument("--report", metavar="REPORT.json", help="write the drift report as JSON")
    p.add_argument("--source", metavar="SOURCE",
                   help="the model's BN was folded: unfold it with SOURCE data first (the "
                   "data it was trained on), then recalibrate on DATA")
    _add_unfold(p)

    p = _subcommand(sub, "unfold", common)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="source data (what the model was trained on): .npy, .npz, image "
                   "folder, module:function or file.py:function")
    _output_group(p, short=True)
    _add_collection(p, bn_selection=False)
    _add_unfold(p)


def _add_stats_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = _subcommand(sub, "collect", common)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DATA",
                   help=".npy, .npz, image folder, module:function or file.py:function")
    p.add_argument("--output", "-o", required=True, metavar="STATS", help="the STATS file to write")
    p.add_argument("--shard", type=_shard, metavar="I/K", help="take whole batches I, I+K, ...")
    _add_collection(p)

    p = _subcommand(sub, "merge", common)
    p.add_argument("stats", nargs="+", metavar="STATS")
    p.add_argument("--output", "-o", required=True, metavar="STATS", help="the merged STATS file")

    p = _subcommand(sub, "apply", common)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("stats", metavar="STATS")
    _output_group(p, short=True)
    p.add_argument("--prior-strength", type=_nonneg_float, metavar="N0",
                   help="blend old and new statistics (Schneider et al. 2020)")
    p.add_argument("--report", metavar="REPORT.json", help="write the drift report as JSON")


def _add_compare(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = _subcommand(sub, "compare", common)
    p.add_argument("model_a", metavar="MODEL_A")
    p.add_argument("model_b", metavar="MODEL_B")
    p.add_argument("--data", required=True, metavar="DATA")
    p.add_argument("--labels", metavar="LABELS.npy", help="integer class labels, one per sample")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    p.add_argument("--num-samples", type=_positive_int, default=None,
                   help="compare the first N samples (and labels)")
    p.add_argument("--provider", choices=list(PROVIDERS), default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_images(p)


def _global_flags(default: object) -> argparse.ArgumentParser:
    """``--debug`` and ``--quiet``, accepted before and after the command.

    The subcommands' copies default to ``SUPPRESS``: a subparser's defaults are written over
    the namespace, so ``False`` there would undo ``bnref-onnx --quiet COMMAND``.
    """
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    flags.add_argument("--quiet", "-q", action="store_true", default=default,
                       help="no progress bar, report table or notes")
    return flags


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (exposed for documentation and tests)."""
    common = _global_flags(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[_global_flags(False)], allow_abbrev=False,
        description="Recalibrate the BatchNormalization statistics of an ONNX model with "
        "Precise BatchNorm (training-mode batch statistics aggregated over calibration data).",
        epilog="Run `bnref-onnx COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub, common)
    _add_stats_commands(sub, common)
    _add_compare(sub, common)
    return parser
