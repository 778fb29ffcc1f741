"""The interface every kind of calibration data implements: :class:`DataSource`.

A source is iterated with :meth:`DataSource.batches`, which takes a
:class:`~onnx_tools.data.plan.BatchPlan` and yields ``(index, feed)`` pairs, ``feed`` being a
dict from model input name to an array whose leading (batch) dimension is the batch size.
Every batch is checked for NaN/Inf (:func:`~onnx_tools.data.spec.check_finite`) and added to
the fingerprint (:mod:`onnx_tools.data.fingerprint`) here, once, for every kind of data.
:meth:`DataSource.check` decides what can be decided without reading every batch (the plan
against the model, an empty shard, a kept final batch too small, a reader's first feed), so a
caller can call it before building a session. Each note is logged once per source, however
often it is iterated.
``batches(plan, ahead=1)`` prepares the next batch on a background thread while the caller
works on the current one (:func:`~onnx_tools.data.prefetch.ahead`): the batches, their order,
the checks and their error messages are the same, and an error surfaces when the batch it
concerns is reached; a reader is then called on that thread, and its batches are copied
before it is asked for more (a reader may refill one buffer for every feed, and a feed of the
batch size is passed through). :attr:`DataSource.summary` counts the batches handed to the
caller, not those made ahead.
:class:`IndexedSource` is the base of the data that can be read by index (arrays, images).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from onnx_tools.data.fingerprint import batch_digest, format_fingerprint
from onnx_tools.data.plan import MAX_LISTED, BatchPlan, DataSummary
from onnx_tools.data.prefetch import ahead as run_ahead
from onnx_tools.data.spec import Feed, InputSpec, check_finite
from onnx_tools.errors import DataError

logger = logging.getLogger(__name__)


class DataSource(abc.ABC):
    """Calibration data for one model; iterate it with :meth:`batches`.

    :attr:`summary` (a :class:`~onnx_tools.data.plan.DataSummary`) describes the latest (or
    current) iteration.
    """

    #: Whether every batch is a new array of this source's own (copied when made ahead if not).
    _fresh_batches = False

    def __init__(self, specs: Sequence[InputSpec], description: str) -> None:
        self.specs = list(specs)
        self.description = description
        self._open_notes: list[str] = []
        self._skipped: list[str] = []  # files left out when opening, "path: reason"
        self._logged: set[str] = set()
        self._restart_summary()

    @property
    @abc.abstractmethod
    def num_samples(self) -> int | None:
        """Samples available in the data, or ``None`` when unknown before reading (readers)."""

    def identity(self) -> dict[str, Any] | None:
        """The whole source's identity (:mod:`onnx_tools.data.identity`); None if unknown.

        A stream knows it once it has been read to the end.
        """
        return None

    @property
    def summary(self) -> DataSummary:
        """What the latest call of :meth:`batches` used (a copy)."""
        return self._summary.copy()

    def _restart_summary(self, batch_size: int = 0) -> None:
        """Start a new summary holding the notes of opening (call again after adding some)."""
        self._summary = DataSummary(
            self.description, batch_size, notes=list(self._open_notes),
            num_skipped=len(self._skipped), skipped=self._skipped[:MAX_LISTED],
        )

    def _log_once(self, text: str) -> None:
        if text not in self._logged:
            self._logged.add(text)
            logger.info("%s", text)

    def _note(self, text: str) -> None:
        notes = self._summary.notes
        if text not in notes:
            notes.append(text)
        self._log_once(text)

    def batches(self, plan: BatchPlan, ahead: int = 0) -> Iterator[tuple[int, Feed]]:
        """Yield ``(index, feed)`` for the batches of ``plan`` (see :mod:`onnx_tools.data.plan`).

        ``index`` is the global batch index, the same with or without ``plan.shard``. The
        fingerprint in :attr:`summary` is the XOR of the SHA-256 of every yielded batch (see
        :mod:`onnx_tools.data.fingerprint`), so the fingerprints of the shards of a run
        combine with :func:`~onnx_tools.data.combine_fingerprints` into the unsharded one.
        The plan is resolved against the model (static batch dimension, ``min_batch_size``)
        and a kept final batch checked at once, so problems are raised and :attr:`summary`
        holds the batch size used before the first batch is read. With ``ahead=k`` batches
        are prepared on a background thread while the caller works, ``k`` waiting and one in
        the making (see the module docstring); ``0`` prepares each when it is asked for.
        """
        resolved, notes = plan.resolve(self.specs)
        self._check_plan(resolved)
        self._restart_summary(resolved.batch_size)
        for note in self._open_notes:  # each note is logged once, when the first run starts
            self._log_once(note)
        for note in notes:
            self._note(note)
        self._summary.shuffle = bool(resolved.shuffle)
        self._summary.seed = int(resolved.seed)
        self._summary.shard = resolved.sharding
        return self._run(resolved, ahead)

    def count_batches(self, plan: BatchPlan) -> int | None:
        """Return how many batches :meth:`batches` will yield (for a progress bar).

        ``None`` when the number of samples is unknown before reading (readers).
        """
        total = self.num_samples
        if total is None:
            return None
        resolved, _ = plan.resolve(self.specs)
        return resolved.count(total)

    def check(self, plan: BatchPlan) -> BatchPlan:
        """Check that the data can feed the model under ``plan`` without reading every batch.

        Raises the :class:`DataError` that :meth:`batches` would raise for the plan (batch
        size, ``min_batch_size``, a kept final batch too small, an empty shard or no data
        when the number of samples is known) and, for a reader, reads its first feed and
        checks its keys, shapes and dtypes (the feed is kept for the next iteration). Arrays
        and images check shapes and dtypes when opened. Returns the plan as it will run.
        """
        resolved, _ = plan.resolve(self.specs)
        self._check_plan(resolved)
        total = self.num_samples
        if total is not None and resolved.count(total) == 0:
            _, full, rest = resolved.split(total)
            dropped = rest if rest and not resolved.keep_partial and resolved.owns(full) else 0
            raise DataError(self._empty_message(resolved, dropped))
        self._check_data(resolved)
        return resolved

    def _check_plan(self, plan: BatchPlan) -> None:
        """Refuse what the resolved ``plan`` cannot do with this data, before any reading."""
        total = self.num_samples
        if total is not None:
            plan.check_partial(total)

    def _check_data(self, plan: BatchPlan) -> None:
        """Check the data against the model beyond what opening did (readers: first feed)."""
        del plan  # arrays and images check shapes and dtypes when they are opened

    def _run(self, plan: BatchPlan, ahead: int) -> Iterator[tuple[int, Feed]]:
        checked = self._checked(plan, copy=bool(ahead) and not self._fresh_batches)
        if ahead:
            checked = run_ahead(checked, ahead)
        acc = 0
        try:
            for index, feed, digest in checked:
                acc ^= digest
                summary = self._summary
                summary.num_batches += 1
                summary.num_samples += len(next(iter(feed.values())))
                summary.fingerprint = format_fingerprint(acc)
                yield index, feed
        finally:
            checked.close()  # a consumer that stops early stops the thread working ahead
        if self._summary.num_batches == 0:
            raise DataError(self._empty_message(plan, self._summary.dropped))

    def _checked(self, plan: BatchPlan, copy: bool) -> Iterator[tuple[int, Feed, int]]:
        """The batches with their digests, checked for NaN/Inf (where the batch is made)."""
        for index, feed in self._generate(plan):
            if copy:  # before the reader is asked for the next feed, which may reuse a buffer
                feed = {name: np.array(a, copy=True) for name, a in feed.items()}
            check_finite(feed, index)  # here, once, so no consumer can forget it
            yield index, feed, batch_digest(index, feed)

    def _empty_message(self, plan: BatchPlan, dropped: int) -> str:
        first, step = plan.sharding
        if step > 1:
            return (
                f"no samples: shard {first}/{step} gets no batch of size {plan.batch_size} "
                "(use fewer shards or a smaller batch size)"
            )
        if dropped:
            return (
                f"no samples: the only batch had {dropped} sample(s), fewer than the batch "
                f"size {plan.batch_size} (use a smaller batch size or keep_partial)"
            )
        return f"no samples in {self.description}"

    @abc.abstractmethod
    def _generate(self, plan: BatchPlan) -> Iterator[tuple[int, Feed]]:
        """Yield the batches the resolved ``plan`` owns; record ``dropped`` and notes."""


class IndexedSource(DataSource):
    """Data with a known number of samples that can be read by index (arrays, image files).

    With ``shuffle`` each batch reads its rows in ascending order (sorted reads, so a memory
    map is read forward) and then restores the shuffled order; the permutation costs O(N)
    int64.
    """

    _fresh_batches = True  # arrays read by index or decoded images, never a reused buffer

    @property
    def num_samples(self) -> int:
        """Samples available in the data."""
        return self._length()

    @abc.abstractmethod
    def _length(self) -> int:
        """Return the number of samples."""

    @abc.abstractmethod
    def _load(self, indices: np.ndarray | slice) -> Feed:
        """Return the samples at ``indices`` (ascending, or a slice) as model-ready arrays."""

    def _batch_rows(self, plan: BatchPlan) -> Iterator[tuple[int, slice | np.ndarray]]:
        """``(index, rows)`` of every batch the plan owns: a slice, or indices in batch order.

        The batching rules of :mod:`onnx_tools.data.plan`, in one place for every indexed
        source; records ``dropped`` and the note on a too large ``num_samples``.
        """
        total = self._length()
        if total == 0:
            return
        n, full, rest = plan.split(total)
        if plan.num_samples is not None and plan.num_samples > total:
            self._note(f"asked for {plan.num_samples} samples, the data has {total}: using {total}")
        order = np.random.default_rng(plan.seed).permutation(total)[:n] if plan.shuffle else None
        count = full + (1 if rest and plan.keep_partial else 0)
        if rest and not plan.keep_partial and plan.owns(full):
            self._summary.dropped = rest
        size = plan.batch_size
        first, step = plan.sharding
        for index in range(first, count, step):
            start, stop = index * size, min((index + 1) * size, n)
            yield index, slice(start, stop) if order is None else order[start:stop]

    def _generate(self, plan: BatchPlan) -> Iterator[tuple[int, Feed]]:
        for index, rows in self._batch_rows(plan):
            if isinstance(rows, slice):
                yield index, self._load(rows)
                continue
            perm = np.argsort(rows, kind="stable")  # read rows in file order, then restore
            loaded = self._load(rows[perm])
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(len(perm))
            yield index, {name: a[inverse] for name, a in loaded.items()}
