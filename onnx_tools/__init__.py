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

Where things live (docs/layout.md has the full map):
:mod:`~onnx_tools.pipeline` (``recalibrate``, ``inspect_model``),
:mod:`~onnx_tools.batchnorms` (finding BN) and :mod:`~onnx_tools.graph` (where tensors are
stored), :mod:`~onnx_tools.analysis` (a model's BNs and fingerprint, worked out once),
:mod:`~onnx_tools.rewrite` (the training-mode collection model),
:mod:`~onnx_tools.session` (onnxruntime sessions), :mod:`~onnx_tools.collection` (running it and
aggregating with ``bnref.PreciseBN``), :mod:`~onnx_tools.stats` (STATS files, merging
shards), :mod:`~onnx_tools.apply` (writing statistics back), :mod:`~onnx_tools.report`
(drift), :mod:`~onnx_tools.compare`, :mod:`~onnx_tools.data` (calibration data),
:mod:`~onnx_tools.modelio` (loading) and :mod:`~onnx_tools.outputs` (atomic writes),
:mod:`~onnx_tools.cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx_tools.analysis import ModelAnalysis, analyze_model
    from onnx_tools.apply import ApplyResult, apply_stats
    from onnx_tools.batchnorms import BatchNormInfo, find_batchnorms
    from onnx_tools.collection import collect
    from onnx_tools.compare import Comparison, compare_models
    from onnx_tools.errors import (
        BnrefOnnxError,
        DataError,
        Interrupted,
        ModelError,
        OptionError,
        OptionTypeError,
        OutputError,
        ProviderError,
        StatsError,
    )
    from onnx_tools.modelio import LoadedModel, load_model
    from onnx_tools.outputs import OutputPath, check_output, write_model
    from onnx_tools.pipeline import (
        ModelDescription,
        RecalibrationResult,
        describe_model,
        inspect_model,
        recalibrate,
    )
    from onnx_tools.report import DriftReport
    from onnx_tools.stats import CollectedStats, load_stats, merge_stats, save_stats

#: Public name -> the module defining it. Imported on first use (PEP 562), so
#: ``import onnx_tools.cli`` starts without loading onnx, onnxruntime or the data layer.
_EXPORTS = {
    "ModelAnalysis": "onnx_tools.analysis",
    "analyze_model": "onnx_tools.analysis",
    "ApplyResult": "onnx_tools.apply",
    "apply_stats": "onnx_tools.apply",
    "BatchNormInfo": "onnx_tools.batchnorms",
    "find_batchnorms": "onnx_tools.batchnorms",
    "collect": "onnx_tools.collection",
    "Comparison": "onnx_tools.compare",
    "compare_models": "onnx_tools.compare",
    "BnrefOnnxError": "onnx_tools.errors",
    "DataError": "onnx_tools.errors",
    "Interrupted": "onnx_tools.errors",
    "ModelError": "onnx_tools.errors",
    "OptionError": "onnx_tools.errors",
    "OptionTypeError": "onnx_tools.errors",
    "OutputError": "onnx_tools.errors",
    "ProviderError": "onnx_tools.errors",
    "StatsError": "onnx_tools.errors",
    "LoadedModel": "onnx_tools.modelio",
    "load_model": "onnx_tools.modelio",
    "OutputPath": "onnx_tools.outputs",
    "check_output": "onnx_tools.outputs",
    "write_model": "onnx_tools.outputs",
    "ModelDescription": "onnx_tools.pipeline",
    "RecalibrationResult": "onnx_tools.pipeline",
    "describe_model": "onnx_tools.pipeline",
    "inspect_model": "onnx_tools.pipeline",
    "recalibrate": "onnx_tools.pipeline",
    "DriftReport": "onnx_tools.report",
    "CollectedStats": "onnx_tools.stats",
    "load_stats": "onnx_tools.stats",
    "merge_stats": "onnx_tools.stats",
    "save_stats": "onnx_tools.stats",
}

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
    "ModelAnalysis",
    "ModelDescription",
    "ModelError",
    "OptionError",
    "OptionTypeError",
    "OutputError",
    "OutputPath",
    "ProviderError",
    "RecalibrationResult",
    "StatsError",
    "analyze_model",
    "apply_stats",
    "check_output",
    "collect",
    "compare_models",
    "describe_model",
    "find_batchnorms",
    "inspect_model",
    "load_model",
    "load_stats",
    "merge_stats",
    "recalibrate",
    "save_stats",
    "write_model",
]



def __getattr__(name: str):
    """Import a public name's module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnx_tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
