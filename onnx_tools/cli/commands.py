"""The ``bnref-onnx`` subcommands: each turns its arguments into one API call and prints.

Every output is checked once, before any work (:func:`_check_outputs`, against the
:class:`~onnx_tools.reads.RunReads` account of everything the command reads), and the checked
:class:`~onnx_tools.outputs.OutputPath` is what the API writes to. A new subcommand that
writes builds its account with ``RunReads.of(...)`` and checks its outputs the same way.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from onnx_tools.analysis import ModelAnalysis, analyze_model
from onnx_tools.apply import apply_stats
from onnx_tools.batchnorms import FUNCTION_ADVICE
from onnx_tools.collection import collect
from onnx_tools.compare import compare_models
from onnx_tools.errors import OptionError, OutputError
from onnx_tools.jsonout import strict_dumps
from onnx_tools.outputs import (
    OutputPath,
    atomic_write_bytes,
    check_model_output,
    check_output,
    check_outputs,
    write_model,
)
from onnx_tools.pipeline import ModelDescription, describe_model, recalibrate
from onnx_tools.reads import RunReads
from onnx_tools.report import DriftReport
from onnx_tools.stats import load_stats, merge_state, merge_stats, save_stats
from onnx_tools.unfolding import unfold


def _image_options(args: argparse.Namespace):
    """The ``--image-*`` options as ``ImageOptions`` (None when none was given)."""
    from onnx_tools.data import ImageOptions

    given = {
        "crop": args.image_crop, "resize": args.image_resize, "mode": args.image_mode,
        "scale": args.image_scale, "mean": args.image_mean, "std": args.image_std,
        "layout": args.image_layout, "threads": args.decode_threads,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.image_exif_transpose:
        given["exif_transpose"] = True
    if args.skip_bad_images:
        given["skip_bad_images"] = True
    if args.no_jpeg_draft:
        given["jpeg_draft"] = False
    return ImageOptions(**given) if given else None


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
        **({"include": args.include, "exclude": args.exclude} if hasattr(args, "include") else {}),
        "image_options": _image_options(args),
        "prefetch": not args.no_prefetch,
        "progress": None if not args.quiet else False,
    }


class StdoutError(OutputError):
    """Standard output cannot be written (full disk, closed terminal): not a broken pipe."""


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): main exits quietly
    except OSError as exc:
        raise StdoutError(f"cannot write to standard output: {exc.strerror or exc}") from exc


def _format_description(name: str, desc: ModelDescription) -> list[str]:
    lines = []
    if not desc.batchnorms and not desc.in_functions and not desc.in_subgraphs:
        lines.append(f"{name}: {desc.advice}.")
    for bn in desc.batchnorms:
        s = bn.summary()
        stats = "not stored"
        if s["var_mean"] is not None and s["mean_abs_mean"] is not None:
            stats = (f"|mean| avg {s['mean_abs_mean']:.4g}, var min/avg/max "
                     f"{s['var_min']:.4g}/{s['var_mean']:.4g}/{s['var_max']:.4g}")
        lines.append(f"{bn.label}  (output {bn.output})"
                     + (f"  in {bn.function}" if bn.function else ""))
        lines.append(f"  channels {bn.channels}, eps {bn.epsilon:g}, momentum {bn.momentum:g}, "
                     f"opset {bn.opset}{', training_mode=1' if bn.training_mode else ''}")
        for role in ("mean", "var", "scale", "bias"):
            lines.append(f"  {role:5s}: {bn.sources[role].describe()}")
        lines.append(f"  stats: {stats}")
    if desc.in_subgraphs:
        lines.append("BatchNormalization inside control-flow bodies (not supported): "
                     + "; ".join(desc.in_subgraphs))
    if desc.in_functions:
        lines.append("BatchNormalization inside model-local functions that cannot be "
                     "recalibrated ("
                     f"{FUNCTION_ADVICE}): " + "; ".join(desc.in_functions))
    if desc.batchnorms:
        lines.append(f"{len(desc.batchnorms)} BatchNormalization node(s)")
    if desc.sites:
        lines.append(f"{len(desc.sites)} layer(s) without BN that `unfold` would give one "
                     "(folded at export):")
        lines += [f"  {site.op_type} {site.label}  ({site.channels} channels)" for site in desc.sites]
    return lines


def _cmd_inspect(args: argparse.Namespace) -> int:
    desc = describe_model(args.model)
    if args.json:
        _print(strict_dumps({"model": args.model, **desc.to_dict()}))
        return 0
    for line in _format_description(args.model, desc):
        _print(line)
    return 0


@dataclass(frozen=True)
class _Targets:
    output: OutputPath | None
    report: OutputPath | None
    model: ModelAnalysis | None  # the input model, loaded once: the account and the API share it


#: The subcommands whose OUT is a model (the others write a STATS file).
MODEL_WRITERS = ("recalibrate", "apply", "unfold")


def _check_outputs(args: argparse.Namespace) -> _Targets:
    """Fail before any work (so nothing is half-done) when an output cannot be written.

    Every output is checked against the one account of what the run reads
    (:class:`~onnx_tools.reads.RunReads`: the model and its external data, the data, STATS
    files) and against the other outputs. The model is loaded here, once: the API is given
    the analysis instead of the path (which it would parse again).
    """
    model = getattr(args, "model", None)
    analysis = analyze_model(model) if model is not None else None
    reads = RunReads.of(model=analysis, data=getattr(args, "data", None),
                        stats=getattr(args, "stats", None))
    if getattr(args, "source", None) is not None:
        reads.add_data(args.source, "source data")
    in_place = getattr(args, "in_place", False)
    if args.command in MODEL_WRITERS:
        output = check_model_output(args.model if in_place else args.output, reads,
                                    in_place=in_place)
    else:
        # Only a command with --in-place may suggest it: collect/merge name their output
        # otherwise, so writing onto the model is refused as onto any input.
        output = check_output(args.output, reads=reads, what="STATS output")
    checked = check_outputs({"output": output, "report": getattr(args, "report", None)}, reads)
    return _Targets(checked["output"], checked["report"], analysis)


def _finish(args: argparse.Namespace, report: DriftReport, targets: _Targets) -> None:
    if targets.report is not None:
        atomic_write_bytes(report.to_json().encode("utf-8"), targets.report)
    if not args.quiet:
        _print(report.format_table(max_rows=40))
        _print(f"wrote {args.model if args.in_place else args.output}")


def _unfold_kwargs(args: argparse.Namespace) -> dict:
    given = {"sites_include": args.sites_include, "sites_exclude": args.sites_exclude,
             "bn_eps": args.bn_eps, "cache_dir": args.cache_dir}
    return {**{k: v for k, v in given.items() if v is not None},
            "linear_sites": args.linear_sites}


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    targets = _check_outputs(args)
    unfold_options = _unfold_kwargs(args)
    if args.source is None:
        given = [f"--{k.replace('_', '-')}" for k, v in unfold_options.items() if v]
        if given:
            raise OptionError(f"{', '.join(given)} applies to folded models: give --source")
        unfold_options = {}
    result = recalibrate(
        targets.model, args.data, output=targets.output,
        in_place=args.in_place, prior_strength=args.prior_strength, source=args.source,
        **unfold_options, **_collect_kwargs(args),
    )
    _finish(args, result.report, targets)
    return 0


def _cmd_unfold(args: argparse.Namespace) -> int:
    targets = _check_outputs(args)
    result = unfold(targets.model, args.data, output=targets.output,
                    in_place=args.in_place, **_unfold_kwargs(args), **_collect_kwargs(args))
    if not args.quiet:
        _print(f"inserted {len(result.inserted)} BatchNormalization(s), {result.depth} deep "
               f"(statistics of {result.num_samples} source samples, exact at every depth; "
               f"eps {result.bn_eps:g})")
        _print(f"wrote {args.model if args.in_place else args.output}")
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    targets = _check_outputs(args)
    stats = collect(targets.model, args.data, shard=args.shard, **_collect_kwargs(args))
    save_stats(stats, targets.output)
    if not args.quiet:
        shard = f" (shard {stats.shards[0]}/{stats.num_shards})" if stats.num_shards > 1 else ""
        _print(f"collected {len(stats.bns)} BN over {stats.num_samples} samples in "
               f"{stats.num_batches} batches{shard} -> {args.output}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    targets = _check_outputs(args)
    merged = merge_stats([load_stats(p) for p in args.stats])
    save_stats(merged, targets.output)
    if not args.quiet:
        state = merge_state(merged, len(args.stats))
        _print(f"merged {len(args.stats)} file(s): {merged.num_samples} samples, "
               f"{merged.num_batches} batches ({state}) -> {args.output}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    targets = _check_outputs(args)
    result = apply_stats(targets.model, args.stats, prior_strength=args.prior_strength)
    write_model(result.model, targets.output, like=result.loaded, in_place=args.in_place)
    _finish(args, result.report, targets)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    result = compare_models(
        args.model_a, args.model_b, args.data, labels=args.labels,
        batch_size=args.batch_size, num_samples=args.num_samples, provider=args.provider,
        image_options=_image_options(args),
    )
    _print(strict_dumps(result.to_dict()) if args.json else result.format())
    return 0


COMMANDS = {
    "inspect": _cmd_inspect,
    "recalibrate": _cmd_recalibrate,
    "unfold": _cmd_unfold,
    "collect": _cmd_collect,
    "merge": _cmd_merge,
    "apply": _cmd_apply,
    "compare": _cmd_compare,
}
