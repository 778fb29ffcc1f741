"""The whole jobs: :func:`recalibrate` (collect + apply + write) and :func:`inspect_model`.

Each loads and analyzes the model once (:func:`~onnx_tools.analysis.analyze_model`) and
checks its outputs before any work, so a run that cannot write fails in a second, not after
collecting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnx_tools.analysis import ModelAnalysis, ModelLike, analyze_model
from onnx_tools.apply import ApplyResult, apply_stats
from onnx_tools.batchnorms import (
    EXPORT_ADVICE,
    FUNCTION_ADVICE,
    BatchNormInfo,
    batchnorms_in_subgraphs,
)
from onnx_tools.collection import collect
from onnx_tools.errors import OptionError
from onnx_tools.modelio import LoadedModel
from onnx_tools.options import arg, check_prior_strength, checked
from onnx_tools.outputs import OutputPath, model_target, write_model
from onnx_tools.reads import RunReads
from onnx_tools.report import DriftReport
from onnx_tools.stats import CollectedStats
from onnx_tools.unfolding import Site, UnfoldResult, find_sites, unfold_model


@dataclass
class ModelDescription:
    """What ``bnref-onnx inspect`` shows: the BNs of the main graph and those it cannot use."""

    batchnorms: list[BatchNormInfo]
    in_subgraphs: list[str] = field(default_factory=list)
    in_functions: list[str] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)

    @property
    def advice(self) -> str | None:
        """What to do when the model's BNs cannot be recalibrated (or it has none at all)."""
        if self.in_functions:
            return ("BatchNormalization inside model-local functions that cannot be "
                    f"recalibrated: {FUNCTION_ADVICE}")
        if self.batchnorms or self.in_subgraphs:
            return None
        text = f"no BatchNormalization: {EXPORT_ADVICE}"
        if self.sites:
            text += (f". Where re-exporting is not possible, `bnref-onnx unfold` puts a BN back "
                     f"after each of the {len(self.sites)} folded layer(s) listed, from source "
                     "data (`unfold MODEL --data SOURCE -o OUT`, or `recalibrate MODEL --data "
                     "TARGET --source SOURCE -o OUT` to adapt it at once)")
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``inspect --json``)."""
        out: dict[str, Any] = {
            "batchnorms": [bn.to_dict() for bn in self.batchnorms],
            "in_subgraphs": list(self.in_subgraphs),
            "in_functions": list(self.in_functions),
            "unfold_sites": [site.to_dict() for site in self.sites],
        }
        if self.advice:
            out["advice"] = self.advice
        return out


def describe_model(model: ModelLike | ModelAnalysis) -> ModelDescription:
    """Every BN of the main graph (channels, eps, momentum, storage) and those in subgraphs."""
    analysis = analyze_model(model)
    return ModelDescription(analysis.batchnorms, batchnorms_in_subgraphs(analysis.model),
                            in_functions=analysis.functions.unsupported,
                            sites=find_sites(analysis.model))


def inspect_model(model: ModelLike | ModelAnalysis) -> list[BatchNormInfo]:
    """BatchNormalization nodes of the main graph with channels, eps, momentum and storage.

    An empty list usually means BN was folded at export (see ``batchnorms.EXPORT_ADVICE``).
    """
    return describe_model(model).batchnorms


@dataclass
class RecalibrationResult:
    """What :func:`recalibrate` produced: the new model, its drift report and the statistics."""

    model: onnx.ModelProto
    report: DriftReport
    stats: CollectedStats
    applied: ApplyResult
    unfolded: UnfoldResult | None = None


@checked(extra=collect)
def recalibrate(
    model: ModelLike | ModelAnalysis,
    data: Any,
    *,
    output: str | os.PathLike | OutputPath | None = None,
    in_place: bool = False,
    prior_strength: float | None = None,
    source: Any = None,
    bn_eps: float | None = None,
    sites_include: str | None = None,
    sites_exclude: str | None = None,
    linear_sites: bool = False,
    cache_dir: str | os.PathLike | None = None,
    **collect_options: Any,
) -> RecalibrationResult:
    """Collect Precise BatchNorm statistics over ``data`` and write them into ``model``.

    With ``source`` the model's BN was folded away at export: it is first unfolded with
    ``source`` data (:func:`onnx_tools.unfold`; ``bn_eps``, ``sites_include``,
    ``sites_exclude``, ``linear_sites`` and ``cache_dir`` go there, as do the collection options but
    ``include``/``exclude``), then recalibrated on ``data``.

    ``collect_options`` are those of :func:`onnx_tools.collection.collect` (``batch_size=64``,
    ``estimator="population"``, ``provider="auto"``, ...). With ``output`` (or ``in_place``
    for a model path) the new model is written atomically and checked; otherwise it is only
    returned. The input model is never modified unless ``in_place`` (which takes no
    ``output``); an output that is a file the run reads is refused (:mod:`onnx_tools.reads`).
    """
    given = {"bn_eps": bn_eps, "sites_include": sites_include, "sites_exclude": sites_exclude,
             "linear_sites": linear_sites or None, "cache_dir": cache_dir}
    unfold_options = {k: v for k, v in given.items() if v is not None}
    if unfold_options and source is None:
        raise OptionError(f"{', '.join(arg(k) for k in sorted(unfold_options))} applies to "
                          f"folded models: give {arg('source')} (the data to unfold with)")
    analysis = analyze_model(model)
    unfolded = None
    check_prior_strength(prior_strength)  # fail before collecting, not after
    # Every output is checked against everything the run reads (onnx_tools.reads).
    reads = RunReads.of(model=analysis, data=data)
    if source is not None:
        reads.add_data(source, "source data")
    target = model_target(analysis.loaded, output, in_place, reads)
    if source is not None:
        unfolded = unfold_model(analysis, source, **unfold_options, **{
            k: v for k, v in collect_options.items() if k not in ("include", "exclude", "shard")})
        loaded = analysis.loaded
        analysis = analyze_model(LoadedModel(unfolded.model, loaded.path, loaded.base_dir,
                                             loaded.external, loaded.locations))
    stats = collect(analysis, data, **collect_options)
    applied = apply_stats(analysis, stats, prior_strength=prior_strength)
    if target is not None:
        write_model(applied.model, target, like=analysis.loaded, in_place=in_place)
    return RecalibrationResult(applied.model, applied.report, stats, applied, unfolded)
