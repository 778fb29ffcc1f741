"""bnref-onnx: Precise BatchNorm recalibration of exported ONNX models.

The command line (``bnref-onnx``, ``python -m onnx_tools``) is a thin layer over this API::

    import onnx_tools as ot

    ot.inspect_model("model.onnx")                       # -> list of BatchNormInfo
    result = ot.recalibrate("model.onnx", "calib.npz", output="fixed.onnx")
    print(result.report.format_table())

    stats = ot.collect("model.onnx", "calib.npz", shard=(0, 2))   # one shard
    ot.save_stats(stats, "s0.npz")
    merged = ot.merge_stats([ot.load_stats("s0.npz"), ot.load_stats("s1.npz")])
    applied = ot.apply_stats("model.onnx", merged)       # -> ApplyResult(model, report, ...)
    ot.write_model(applied.model, "fixed.onnx", like=applied.loaded)
    ot.compare_models("model.onnx", "fixed.onnx", "val.npz", labels="val_labels.npy")

Where things live: :mod:`~onnx_tools.graph` (finding BN and where its tensors are stored),
:mod:`~onnx_tools.rewrite` (the training-mode collection model), :mod:`~onnx_tools.collect`
(running it and aggregating with ``bnref.PreciseBN``), :mod:`~onnx_tools.stats` (STATS
files, merging shards), :mod:`~onnx_tools.apply` (writing statistics back),
:mod:`~onnx_tools.report` (drift), :mod:`~onnx_tools.compare`, :mod:`~onnx_tools.data`
(calibration data), :mod:`~onnx_tools.modelio` (loading, sessions, atomic writes),
:mod:`~onnx_tools.cli`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import onnx

from onnx_tools.apply import ApplyResult, apply_stats
from onnx_tools.collect import collect
from onnx_tools.compare import Comparison, compare_models
from onnx_tools.errors import (
    BnrefOnnxError,
    DataError,
    Interrupted,
    ModelError,
    OutputError,
    ProviderError,
    StatsError,
)
from onnx_tools.graph import BatchNormInfo, find_batchnorms
from onnx_tools.modelio import LoadedModel, check_output, load_model, write_model
from onnx_tools.report import DriftReport
from onnx_tools.stats import CollectedStats, load_stats, merge_stats, save_stats

__all__ = [
    "ApplyResult",
    "BatchNormInfo",
    "BnrefOnnxError",
    "CollectedStats",
    "Comparison",
    "DataError",
    "DriftReport",
    "Interrupted",
    "LoadedModel",
    "ModelError",
    "OutputError",
    "ProviderError",
    "RecalibrationResult",
    "StatsError",
    "apply_stats",
    "collect",
    "compare_models",
    "inspect_model",
    "load_model",
    "load_stats",
    "merge_stats",
    "recalibrate",
    "save_stats",
    "write_model",
]


def inspect_model(model: str | os.PathLike | onnx.ModelProto | LoadedModel) -> list[BatchNormInfo]:
    """BatchNormalization nodes of the main graph with channels, eps, momentum and storage.

    An empty list usually means BN was folded at export (see ``graph.EXPORT_ADVICE``).
    """
    loaded = load_model(model)
    return find_batchnorms(loaded.model, loaded.base_dir)


@dataclass
class RecalibrationResult:
    """What :func:`recalibrate` produced: the new model, its drift report and the statistics."""

    model: onnx.ModelProto
    report: DriftReport
    stats: CollectedStats
    applied: ApplyResult


def recalibrate(
    model: str | os.PathLike | onnx.ModelProto | LoadedModel,
    data: Any,
    *,
    output: str | os.PathLike | None = None,
    in_place: bool = False,
    prior_strength: float | None = None,
    **collect_options: Any,
) -> RecalibrationResult:
    """Collect Precise BatchNorm statistics over ``data`` and write them into ``model``.

    ``collect_options`` are those of :func:`onnx_tools.collect.collect` (``batch_size=64``,
    ``estimator="population"``, ``provider="auto"``, ...). With ``output`` (or ``in_place``
    for a model path) the new model is written atomically and checked; otherwise it is only
    returned. The input model is never modified unless ``in_place``.
    """
    loaded = load_model(model)
    if in_place:
        if loaded.path is None:
            raise OutputError("in_place needs a model path")
        output = loaded.path
    if output is not None:  # fail before collecting, not after
        check_output(output, input_path=loaded.path, in_place=in_place)
    stats = collect(loaded, data, **collect_options)
    applied = apply_stats(loaded, stats, prior_strength=prior_strength)
    if output is not None:
        write_model(applied.model, output, like=loaded, in_place=in_place)
    return RecalibrationResult(applied.model, applied.report, stats, applied)
