"""``unfold``: give a model whose exporter folded BN away its BatchNormalization back.

After each site (:mod:`onnx_tools.unfolding.sites`) a BN is inserted whose running mean m and
variance v are the population statistics of the site's output on SOURCE data, collected as
``recalibrate`` collects (every BN in training mode, equal weight per sample), with scale
``sqrt(v + eps')`` and bias m (:mod:`onnx_tools.unfolding.insert`): at inference the unfolded
model computes what the folded one does, and recalibrating it on TARGET data maps each
channel's target moments onto the source moments, as recalibrating the BN-kept model does.

Depth, exactly: in training mode an inserted BN's output depends on its own statistics
(they are its scale and bias), so the statistics of a BN at depth d are exact only once
every inserted BN above it has its final statistics. By default the network runs in waves
by depth, each part once, with the activations the next waves read cached on disk
(:mod:`onnx_tools.unfolding.waves`, :mod:`onnx_tools.unfolding.wave_run`). ``waves=False``
runs D passes from the inputs instead: pass d runs the model with the BNs of depth < d final
and collects the BNs of depth d (a collection model whose outputs are the statistics of BNs
of depth <= d, so onnxruntime runs only the part above depth d). Both are exact; they agree
to float rounding (``tests/onnx_tools/test_unfold.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

import bnref
from onnx_tools.analysis import ModelAnalysis, ModelLike, analyze_model
from onnx_tools.apply import set_metadata
from onnx_tools.batchnorms import find_batchnorms
from onnx_tools.collection import collect
from onnx_tools.data import DataSource
from onnx_tools.errors import DataError, ModelError, OptionError
from onnx_tools.modelio import LoadedModel
from onnx_tools.options import arg, checked
from onnx_tools.outputs import OutputPath, model_target, write_model
from onnx_tools.reads import RunReads
from onnx_tools.unfolding.insert import InsertedBN, insert_batchnorms, set_statistics
from onnx_tools.unfolding.sites import Site, find_sites
from onnx_tools.unfolding.wave_run import run_waves

logger = logging.getLogger(__name__)

#: Default eps' of the inserted BNs: ONNX's and PyTorch's default BN epsilon (see the docs'
#: "Folded models" page for the error a scalar eps' leaves and when to set ``bn_eps``).
DEFAULT_BN_EPS = 1e-5

#: ``metadata_props`` keys written by unfold.
METADATA_PREFIX = "bnref.unfold."

#: Collection options that make no sense for unfold's passes (each pass needs all the data,
#: and every BN runs in training mode while source statistics are collected).
_REFUSED = ("shard", "include", "exclude")

@dataclass
class UnfoldResult:
    """What :func:`unfold` produced.

    ``model``: the unfolded model; ``inserted``: the BNs it added (site, depth, tensors);
    ``statistics``: each inserted BN's (mean, var) by key; ``depth``: D, the deepest inserted
    BN (waves run, or passes over the source with ``waves=False``); ``source_fingerprint``/``num_samples``:
    the source data used; ``cache_peak_bytes``: the most the activation cache held on disk.
    """

    model: onnx.ModelProto
    inserted: list[InsertedBN]
    statistics: dict[str, tuple[np.ndarray, np.ndarray]]
    depth: int
    bn_eps: float
    source_fingerprint: str
    num_samples: int
    notes: list[str] = field(default_factory=list)
    cache_peak_bytes: int = 0

    @property
    def sites(self) -> list[Site]:
        """The folded layers a BN was inserted after, in node order."""
        return [bn.site for bn in self.inserted]


def _replayable(data: Any) -> None:
    """Unfold reads SOURCE once per depth: refuse data that can be read only once."""
    if isinstance(data, str | os.PathLike | np.ndarray | Mapping | list | tuple | DataSource):
        return
    raise OptionError(
        f"unfold with waves=False reads the source data once per depth level; a "
        f"{type(data).__name__} can be read only once: pass a path, an array, a mapping of "
        "arrays or a list of feed dicts, or use the default waves=True"
    )


@contextlib.contextmanager
def _notes_once(quiet: bool):
    """Pass 2 onwards: the notes of collection and data (provider, casts, ...) said once."""
    loggers = [logging.getLogger(name) for name in ("onnx_tools.collection", "onnx_tools.data")]
    levels = [lg.level for lg in loggers]
    try:
        if quiet:
            for lg in loggers:
                lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _run_passes(work: onnx.ModelProto, loaded: LoadedModel, inserted: list[InsertedBN],
                data: Any, bn_eps: float, options: dict[str, Any],
                ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, Any]:
    """Collect each depth's statistics with every shallower inserted BN final."""
    estimator = options.get("estimator", "population")
    bessel = options.get("bessel", False)
    inserted_keys = {bn.key for bn in inserted}
    depth = max(bn.depth for bn in inserted)
    final: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    first = None
    logger.info("unfolding %d layer(s), %d deep: %d pass(es) over the source data",
                len(inserted), depth, depth)
    for d in range(1, depth + 1):
        level = [bn for bn in inserted if bn.depth == d]
        keep = {bn.key for bn in inserted if bn.depth <= d}
        bns = [bn for bn in find_batchnorms(work, loaded.base_dir)
               if bn.key in keep or bn.key not in inserted_keys]
        analysis = ModelAnalysis(LoadedModel(work, loaded.path, loaded.base_dir), bns)
        with _notes_once(d > 1):
            stats = collect(analysis, data, **options)
        if first is None:
            first = stats
        elif stats.data_fingerprint != first.data_fingerprint:
            raise DataError("the source data changed between unfold's passes (its fingerprint "
                            "differs); unfold needs data that reads the same every time")
        for bn in level:
            precise = stats.precise(bn.key, estimator, bessel)
            final[bn.key] = (np.asarray(precise.mean, np.float64), np.asarray(precise.var, np.float64))
        set_statistics(work, level, final, bn_eps)
        logger.debug("unfold pass %d/%d: %d BatchNormalization(s) at depth %d", d, depth, len(level), d)
    return final, depth, first


def _provenance(result: UnfoldResult, estimator: str) -> dict[str, str]:
    return {
        f"{METADATA_PREFIX}version": bnref.__version__,
        f"{METADATA_PREFIX}source_fingerprint": result.source_fingerprint,
        f"{METADATA_PREFIX}num_samples": str(result.num_samples),
        f"{METADATA_PREFIX}estimator": estimator,
        f"{METADATA_PREFIX}sites": str(len(result.inserted)),
        f"{METADATA_PREFIX}depth": str(result.depth),
        f"{METADATA_PREFIX}bn_eps": repr(result.bn_eps),
    }


@checked(extra=collect)
def unfold_model(
    model: ModelLike | ModelAnalysis,
    data: Any,
    *,
    bn_eps: float = DEFAULT_BN_EPS,
    sites_include: str | None = None,
    sites_exclude: str | None = None,
    linear_sites: bool = False,
    waves: bool = True,
    cache_dir: str | os.PathLike | None = None,
    **collect_options: Any,
) -> UnfoldResult:
    """Insert a BN after every folded layer of ``model``, with statistics from ``data``.

    ``collect_options`` are :func:`~onnx_tools.collection.collect`'s (``batch_size``,
    ``num_samples``, ``estimator``, ``shuffle``, ``image_options``, ...) but ``shard``,
    ``include`` and ``exclude``. ``waves`` (default): each part of the network runs once and
    the activations later parts read are cached in a temporary folder under ``cache_dir``
    (default: the system's; :mod:`onnx_tools.unfolding.waves`); ``waves=False``: D passes
    from the inputs, nothing cached. Nothing is written; :func:`onnx_tools.unfold` writes.
    """
    for name in _REFUSED:
        if name in collect_options:
            raise OptionError(f"unfold does not take {arg(name)}: it reads all of the source "
                              "data with every BatchNormalization in training mode")
    bn_eps = float(bn_eps)  # type and range checked by @checked
    if not waves:
        _replayable(data)  # the waves read the source once; D passes read it D times
    analysis = analyze_model(model)
    sites = find_sites(analysis.model, sites_include=sites_include, sites_exclude=sites_exclude,
                       linear_sites=linear_sites)
    if not sites:
        raise ModelError("found no folded layer to unfold (no Conv/ConvTranspose outside the "
                         f"rules of `bnref-onnx inspect`; Gemm/MatMul need {arg('linear_sites')}; "
                         f"name layers with {arg('sites_include')})")
    work, inserted = insert_batchnorms(analysis.model, sites, bn_eps)
    if waves:
        run = run_waves(work, analysis.loaded, inserted, data, bn_eps, collect_options,
                        None if cache_dir is None else os.fspath(cache_dir))
        summary = run.summary
        result = UnfoldResult(work, inserted, run.statistics, max(bn.depth for bn in inserted),
                              bn_eps, str(summary.fingerprint), int(summary.num_samples),
                              list(summary.notes), run.cache_peak_bytes)
        estimator = run.estimator
    else:
        statistics, passes, stats = _run_passes(work, analysis.loaded, inserted, data, bn_eps,
                                                collect_options)
        result = UnfoldResult(work, inserted, statistics, passes, bn_eps, stats.data_fingerprint,
                              stats.num_samples, list(stats.notes))
        estimator = stats.estimator
    set_metadata(work, _provenance(result, estimator))
    return result


@checked(extra=collect)
def unfold(
    model: ModelLike | ModelAnalysis,
    data: Any,
    *,
    output: str | os.PathLike | OutputPath | None = None,
    in_place: bool = False,
    bn_eps: float = DEFAULT_BN_EPS,
    sites_include: str | None = None,
    sites_exclude: str | None = None,
    linear_sites: bool = False,
    waves: bool = True,
    cache_dir: str | os.PathLike | None = None,
    **collect_options: Any,
) -> UnfoldResult:
    """Unfold ``model`` with source ``data`` and write it to ``output`` (or ``in_place``).

    ``bn_eps``: eps' of the inserted BNs (default :data:`DEFAULT_BN_EPS`);
    ``sites_include``/``sites_exclude``: regular expressions on node or output names that add
    or remove sites; ``linear_sites``: Gemm/MatMul too; ``waves``/``cache_dir``: see
    :func:`unfold_model`; ``collect_options``: :func:`~onnx_tools.collection.collect`'s options
    but ``shard``/``include``/``exclude``. The unfolded model equals the input at inference;
    everything it adds is listed in :class:`UnfoldResult` and ``metadata_props``. Outputs
    are checked before any work; the input model is never modified unless ``in_place``.
    """
    analysis = analyze_model(model)
    reads = RunReads.of(model=analysis, data=data)  # the source data is the run's data
    target = model_target(analysis.loaded, output, in_place, reads)
    result = unfold_model(analysis, data, bn_eps=bn_eps, sites_include=sites_include,
                          sites_exclude=sites_exclude, linear_sites=linear_sites, waves=waves,
                          cache_dir=cache_dir, **collect_options)
    if target is not None:
        write_model(result.model, target, like=analysis.loaded, in_place=in_place)
    return result
