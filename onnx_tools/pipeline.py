"""The whole jobs: :func:`recalibrate` (collect + apply + write) and :func:`inspect_model`.

Each loads and analyzes the model once (:func:`~onnx_tools.analysis.analyze_model`) and
checks its outputs before any work, so a run that cannot write fails in a second, not after
collecting.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnx_tools.analysis import ModelAnalysis, ModelLike, analyze_model
from onnx_tools.apply import ApplyResult, apply_stats
from onnx_tools.batchnorms import EXPORT_ADVICE, BatchNormInfo, batchnorms_in_subgraphs
from onnx_tools.collection import collect
from onnx_tools.errors import OptionError, OutputError
from onnx_tools.options import check_keywords, check_prior_strength
from onnx_tools.outputs import OutputPath, check_model_output, write_model
from onnx_tools.reads import RunReads
from onnx_tools.report import DriftReport
from onnx_tools.stats import CollectedStats


@dataclass
class ModelDescription:
    """What ``bnref-onnx inspect`` shows: the BNs of the main graph and those it cannot use."""

    batchnorms: list[BatchNormInfo]
    in_subgraphs: list[str] = field(default_factory=list)

    @property
    def advice(self) -> str | None:
        """How to export with BN kept, when the model has no BN at all."""
        return None if self.batchnorms else f"no BatchNormalization: {EXPORT_ADVICE}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``inspect --json``)."""
        out: dict[str, Any] = {
            "batchnorms": [bn.to_dict() for bn in self.batchnorms],
            "in_subgraphs": list(self.in_subgraphs),
        }
        if self.advice:
            out["advice"] = self.advice
        return out


def describe_model(model: ModelLike | ModelAnalysis) -> ModelDescription:
    """Every BN of the main graph (channels, eps, momentum, storage) and those in subgraphs."""
    analysis = analyze_model(model)
    return ModelDescription(analysis.batchnorms, batchnorms_in_subgraphs(analysis.model))


def inspect_model(model: ModelLike | ModelAnalysis) -> list[BatchNormInfo]:
    """BatchNormalization nodes of the main graph with channels, eps, momentum and storage.

    An empty list usually means BN was folded at export (see ``batchnorms.EXPORT_ADVICE``).
    """
    return describe_model(model).batchnorms


#: What ``recalibrate(**collect_options)`` passes on to :func:`~onnx_tools.collection.collect`.
_COLLECT_OPTIONS = tuple(
    name for name, p in inspect.signature(collect).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


@dataclass
class RecalibrationResult:
    """What :func:`recalibrate` produced: the new model, its drift report and the statistics."""

    model: onnx.ModelProto
    report: DriftReport
    stats: CollectedStats
    applied: ApplyResult


def recalibrate(
    model: ModelLike | ModelAnalysis,
    data: Any,
    *,
    output: str | os.PathLike | OutputPath | None = None,
    in_place: bool = False,
    prior_strength: float | None = None,
    **collect_options: Any,
) -> RecalibrationResult:
    """Collect Precise BatchNorm statistics over ``data`` and write them into ``model``.

    ``collect_options`` are those of :func:`onnx_tools.collection.collect` (``batch_size=64``,
    ``estimator="population"``, ``provider="auto"``, ...). With ``output`` (or ``in_place``
    for a model path) the new model is written atomically and checked; otherwise it is only
    returned. The input model is never modified unless ``in_place`` (which takes no
    ``output``); an output that is a file the run reads is refused (:mod:`onnx_tools.reads`).
    """
    check_keywords("recalibrate", collect_options, _COLLECT_OPTIONS)
    if in_place and output is not None:
        raise OptionError("give output or in_place, not both: in_place=True overwrites the "
                          "input model itself")
    analysis = analyze_model(model)
    check_prior_strength(prior_strength)  # fail before collecting, not after
    # Every output is checked against everything the run reads (onnx_tools.reads).
    reads = RunReads.of(model=analysis, data=data)
    target = None
    if in_place:
        if analysis.loaded.path is None:
            raise OutputError("in_place needs a model path")
        target = check_model_output(analysis.loaded.path, reads, in_place=True)
    elif isinstance(output, OutputPath):
        target = output  # checked by the caller
    elif output is not None:
        target = check_model_output(output, reads)
    stats = collect(analysis, data, **collect_options)
    applied = apply_stats(analysis, stats, prior_strength=prior_strength)
    if target is not None:
        write_model(applied.model, target, like=analysis.loaded, in_place=in_place)
    return RecalibrationResult(applied.model, applied.report, stats, applied)
