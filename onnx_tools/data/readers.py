"""Readers as calibration data: a stream of feed dicts of any batch size, re-batched.

A reader is ``"module:function"`` or ``"path/to/file.py:function"`` (the function is called
with no arguments every time iteration starts, so the data can be read twice), or the object
itself: an iterable of feed dicts, or an object with ``get_next() -> dict | None`` like
onnxruntime's ``CalibrationDataReader``. Feeds of any batch size (or with no batch dimension
at all) are re-batched (:func:`take_rows`); memory is O(batch + one feed). A reader is a stream:
it cannot be shuffled, its length is unknown before reading, and sharding still reads the
whole stream. :meth:`~onnx_tools.data.DataSource.check` reads the first feed only, and keeps
it for the next iteration, so a one-shot reader loses nothing; a kept final batch below
``min_batch_size`` is refused when the stream reaches it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_tools.data.fingerprint import batch_digest, format_fingerprint
from onnx_tools.data.identity import stream_identity
from onnx_tools.data.plan import BatchPlan, partial_batch_error
from onnx_tools.data.source import DataSource
from onnx_tools.data.spec import Feed, InputSpec, cast_rule, check_sample_shape
from onnx_tools.errors import DataError

#: ``"module:function"`` or ``"some/file.py:function"``; a Windows drive letter ``C:`` is not
#: a module.
READER_SPEC = re.compile(r"^(?P<target>[^:]{2,}|.*\.py):(?P<func>[A-Za-z_]\w*)$")


class ReaderSource(DataSource):
    """A stream of feed dicts of any batch size, re-batched to the batch size.

    ``factory`` returns a fresh iterator of feeds; a one-shot reader can be iterated once
    (twice if it has ``rewind()``).
    """

    def __init__(
        self,
        factory: Callable[[], Iterator[Any]],
        specs: Sequence[InputSpec],
        description: str,
        reusable: bool,
        rewind: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(specs, description)
        for spec in specs:
            if spec.shape is not None and len(spec.shape) == 0:
                raise DataError(
                    f"input {spec.name!r} is a scalar: a reader can only feed inputs with a "
                    "leading batch dimension"
                )
        self._factory = factory
        self._reusable = reusable
        self._rewind = rewind
        self._started = False
        self._peeked: Iterator[Any] | None = None  # a stream whose first feed check() read
        self._stream_acc, self._stream_rows = 0, 0  # every batch of the stream, for identity()
        self._identity: dict[str, Any] | None = None

    @property
    def num_samples(self) -> None:
        """Unknown until the reader has been read."""
        return None

    def _open(self) -> Iterator[Any]:
        if self._peeked is not None:
            stream, self._peeked = self._peeked, None
            return stream
        if self._started and not self._reusable:
            if self._rewind is None:
                raise DataError(
                    f"{self.description} was already read and cannot be rewound; pass "
                    "'module:function' (called again for each pass) or a list of feeds"
                )
            self._rewind()
        self._started = True
        return self._factory()

    def _convert(self, item: Any, item_index: int, batch_index: int) -> tuple[Feed, int]:
        """Validate one reader item; return it as arrays with a batch dimension, and its size."""
        where = f"data reader item {item_index} (batch {batch_index})"
        if not isinstance(item, Mapping):
            raise DataError(f"{where} is a {type(item).__name__}, expected a dict of input arrays")
        names = {s.name for s in self.specs}
        missing = sorted(names - set(item))
        extra = sorted(set(item) - names)
        if missing or extra:
            raise DataError(
                f"{where} has keys {sorted(map(str, item))}, the model's inputs are "
                f"{sorted(names)}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unknown {extra})" if extra else "")
            )
        feed: Feed = {}
        sizes = {}
        for spec in self.specs:
            array = np.ascontiguousarray(item[spec.name])
            note = cast_rule(array.dtype, spec)
            if spec.shape is not None and array.ndim == len(spec.shape) - 1:
                check_sample_shape(spec, array.shape, array.shape)
                array = array[np.newaxis]
                self._note(f"added a batch dimension to the reader's {spec.name!r} feeds")
            elif array.ndim == 0:
                raise DataError(
                    f"{where}: input {spec.name!r}: expected shape {spec.describe_shape()}, "
                    "got a scalar"
                )
            else:
                check_sample_shape(spec, array.shape[1:], array.shape)
            if note:
                self._note(note)
                array = array.astype(spec.dtype)
            feed[spec.name] = array
            sizes[spec.name] = array.shape[0]
        if len(set(sizes.values())) > 1:
            raise DataError(f"{where}: inputs have different batch sizes {sizes}")
        return feed, next(iter(sizes.values()))

    def _check_data(self, plan: BatchPlan) -> None:
        """Read and check the first feed; keep it (and the stream) for the next iteration."""
        self._refuse_shuffle(plan)
        stream = self._open()
        try:
            first = next(stream)
        except StopIteration:
            raise DataError(f"no samples in {self.description}") from None
        except Exception as exc:
            raise DataError(
                f"data reader raised at batch 0: {type(exc).__name__}: {exc}"
            ) from exc
        self._convert(first, 0, 0)
        self._peeked = itertools.chain([first], stream)

    @staticmethod
    def _refuse_shuffle(plan: BatchPlan) -> None:
        if plan.shuffle:
            raise DataError(
                "shuffle needs data that can be read by index (.npy, .npz, images); "
                "a reader is a stream: shuffle inside the reader instead"
            )

    def _generate(self, plan: BatchPlan) -> Iterator[tuple[int, Feed]]:
        self._refuse_shuffle(plan)
        stream = self._open()
        self._stream_acc, self._stream_rows, self._identity = 0, 0, None
        budget = plan.num_samples
        pending: list[Feed] = []
        pending_rows = 0
        index = 0
        item_index = 0
        while budget is None or budget > 0:
            try:
                item = next(stream)
            except StopIteration:
                break
            except Exception as exc:
                raise DataError(
                    f"data reader raised at batch {index}: {type(exc).__name__}: {exc}"
                    + _thread_hint()
                ) from exc
            feed, rows = self._convert(item, item_index, index)
            item_index += 1
            if budget is not None and rows > budget:
                feed = {k: v[:budget] for k, v in feed.items()}
                rows = budget
            if budget is not None:
                budget -= rows
            pending.append(feed)
            pending_rows += rows
            while pending_rows >= plan.batch_size:
                batch, pending, pending_rows = take_rows(pending, pending_rows, plan.batch_size)
                self._stream_batch(index, batch)
                if plan.owns(index):
                    yield index, batch
                index += 1
            if pending:
                # what is left is (part of) this feed, kept across next(): copy it, since
                # readers may refill the same buffer for every item
                pending[-1] = {k: v.copy() for k, v in pending[-1].items()}
        last = take_rows(pending, pending_rows, pending_rows)[0] if pending_rows else None
        if last is not None and plan.keep_partial:
            self._stream_batch(index, last)
        self._identity = stream_identity(format_fingerprint(self._stream_acc), self._stream_rows)
        if pending_rows and plan.owns(index):
            if plan.keep_partial and pending_rows < plan.min_batch_size:
                raise partial_batch_error(plan, pending_rows, "the reader's stream ended there")
            if plan.keep_partial:
                yield index, last
            else:
                self._summary.dropped = pending_rows

    def _stream_batch(self, index: int, batch: Feed) -> None:
        """Add a batch of the whole stream (owned by this shard or not) to its identity."""
        self._stream_acc ^= batch_digest(index, batch)
        self._stream_rows += len(next(iter(batch.values())))

    def identity(self) -> dict[str, Any] | None:
        """The fingerprint of the whole stream, once read to the end (see the data docs)."""
        return self._identity


def _thread_hint() -> str:
    """Where a reader failed off the main thread: how to keep it on the calling thread."""
    if threading.current_thread() is threading.main_thread():
        return ""
    return (" (the reader was called on a background thread, one batch ahead; prefetch=False, "
            "--no-prefetch, calls it on the calling thread, for readers tied to the thread that "
            "made them)")


def take_rows(pending: list[Feed], rows: int, size: int) -> tuple[Feed, list[Feed], int]:
    """Split the first ``size`` rows off the queued feeds; return them, the rest, and its rows.

    ``rows`` is the number of rows queued in ``pending``; feeds already of the batch size pass
    through without a copy.
    """
    first = pending[0]
    first_rows = len(next(iter(first.values())))
    if first_rows == size:  # the common case of feeds already at batch size: no copy
        return dict(first), pending[1:], rows - size
    parts: list[Feed] = []
    need = size
    rest = list(pending)
    while need:
        head = rest[0]
        head_rows = len(next(iter(head.values())))
        if head_rows <= need:
            parts.append(head)
            rest.pop(0)
            need -= head_rows
        else:
            parts.append({k: v[:need] for k, v in head.items()})
            rest[0] = {k: v[need:] for k, v in head.items()}
            need = 0
    batch = {k: np.concatenate([p[k] for p in parts], axis=0) for k in first}
    return batch, rest, rows - size


def is_reader_spec(text: str) -> bool:
    """Whether ``text`` reads as a ``module:function`` or ``file.py:function`` reader."""
    return READER_SPEC.match(text) is not None and not text.endswith((".npy", ".npz"))


def load_function(spec: str) -> Callable[[], Any]:
    """Import the function a ``module:function`` or ``file.py:function`` spec names."""
    match = READER_SPEC.match(spec)
    if match is None:
        raise DataError(f"not a data path or 'module:function' reader: {spec!r}")
    target, func_name = match["target"], match["func"]
    try:
        module = _import_file(target) if target.endswith(".py") else _import_module(target)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot import reader {target!r}: {type(exc).__name__}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"reader {target!r} has no function {func_name!r}")
    return func


def _import_file(target: str) -> Any:
    path = Path(target)
    if not path.is_file():
        raise DataError(f"reader file not found: {target}")
    mod_spec = importlib.util.spec_from_file_location(f"_bnref_reader_{path.stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise DataError(f"cannot import reader file {target}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def working_folder_on_path() -> Iterator[None]:
    """The working folder on ``sys.path`` (a console script's lacks it), to find a reader."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _import_module(target: str) -> Any:
    with working_folder_on_path():
        return importlib.import_module(target)


def _stream(obj: Any, description: str) -> Iterator[Any]:
    """Iterate a reader object: ``get_next()`` until ``None``, or plain iteration."""
    if callable(getattr(obj, "get_next", None)):

        def pull() -> Iterator[Any]:
            while (item := obj.get_next()) is not None:
                yield item

        return pull()
    if isinstance(obj, Mapping | str | bytes) or not isinstance(obj, Iterable):
        raise DataError(
            f"{description} is a {type(obj).__name__}: expected an iterable of feed dicts or "
            "an object with get_next()"
        )
    return iter(obj)


def open_object_reader(obj: Any, specs: Sequence[InputSpec], description: str) -> ReaderSource:
    """Wrap a reader object; a collection (not an iterator) can be read again."""
    _stream(obj, description)  # type check now, not at the first batch
    one_shot = callable(getattr(obj, "get_next", None)) or isinstance(obj, Iterator)
    rewind = getattr(obj, "rewind", None)
    return ReaderSource(
        lambda: _stream(obj, description),
        specs,
        description,
        reusable=not one_shot,
        rewind=rewind if callable(rewind) else None,
    )


def open_function_reader(spec: str, specs: Sequence[InputSpec]) -> ReaderSource:
    """Open a ``module:function`` reader; the function is called again for every pass."""
    func = load_function(spec)
    description = f"reader {spec}"

    def call() -> Any:
        try:
            return func()
        except Exception as exc:
            raise DataError(f"data reader raised at batch 0: {type(exc).__name__}: {exc}") from exc

    created = [call()]  # fail at open, not at the first batch
    _stream(created[0], description)  # type check only: consumes nothing

    def factory() -> Iterator[Any]:
        return _stream(created.pop() if created else call(), description)

    return ReaderSource(factory, specs, description, reusable=True)
