"""Run the waves of :mod:`onnx_tools.unfolding.waves` over the source data.

Wave 0 reads the data as ``collect`` does (:func:`~onnx_tools.collection.open_plan`: same
batches, order, checks and fingerprint); every later wave reads the batches the waves above
it cached. Each wave's model is rewritten by the collection rewrite (every BN in it in
training mode, statistics as graph outputs), and the tensors later waves need are added as
outputs. After wave k the inserted BNs of depth k + 1 get their final statistics, before
wave k + 1 is built.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

import bnref
from onnx_tools.analysis import ModelAnalysis
from onnx_tools.batchnorms import find_batchnorms
from onnx_tools.collection import (
    PREFETCH,
    aggregate_batch,
    collect,
    open_plan,
    open_session,
    progress_bar,
    run_batch,
)
from onnx_tools.data import DataSummary
from onnx_tools.errors import OptionError
from onnx_tools.modelio import LoadedModel
from onnx_tools.options import arg, check_estimator
from onnx_tools.rewrite import CollectionModel, build_collection_model
from onnx_tools.session import cpu_only
from onnx_tools.unfolding.insert import InsertedBN, set_statistics
from onnx_tools.unfolding.waves import ActivationCache, WavePlan, plan_waves, value_info, wave_model

logger = logging.getLogger(__name__)

#: Collection options and their defaults: :func:`~onnx_tools.collection.collect`'s own.
DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(collect).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


@dataclass
class WaveRun:
    """What running the waves gave: final statistics by key, the data summary, cache size."""

    statistics: dict[str, tuple[np.ndarray, np.ndarray]]
    summary: DataSummary
    estimator: str
    cache_peak_bytes: int


def _session(model: onnx.ModelProto, wave: WavePlan, provider: str,
             batch_size: int) -> tuple[Any, CollectionModel]:
    """The wave's collection model (its cached tensors as extra outputs) and a session."""
    bns = find_batchnorms(model)

    def build(kernel: bool) -> CollectionModel:
        cm = build_collection_model(model, bns=bns, training_kernel=kernel, batch_size=batch_size)
        cm.model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in wave.cached)
        return cm

    session, _, cm = open_session(build(cpu_only(provider)), provider, build)
    return session, cm


def _batches(wave: WavePlan, source: Any, plan: Any, cache: ActivationCache, count: int, ahead: int):
    """``(index, feed)`` of every batch: from the data (wave 0) or the cache."""
    if wave.k == 0:
        for index, (_, feed) in enumerate(source.batches(plan, ahead=ahead)):
            yield index, feed
        return
    for index in range(count):
        yield index, {name: cache.get(name, index) for name in wave.inputs}


def _run_wave(wave: WavePlan, work: onnx.ModelProto, source: Any, plan: Any,
              cache: ActivationCache, count: int, later: set[str], opts: dict,
              bar: Any) -> tuple[dict, int]:
    """Run one wave over every batch; return its PreciseBN per key and the batch count."""
    if wave.k == 0:
        inputs = {vi.name: vi for vi in work.graph.input}
    else:
        inputs = {n: value_info(n, cache.get(n, 0)) for n in wave.inputs}
    session, cm = _session(wave_model(work, wave, inputs), wave, opts["provider"], opts["batch_size"])
    aggs = {key: bnref.PreciseBN(opts["estimator"], opts["bessel"]) for key in wave.stats}
    names = cm.output_names + wave.cached
    seen = 0
    for index, feed in _batches(wave, source, plan, cache, count, PREFETCH if opts["prefetch"] else 0):
        if wave.k == 0:
            for name in set(feed) & later:
                cache.put(name, index, feed[name])
        run_feed = {n: np.asarray(feed[n]) for n in wave.inputs} | cm.feeds
        out = run_batch(session, names, run_feed, index)
        aggregate_batch(cm, out, aggs, index)
        for name in wave.cached:
            cache.put(name, index, out[name])
        seen = index + 1
        if bar is not None:
            bar.update(1)
    return aggs, seen


def run_waves(work: onnx.ModelProto, loaded: LoadedModel, inserted: list[InsertedBN], data: Any,
              bn_eps: float, options: dict[str, Any], cache_dir: str | None = None) -> WaveRun:
    """Collect every inserted BN's statistics in waves; ``work`` gets them written in."""
    opts = {**DEFAULTS, **options}
    check_estimator(opts["estimator"], opts["bessel"])
    if opts["seed"] is not None and not opts["shuffle"]:
        raise OptionError(f"{arg('seed')} has no effect without {arg('shuffle')}: the samples "
                          "are taken in stored order")
    waves = plan_waves(work, inserted)
    linear = any(bn.site.op_type in ("Gemm", "MatMul") for bn in inserted)
    source, plan = open_plan(ModelAnalysis(LoadedModel(work, loaded.path, loaded.base_dir), []), data,
                             batch_size=opts["batch_size"], num_samples=opts["num_samples"],
                             shuffle=opts["shuffle"], seed=opts["seed"] or 0,
                             keep_partial=opts["keep_partial"], shard=None,
                             image_options=opts["image_options"], min_batch_size=2 if linear else 1)
    later = {n for w in waves[1:] for n in w.inputs}
    final: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cache = ActivationCache(cache_dir)
    logger.info("unfolding %d layer(s), %d deep, in %d wave(s); activations cached in %s",
                len(inserted), len(waves), len(waves), cache.root)
    count = 0
    batches = source.count_batches(plan)
    bar = progress_bar(None if batches is None else batches * len(waves), opts["progress"], "unfold")
    try:
        for wave in waves:
            set_statistics(work, [bn for bn in inserted if bn.depth == wave.k], final, bn_eps)
            aggs, count = _run_wave(wave, work, source, plan, cache, count, later, opts, bar)
            for key, agg in aggs.items():
                final[key] = (np.asarray(agg.mean, np.float64), np.asarray(agg.var, np.float64))
            for name in wave.release:
                cache.release(name, count)
            logger.debug("wave %d: %d node(s), %d cached tensor(s), cache %.0f MB", wave.k,
                         len(wave.nodes), len(wave.cached), cache.bytes / 2**20)
    finally:
        cache.close()
        if bar is not None:
            bar.close()
    set_statistics(work, inserted, final, bn_eps)
    return WaveRun(final, source.summary, opts["estimator"], cache.peak_bytes)
