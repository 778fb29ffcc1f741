"""Run the collection model with onnxruntime and aggregate per-batch BN statistics.

The collection model (:mod:`onnx_tools.rewrite`) uses onnxruntime's training-mode
BatchNormalization kernel where the session runs on the CPU alone, primitive operators
elsewhere. Per batch and per selected BN it returns the batch mean, the biased batch
variance (both of length C) and the shape ``(N, C, *spatial)`` of the BN input, so the
number of values per channel is ``n = N * prod(spatial)``. Each becomes
``bnref.Moments.from_mean_var(mean, var, n, ddof=0)`` and feeds one ``bnref.PreciseBN`` per
BN, which aggregates in float64.

While ``session.run`` works on batch ``i``, batch ``i + 1`` is prepared on a background thread
(``DataSource.batches(plan, ahead=PREFETCH)``; images are also decoded on a pool of threads):
the batches and their order are the same, a data error surfaces when its batch is reached,
with the same message, and stopping (an error, Ctrl-C) stops that thread.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import bnref
from onnx_tools.analysis import ModelAnalysis, ModelLike, analyze_model
from onnx_tools.data import BatchPlan, DataSource, DataSummary, ImageOptions, InputSpec, open_data
from onnx_tools.errors import DataError, ModelError, OptionError
from onnx_tools.options import arg, check_estimator, checked, setting
from onnx_tools.rewrite import CollectionModel, build_collection_model
from onnx_tools.session import cpu_only, make_session
from onnx_tools.stats import BNStats, CollectedStats

logger = logging.getLogger(__name__)

#: Below this batch size BN statistics are noisy and far from how BN was trained (a warning).
SMALL_BATCH = 16

#: Batches prepared ahead while the session runs (see the module docstring).
PREFETCH = 1

#: Test injection point, called with the batch index after each batch is aggregated
#: (interruption tests raise from it).
between_batches: Callable[[int], None] | None = None


def progress_bar(total: int | None, enabled: bool | None, desc: str = "collect"):
    """A tqdm bar of ``total`` batches on stderr (``enabled`` None: on a terminal only), or None."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", desc=desc, leave=False, file=sys.stderr)


def _open_source(analysis: ModelAnalysis, data: Any,
                 image_options: ImageOptions | None) -> DataSource:
    if isinstance(data, DataSource):
        return data
    return open_data(data, InputSpec.from_model(analysis.model), image_options)


def _min_batch_size(cm: CollectionModel, requested: int) -> int:
    """2 when a selected BN sees one value per channel per sample ((N, C), (N, C, 1, 1)).

    One sample gives such a BN no variance; knowing it up front lets the data layer refuse a
    kept last batch of one sample before the first batch instead of after the last.
    """
    for bn in cm.bns:
        dims = cm.input_types[bn.input][1]
        if dims is not None and len(dims) >= 2 and all(d == 1 for d in dims[2:]):
            if requested < 2:
                raise DataError(
                    f"batch size {requested}: BatchNormalization {bn.label!r} sees 1 value per "
                    "channel per sample (a BN after a fully connected layer?), and a batch needs "
                    "at least 2 values per channel for a variance: use a larger batch size"
                )
            return 2
    return 1


def open_plan(analysis: ModelAnalysis, data: Any, *, batch_size: int, num_samples: int | None,
              shuffle: bool, seed: int, keep_partial: bool, shard: tuple[int, int] | None,
              image_options: ImageOptions | None, min_batch_size: int = 1,
              ) -> tuple[DataSource, BatchPlan]:
    """Open ``data`` for ``analysis``'s model and check it against the batch plan.

    The source and plan every reader of calibration data batches with (``collect``,
    ``unfold``); the check reads a reader's first feed, before any session is built.
    """
    source = _open_source(analysis, data, image_options)
    plan = BatchPlan(batch_size=batch_size, num_samples=num_samples, shuffle=shuffle, seed=seed,
                     keep_partial=keep_partial, shard=shard, min_batch_size=min_batch_size)
    source.check(plan)
    return source, plan


def _warn_small_batch(size: int, static: bool) -> None:
    if size < SMALL_BATCH:
        advice = (
            "the model's batch dimension is fixed: export it with a dynamic (or larger) batch "
            "dimension to collect with larger batches"
            if static else "use a larger batch size if memory allows"
        )
        logger.warning(
            "batch size %d is far below the batch sizes BN is usually trained with (32-256): "
            "batch statistics, and so the recalibrated model, will differ from training; %s",
            size, advice,
        )


def run_batch(session: Any, names: list[str], feed: dict[str, np.ndarray], index: int,
              model: str = "the model") -> dict[str, np.ndarray]:
    """Run one batch; results by output name (onnxruntime's failure as a DataError).

    ``model``: how the message names the model (``compare`` runs "model A" and "model B").
    """
    try:
        results = session.run(names, feed)
    except Exception as exc:  # onnxruntime's own exception types
        text = " ".join(str(exc).split())[:300]
        raise DataError(
            f"batch {index}: onnxruntime could not run {model} on it (shape or "
            f"dtype that does not fit the model's input?): {text}"
        ) from exc
    return dict(zip(names, results, strict=True))


def aggregate_batch(cm: CollectionModel, by_name: dict[str, np.ndarray],
                    aggs: dict[str, bnref.PreciseBN], index: int) -> None:
    """Add one batch's statistics of every BN in ``aggs`` to its PreciseBN."""
    for bn in cm.bns:
        if bn.key not in aggs:
            continue
        out = cm.outputs[bn.key]
        shape = by_name[out.shape]
        count = int(np.prod(shape)) // int(shape[1])  # N * spatial
        if count < 2:
            raise DataError(
                f"batch {index}: BatchNormalization {bn.label!r} sees {count} value per "
                "channel (batch of one into a BN after a fully connected layer?); a "
                "batch needs at least 2 values per channel for a variance: use a "
                "larger batch size"
            )
        mean, var = by_name[out.mean], by_name[out.var]
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise DataError(
                f"batch {index}: BatchNormalization {bn.label!r} got non-finite batch "
                "statistics (overflow in the model, e.g. float16?)"
            )
        aggs[bn.key].update(bnref.Moments.from_mean_var(mean, var, count, ddof=0))


def _run_all(session: Any, cm: CollectionModel, batches: Any, aggs: dict[str, bnref.PreciseBN],
             total: int | None, progress: bool | None) -> None:
    names = cm.output_names
    bar = progress_bar(total, progress)
    try:
        for index, feed in batches:
            if cm.feeds:  # the training kernels' unused running statistics
                feed = {**feed, **cm.feeds}
            aggregate_batch(cm, run_batch(session, names, feed, index), aggs, index)
            if bar is not None:
                bar.update(1)
            if between_batches is not None:
                between_batches(index)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the thread preparing the next batch, at once, not when collected
        if bar is not None:
            bar.close()


def open_session(cm: CollectionModel, provider: str,
                 build: Callable[[bool], CollectionModel]) -> tuple[Any, str, CollectionModel]:
    """A session of ``cm``, and the model it runs.

    Where onnxruntime cannot load ``cm``'s training-mode kernels (a build without training
    support), the primitive-operator model is built and run instead.
    """
    if cm.feeds:
        try:
            return (*make_session(cm.model, provider), cm)
        except ModelError as err:
            logger.info("onnxruntime cannot run its training-mode BatchNormalization kernel "
                        "(%s); collecting with primitive operators", err)
            cm = build(False)
    return (*make_session(cm.model, provider), cm)


def _report_summary(summary: DataSummary) -> None:
    if summary.dropped:
        logger.info(
            "dropped a final partial batch of %d sample(s) (keep it with %s)",
            summary.dropped, setting("keep_partial", True),
        )


def _run_record(plan: BatchPlan, include: str | None, exclude: str | None,
                summary: DataSummary) -> dict[str, Any]:
    """How the samples were chosen, as the STATS file records it."""
    run: dict[str, Any] = {
        "num_samples_limit": plan.num_samples,
        "shuffle": bool(plan.shuffle),
        "seed": int(plan.seed) if plan.shuffle else None,
        "keep_partial": bool(plan.keep_partial),
        "include": include,
        "exclude": exclude,
    }
    if summary.num_skipped:  # skip_bad_images: which samples the run left out
        run["skipped_images"] = {"count": summary.num_skipped, "first": list(summary.skipped)}
    return run


def _collected(cm: CollectionModel, aggs: dict[str, bnref.PreciseBN], summary: DataSummary,
               fingerprint: str, estimator: str, bessel: bool, shard: tuple[int, int] | None,
               run: dict[str, Any], provider: str) -> CollectedStats:
    shard_i, shard_k = shard if shard is not None else (0, 1)
    return CollectedStats(
        bns={bn.key: BNStats(bn.key, bn.node_name, int(aggs[bn.key].moments.num_channels),
                             aggs[bn.key]) for bn in cm.bns},
        estimator=estimator,
        bessel=bool(bessel),
        batch_size=int(summary.batch_size),
        num_samples=int(summary.num_samples),
        num_batches=int(summary.num_batches),
        dropped=int(summary.dropped),
        model_fingerprint=fingerprint,
        data_fingerprint=str(summary.fingerprint),
        num_shards=int(shard_k),
        shards=[int(shard_i)],
        run=run,
        provider=provider,
        notes=list(summary.notes),
    )


@checked()
def collect(
    model: ModelLike | ModelAnalysis,
    data: Any,
    *,
    batch_size: int = 64,
    num_samples: int | None = None,
    estimator: str = "population",
    bessel: bool = False,
    provider: str = "auto",
    shuffle: bool = False,
    seed: int | None = None,
    keep_partial: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    shard: tuple[int, int] | None = None,
    image_options: ImageOptions | None = None,
    prefetch: bool = True,
    progress: bool | None = False,
) -> CollectedStats:
    """Collect Precise BatchNorm statistics of ``model`` over ``data``.

    Args:
        model: path, ``onnx.ModelProto`` (not modified), :class:`LoadedModel` or
            :class:`~onnx_tools.analysis.ModelAnalysis`.
        data: anything :func:`onnx_tools.data.open_data` accepts, or a ``DataSource``.
        batch_size: normalization batch size (a static batch dimension overrides it).
        num_samples: use at most this many samples (default: all).
        estimator: ``"population"`` (pooled biased variance, fvcore) or
            ``"mean_of_variances"`` (equal-weight mean of unbiased batch variances, torch
            ``update_bn``); both states are collected either way, this is what ``apply`` uses.
        bessel: with ``population``, write ``n/(n-1)`` times the pooled variance.
        provider: ``auto``, ``cuda`` or ``cpu`` (see :func:`onnx_tools.session.make_session`).
        shuffle: draw samples in a seeded random order.
        seed: seed for ``shuffle`` (default 0); refused without ``shuffle``, where it
            would change nothing.
        keep_partial: keep a final batch smaller than ``batch_size``.
        include: regular expression; only BNs whose node or output name matches.
        exclude: regular expression; BNs whose node or output name matches are skipped.
        shard: ``(I, K)`` takes whole batches ``I, I+K, ...``.
        image_options: how an image folder becomes model input.
        prefetch: prepare the next batch on a background thread while ``session.run`` works
            (the batches are the same); ``False`` reads each batch on the calling thread, for
            readers tied to the thread that made them (an ``sqlite3`` connection).
        progress: tqdm bar; ``None`` shows it on a terminal.

    Returns:
        :class:`onnx_tools.stats.CollectedStats`.
    """
    check_estimator(estimator, bessel)
    if seed is not None and not shuffle:
        raise OptionError(f"{arg('seed')} has no effect without {arg('shuffle')}: the samples "
                          "are taken in stored order")
    analysis = analyze_model(model)
    analysis.check_supported()

    def build(training_kernel: bool) -> CollectionModel:
        inlined = analysis.functions.inlined is not None  # its BNs are found in the copy
        return build_collection_model(
            analysis.collection_model, include=include, exclude=exclude,
            base_dir=analysis.loaded.base_dir, bns=None if inlined else analysis.batchnorms,
            training_kernel=training_kernel, batch_size=batch_size)

    cm = build(cpu_only(provider))
    source, plan = open_plan(analysis, data, batch_size=batch_size, num_samples=num_samples,
                             shuffle=shuffle, seed=seed or 0, keep_partial=keep_partial, shard=shard,
                             image_options=image_options,
                             min_batch_size=_min_batch_size(cm, batch_size))
    session, used, cm = open_session(cm, provider, build)
    logger.info("collecting with onnxruntime on %s", used.upper())
    batches = source.batches(plan, ahead=PREFETCH if prefetch else 0)
    _warn_small_batch(source.summary.batch_size, any(s.static_batch for s in source.specs))
    aggs = {bn.key: bnref.PreciseBN(estimator, bessel) for bn in cm.bns}
    _run_all(session, cm, batches, aggs, source.count_batches(plan), progress)
    _report_summary(source.summary)
    stats = _collected(cm, aggs, source.summary, analysis.fingerprint(bn.key for bn in cm.bns),
                       estimator, bessel, shard, _run_record(plan, include, exclude, source.summary),
                       used)
    if stats.num_shards > 1:  # what merge checks: every shard read the same data
        stats.data_source = source.identity()
    return stats
