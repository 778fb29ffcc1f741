"""Calibration data: open a file, folder or reader and yield model feeds batch by batch.

:func:`open_data` turns what the user points at into a :class:`DataSource`; its
:meth:`DataSource.batches` yields ``(index, feed)`` pairs, ``feed`` being a dict from model
input name to an array whose leading (batch) dimension is the batch size.

Formats and their memory cost
-----------------------------
- ``.npy`` (single-input models): opened with ``mmap_mode="r"`` and sliced per batch, so memory
  is O(batch) whatever the file size. With ``shuffle`` each batch gathers its rows from the map
  (sorted reads), still O(batch), plus O(N) int64 for the permutation.
- ``.npz``: a zip archive cannot be memory-mapped (NumPy ignores ``mmap_mode`` for archives), so
  each array that feeds a model input is loaded whole into memory, once, when the source is
  opened: memory = the sum of those arrays. Keys that are not model inputs (labels, say) are
  never loaded. For large sets, save one ``.npy`` per input instead.
- a folder of images (see :mod:`onnx_tools.images`): decoded per batch, O(batch).
- a reader: ``"module:function"`` or ``"path/to/file.py:function"`` (the function is called with
  no arguments every time iteration starts, so the data can be read twice), or the object
  itself: an iterable of feed dicts, or an object with ``get_next() -> dict | None`` like
  onnxruntime's ``CalibrationDataReader``. Feeds of any batch size (or with no batch dimension
  at all) are re-batched; memory is O(batch + one feed). Sharding still reads the whole stream.
- in Python, an ``np.ndarray`` (single input) or a mapping from input name to array.

Batching rules
--------------
Samples are taken in stored order (sorted path order for images) unless ``shuffle``, which
draws ``np.random.default_rng(seed).permutation(N)`` (with ``num_samples=n``, its first ``n``
entries: a reproducible random subset). Batch ``i`` holds samples ``i*B .. (i+1)*B - 1`` of that
order. A final batch smaller than ``B`` is dropped and counted in ``summary["dropped"]`` unless
``keep_partial``. ``shard=(I, K)`` yields the whole batches ``I, I+K, I+2K, ...`` of that same
sequence, so the shards partition the unsharded run. A static batch dimension in the model's
input fixes ``B`` (a note says so when it overrides the requested size).

Dtypes: data whose float type differs from the input's is cast with a note (float64 -> float32,
float32 -> float16, ...); integer data is cast to a wider integer input with a note; everything
else (integers or booleans into a float input, floats into an integer input, narrowing integer
casts) is refused. Integer pixels belong in an image folder, which scales and normalizes them.

Shapes: every static dimension after the batch dimension must match the model's declared input.
Every batch is checked for NaN/Inf (:func:`check_finite`) before it is yielded.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_tools.errors import DataError, ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "DataSource",
    "ImageOptions",
    "InputSpec",
    "check_finite",
    "combine_fingerprints",
    "open_data",
]

Dim = int | str | None
Feed = dict[str, np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# "module:function" or "some/file.py:function"; a Windows drive letter "C:" is not a module.
_READER_SPEC = re.compile(r"^(?P<target>[^:]{2,}|.*\.py):(?P<func>[A-Za-z_]\w*)$")


# --------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class InputSpec:
    """One graph input of the model: its name, element dtype and declared shape.

    ``shape`` holds an ``int`` for a static dimension and a ``str`` (``dim_param``) or ``None``
    for a symbolic one; it is ``None`` as a whole when the model declares no rank. Dimension 0
    is the batch dimension.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def static_batch(self) -> int | None:
        """The batch size the model fixes, or ``None`` when dimension 0 is symbolic."""
        if self.shape and isinstance(self.shape[0], int):
            return self.shape[0]
        return None

    def describe_shape(self) -> str:
        """Return the declared shape as text, symbolic dimensions by name (``?`` if unnamed)."""
        if self.shape is None:
            return "(unknown rank)"
        dims = ["?" if d is None else str(d) for d in self.shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> list[InputSpec]:
        """Return the graph inputs that are not initializers (IR < 4 models list both)."""
        initializers = {t.name for t in model.graph.initializer}
        initializers |= {t.values.name for t in model.graph.sparse_initializer}
        specs = []
        for value in model.graph.input:
            if value.name in initializers:
                continue
            if value.type.WhichOneof("value") != "tensor_type":
                raise ModelError(
                    f"graph input {value.name!r} is not a tensor "
                    f"({value.type.WhichOneof('value')}); bnref-onnx feeds tensors only"
                )
            tensor = value.type.tensor_type
            try:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            except (KeyError, ValueError) as exc:
                raise ModelError(
                    f"graph input {value.name!r} has element type {tensor.elem_type}, "
                    "which has no NumPy dtype"
                ) from exc
            shape: tuple[Dim, ...] | None = None
            if tensor.HasField("shape"):
                shape = tuple(
                    d.dim_value
                    if d.HasField("dim_value")
                    else (d.dim_param if d.HasField("dim_param") else None)
                    for d in tensor.shape.dim
                )
            specs.append(cls(value.name, dtype, shape))
        return specs


# --------------------------------------------------------------------------- image options


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes a model input (defaults follow ImageNet evaluation).

    Each image is decoded with pillow, converted to ``mode``, resized so that its shorter side
    is ``resize`` (bilinear, antialiased, the longer side truncated to an int as torchvision
    does), center-cropped to ``crop`` (top/left offsets rounded as torchvision does), scaled by
    ``scale`` and normalized per channel: ``x = (pixel * scale - mean) / std``. The result is
    cast to the model input's dtype; a ``uint8`` input gets the raw cropped pixels instead.

    Attributes:
        crop: output ``(height, width)`` or one int for a square. ``None`` (default): the
            model's static H, W when it declares them (a note says so), else 224.
        resize: target of the shorter side before cropping. ``None`` (default): ``crop / 0.875``
            rounded, i.e. 256 for a 224 crop, as in the standard ImageNet evaluation.
        mode: pillow mode, ``"RGB"`` or ``"L"``. ``None`` (default): ``"L"`` when the model's
            channel dimension is 1, else ``"RGB"``.
        scale: factor applied to the 0..255 pixel values (default ``1/255``, giving [0, 1]).
        mean, std: per-channel constants, one per channel or one for all. ``None`` (default):
            ImageNet's ``(0.485, 0.456, 0.406)`` and ``(0.229, 0.224, 0.225)`` for RGB, their
            averages ``(0.449,)`` and ``(0.226,)`` for ``"L"``.
        layout: ``"NCHW"`` or ``"NHWC"``. ``None`` (default): ``"NHWC"`` when the model's last
            dimension is the channel count (1 or 3) and dimension 1 is not, else ``"NCHW"``.
        extensions: file suffixes taken (case-insensitive); other files are ignored.
        recursive: also take images from subfolders (default ``True``). Order is the sorted
            relative POSIX path: ``cat/1.png < cat/10.png < cat/2.png < dog/1.png``.
    """

    crop: int | tuple[int, int] | None = None
    resize: int | None = None
    mode: str | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    recursive: bool = True


# --------------------------------------------------------------------------- helpers


def check_finite(feed: Mapping[str, np.ndarray], index: int) -> None:
    """Raise :class:`DataError` naming batch ``index`` and the input if a value is NaN or Inf."""
    for name, array in feed.items():
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.inexact):
            continue
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            sample = int(np.argwhere(~finite)[0][0]) if array.ndim else 0
            raise DataError(
                f"batch {index}: input {name!r} contains {bad} NaN/Inf value(s) "
                f"(first in sample {sample} of the batch)"
            )


def combine_fingerprints(*fingerprints: str) -> str:
    """Fingerprint of the union of disjoint sets of batches (e.g. the shards of one run).

    A data fingerprint is the XOR of the SHA-256 digests of its batches (see
    :meth:`DataSource.batches`), so the shards of a run combine, in any order, to the
    fingerprint of the unsharded run.
    """
    acc = 0
    for fp in fingerprints:
        try:
            acc ^= int(fp, 16)
        except (TypeError, ValueError) as exc:
            raise DataError(f"not a data fingerprint: {fp!r}") from exc
    return f"{acc:064x}"


def _batch_digest(index: int, feed: Mapping[str, np.ndarray]) -> int:
    """SHA-256 of one batch: its global index, then each input's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(index.to_bytes(8, "little", signed=False))
    for name in sorted(feed):
        array = np.ascontiguousarray(feed[name])
        h.update(name.encode("utf-8") + b"\0")
        h.update(array.dtype.str.encode("ascii") + b"\0")
        h.update(repr(array.shape).encode("ascii") + b"\0")
        h.update(array.data.cast("B") if array.size else b"")
    return int.from_bytes(h.digest(), "big")


def _format_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _cast_rule(data_dtype: np.dtype, spec: InputSpec) -> str | None:
    """Decide how data of ``data_dtype`` feeds ``spec``: ``None`` as is, else a note to cast.

    Raises :class:`DataError` for the casts that are refused (see the module docstring).
    """
    target = spec.dtype
    if data_dtype == target:
        return None
    note = f"cast {data_dtype} -> {target} for input {spec.name!r}"
    if data_dtype.kind == "f" and target.kind == "f":
        return note
    if data_dtype.kind in "iu" and target.kind in "iu" and np.can_cast(data_dtype, target, "safe"):
        return note
    hint = ""
    if data_dtype.kind in "iub" and target.kind == "f":
        hint = (
            "; integer data is not scaled or normalized here: convert it to the values the "
            "model expects, or pass a folder of images"
        )
    raise DataError(
        f"input {spec.name!r} expects {target}, got {data_dtype} data; "
        f"only float-to-float and widening integer casts are done{hint}"
    )


def _check_shape(spec: InputSpec, sample_shape: Sequence[int], got: Sequence[int]) -> None:
    """Refuse data whose per-sample shape contradicts the model's declared static dims."""
    if spec.shape is None:
        return
    declared = spec.shape[1:]
    ok = len(sample_shape) == len(declared) and all(
        not isinstance(d, int) or d == s for d, s in zip(declared, sample_shape, strict=False)
    )
    if not ok:
        raise DataError(
            f"input {spec.name!r}: expected shape {spec.describe_shape()} "
            f"(dimension 0 is the batch), got {_format_shape(got)}"
        )


def _effective_batch_size(specs: Sequence[InputSpec], requested: int) -> tuple[int, str | None]:
    """Return the batch size to use: ``requested`` unless the model fixes one (with a note)."""
    static = {s.name: s.static_batch for s in specs if s.static_batch is not None}
    if not static:
        return requested, None
    values = set(static.values())
    if len(values) > 1:
        raise DataError(f"model inputs declare different static batch sizes: {static}")
    fixed = values.pop()
    if fixed < 1:
        raise DataError(f"model input declares a batch dimension of {fixed}")
    if fixed == requested:
        return fixed, None
    return fixed, (
        f"batch size {fixed} (the model's input has a static batch dimension), "
        f"not the requested {requested}"
    )


# --------------------------------------------------------------------------- sources


class DataSource(abc.ABC):
    """Calibration data for one model; iterate it with :meth:`batches`.

    ``summary`` describes the latest (or current) iteration: ``num_samples`` yielded,
    ``num_batches``, ``dropped`` (samples of a final partial batch left out, counted in the
    shard that owns that batch, so shards sum to the unsharded count), ``batch_size`` (after
    a static batch dimension overrode it), ``fingerprint``, ``notes`` (casts, overrides, keys
    ignored, ...), and the settings ``source``, ``shuffle``, ``seed`` and ``shard``.
    """

    def __init__(self, specs: Sequence[InputSpec], description: str) -> None:
        self.specs = list(specs)
        self.description = description
        self._open_notes: list[str] = []
        self._summary: dict[str, Any] = self._fresh_summary(0, list(self._open_notes))

    @property
    @abc.abstractmethod
    def num_samples(self) -> int | None:
        """Samples available in the data, or ``None`` when unknown before reading (readers)."""

    @property
    def summary(self) -> dict[str, Any]:
        """What the latest call of :meth:`batches` used (a copy)."""
        out = dict(self._summary)
        out["notes"] = list(out["notes"])
        return out

    def _fresh_summary(self, batch_size: int, notes: list[str]) -> dict[str, Any]:
        return {
            "source": self.description,
            "batch_size": batch_size,
            "num_samples": 0,
            "num_batches": 0,
            "dropped": 0,
            "fingerprint": combine_fingerprints(),
            "notes": notes,
        }

    def _note(self, text: str) -> None:
        notes = self._summary["notes"]
        if text not in notes:
            notes.append(text)
            logger.info("%s", text)

    def batches(
        self,
        batch_size: int = 64,
        num_samples: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        keep_partial: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, Feed]]:
        """Yield ``(index, feed)`` for the batches of this run (see the module docstring).

        ``index`` is the global batch index, the same with or without ``shard``. The
        fingerprint in :attr:`summary` is the XOR of the SHA-256 of every yielded batch (global
        index, then per input in name order: name, dtype, shape, bytes as fed), so it covers
        exactly the tensors this iteration fed, depends on batch size and order, and the
        fingerprints of the shards of a run combine with :func:`combine_fingerprints` into
        the unsharded one.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
            raise DataError(f"batch size must be an integer, got {batch_size!r}")
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if num_samples is not None and (
            isinstance(num_samples, bool)
            or not isinstance(num_samples, int | np.integer)
            or num_samples < 1
        ):
            raise DataError(f"number of samples must be a positive integer, got {num_samples!r}")
        if shard is None:
            shard = (0, 1)
        else:
            shard_i, shard_k = shard
            if not (0 <= shard_i < shard_k):
                raise DataError(f"shard must be I/K with 0 <= I < K, got {shard_i}/{shard_k}")
        size, size_note = _effective_batch_size(self.specs, int(batch_size))
        self._summary = self._fresh_summary(size, list(self._open_notes))
        if size_note:
            self._note(size_note)
        if keep_partial and any(s.static_batch for s in self.specs):
            keep_partial = False  # a partial batch cannot be fed to a static batch dimension
            self._note("keep-partial ignored: the model's batch dimension is static")
        self._summary.update(shuffle=bool(shuffle), seed=int(seed), shard=list(shard))
        return self._run(size, num_samples, shuffle, seed, keep_partial, shard)

    def count_batches(
        self,
        batch_size: int = 64,
        num_samples: int | None = None,
        keep_partial: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> int | None:
        """Return how many batches :meth:`batches` will yield (for a progress bar).

        ``None`` when the number of samples is unknown before reading (readers).
        """
        total = self.num_samples
        if total is None:
            return None
        size, _ = _effective_batch_size(self.specs, int(batch_size))
        keep_partial = keep_partial and not any(s.static_batch for s in self.specs)
        n = total if num_samples is None else min(int(num_samples), total)
        full, rest = divmod(n, size)
        count = full + (1 if rest and keep_partial else 0)
        first, step = shard if shard is not None else (0, 1)
        return len(range(first, count, step))

    def _run(
        self,
        size: int,
        num_samples: int | None,
        shuffle: bool,
        seed: int,
        keep_partial: bool,
        shard: tuple[int, int],
    ) -> Iterator[tuple[int, Feed]]:
        acc = 0
        for index, feed in self._generate(size, num_samples, shuffle, seed, keep_partial, shard):
            check_finite(feed, index)  # here, once, so no consumer can forget it
            acc ^= _batch_digest(index, feed)
            summary = self._summary
            summary["num_batches"] += 1
            summary["num_samples"] += len(next(iter(feed.values())))
            summary["fingerprint"] = f"{acc:064x}"
            yield index, feed
        if self._summary["num_batches"] == 0:
            raise DataError(self._empty_message(size, shard))

    def _empty_message(self, size: int, shard: tuple[int, int]) -> str:
        s = self._summary
        if shard[1] > 1:
            return (
                f"no samples: shard {shard[0]}/{shard[1]} gets no batch of size {size} "
                "(use fewer shards or a smaller batch size)"
            )
        if s["dropped"]:
            return (
                f"no samples: the only batch had {s['dropped']} sample(s), fewer than the batch "
                f"size {size} (use a smaller batch size or keep-partial)"
            )
        return f"no samples in {self.description}"

    @abc.abstractmethod
    def _generate(
        self,
        size: int,
        num_samples: int | None,
        shuffle: bool,
        seed: int,
        keep_partial: bool,
        shard: tuple[int, int],
    ) -> Iterator[tuple[int, Feed]]:
        """Yield the owned batches; record ``dropped`` and notes in ``self._summary``."""


class IndexedSource(DataSource):
    """Data with a known number of samples that can be read by index (arrays, image files)."""

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

    def _generate(
        self,
        size: int,
        num_samples: int | None,
        shuffle: bool,
        seed: int,
        keep_partial: bool,
        shard: tuple[int, int],
    ) -> Iterator[tuple[int, Feed]]:
        total = self._length()
        if total == 0:
            return
        n = total if num_samples is None else min(int(num_samples), total)
        if num_samples is not None and num_samples > total:
            self._note(f"asked for {num_samples} samples, the data has {total}: using {total}")
        order = np.random.default_rng(seed).permutation(total)[:n] if shuffle else None
        full, rest = divmod(n, size)
        count = full + (1 if rest and keep_partial else 0)
        if rest and not keep_partial and full % shard[1] == shard[0]:
            self._summary["dropped"] = rest
        for index in range(shard[0], count, shard[1]):
            start, stop = index * size, min((index + 1) * size, n)
            if order is None:
                yield index, self._load(slice(start, stop))
                continue
            wanted = order[start:stop]
            perm = np.argsort(wanted, kind="stable")  # read rows in file order, then restore
            loaded = self._load(wanted[perm])
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(len(perm))
            yield index, {name: a[inverse] for name, a in loaded.items()}


class ArraySource(IndexedSource):
    """Arrays with a leading sample dimension, one per model input (``.npy``, ``.npz``, memory).

    The arrays may be NumPy memory maps; each batch slices them, so only the batch is read.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        specs: Sequence[InputSpec],
        description: str,
        notes: Sequence[str] = (),
    ) -> None:
        super().__init__(specs, description)
        self._open_notes.extend(notes)
        by_name = {s.name: s for s in specs}
        self._casts: dict[str, np.dtype | None] = {}
        lengths = {}
        for name, array in arrays.items():
            spec = by_name[name]
            if array.ndim == 0:
                raise DataError(
                    f"input {name!r}: expected shape {spec.describe_shape()}, got a scalar"
                )
            _check_shape(spec, array.shape[1:], array.shape)
            note = _cast_rule(array.dtype, spec)
            if note:
                self._open_notes.append(note)
            self._casts[name] = spec.dtype if note else None
            lengths[name] = array.shape[0]
        if len(set(lengths.values())) > 1:
            raise DataError(f"inputs have different numbers of samples: {lengths}")
        self._arrays = dict(arrays)
        self._n = next(iter(lengths.values()))
        self._summary = self._fresh_summary(0, list(self._open_notes))

    def _length(self) -> int:
        return self._n

    def _load(self, indices: np.ndarray | slice) -> Feed:
        feed = {}
        for name, array in self._arrays.items():
            try:
                batch = np.asarray(array[indices])
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"cannot read input {name!r} from {self.description}: {exc}"
                ) from exc
            target = self._casts[name]
            # astype copies even without a cast: never hand out a view of the caller's array
            feed[name] = batch.astype(target if target is not None else batch.dtype, order="C")
        return feed


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

    @property
    def num_samples(self) -> None:
        """Unknown until the reader has been read."""
        return None

    def _open(self) -> Iterator[Any]:
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
            note = _cast_rule(array.dtype, spec)
            if spec.shape is not None and array.ndim == len(spec.shape) - 1:
                _check_shape(spec, array.shape, array.shape)
                array = array[np.newaxis]
                self._note(f"added a batch dimension to the reader's {spec.name!r} feeds")
            elif array.ndim == 0:
                raise DataError(
                    f"{where}: input {spec.name!r}: expected shape {spec.describe_shape()}, "
                    "got a scalar"
                )
            else:
                _check_shape(spec, array.shape[1:], array.shape)
            if note:
                self._note(note)
                array = array.astype(spec.dtype)
            feed[spec.name] = array
            sizes[spec.name] = array.shape[0]
        if len(set(sizes.values())) > 1:
            raise DataError(f"{where}: inputs have different batch sizes {sizes}")
        return feed, next(iter(sizes.values()))

    def _generate(
        self,
        size: int,
        num_samples: int | None,
        shuffle: bool,
        seed: int,
        keep_partial: bool,
        shard: tuple[int, int],
    ) -> Iterator[tuple[int, Feed]]:
        if shuffle:
            raise DataError(
                "shuffle needs data that can be read by index (.npy, .npz, images); "
                "a reader is a stream: shuffle inside the reader instead"
            )
        stream = self._open()
        budget = num_samples
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
            while pending_rows >= size:
                batch, pending, pending_rows = _take(pending, pending_rows, size)
                if index % shard[1] == shard[0]:
                    yield index, batch
                index += 1
            if pending:
                # what is left is (part of) this feed, kept across next(): copy it, since
                # readers may refill the same buffer for every item
                pending[-1] = {k: v.copy() for k, v in pending[-1].items()}
        if pending_rows:
            owned = index % shard[1] == shard[0]
            if keep_partial:
                if owned:
                    yield index, _take(pending, pending_rows, pending_rows)[0]
            elif owned:
                self._summary["dropped"] = pending_rows


def _take(pending: list[Feed], rows: int, size: int) -> tuple[Feed, list[Feed], int]:
    """Split the first ``size`` rows off the queued feeds; return them, the rest, and its rows."""
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


# --------------------------------------------------------------------------- opening


def _npy_source(path: Path, specs: Sequence[InputSpec]) -> ArraySource:
    if len(specs) != 1:
        raise DataError(
            f"a .npy file feeds a single-input model; this model has inputs "
            f"{[s.name for s in specs]}: use a .npz with one key per input"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path} is not a .npy array")
    return ArraySource({specs[0].name: array}, specs, f"{path}")


def _npz_source(path: Path, specs: Sequence[InputSpec]) -> ArraySource:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is not a .npz archive")
    with archive:
        keys = list(archive.files)
        names = [s.name for s in specs]
        notes = []
        if len(specs) == 1 and names[0] not in keys:
            if len(keys) != 1:
                raise DataError(
                    f"{path} has keys {keys} and none is the model's input {names[0]!r}; "
                    f"name the array {names[0]!r}"
                )
            mapping = {names[0]: keys[0]}
            notes.append(f"key {keys[0]!r} of {path.name} feeds input {names[0]!r}")
        else:
            missing = [n for n in names if n not in keys]
            if missing:
                raise DataError(
                    f"{path} lacks keys {missing} for model inputs {names} (it has {keys})"
                )
            mapping = {n: n for n in names}
        ignored = sorted(set(keys) - set(mapping.values()))
        if ignored:
            notes.append(f"ignored keys of {path.name} that are not model inputs: {ignored}")
        arrays = {}
        for name, key in mapping.items():
            try:
                arrays[name] = archive[key]  # the whole array: archives cannot be mmapped
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
                raise DataError(f"cannot read key {key!r} of {path}: {exc}") from exc
            except Exception as exc:  # zlib.error and friends from a damaged member
                raise DataError(f"cannot read key {key!r} of {path}: {exc}") from exc
    return ArraySource(arrays, specs, f"{path}", notes)


def _load_function(spec: str) -> Callable[[], Any]:
    match = _READER_SPEC.match(spec)
    if match is None:
        raise DataError(f"not a data path or 'module:function' reader: {spec!r}")
    target, func_name = match["target"], match["func"]
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise DataError(f"reader file not found: {target}")
            mod_spec = importlib.util.spec_from_file_location(f"_bnref_reader_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise DataError(f"cannot import reader file {target}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            # `bnref-onnx` runs as a console script, whose sys.path lacks the working folder
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(target)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot import reader {target!r}: {type(exc).__name__}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"reader {target!r} has no function {func_name!r}")
    return func


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


def _reader_from_object(obj: Any, specs: Sequence[InputSpec], description: str) -> ReaderSource:
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


def _function_source(spec: str, specs: Sequence[InputSpec]) -> ReaderSource:
    """Open a ``module:function`` reader; the function is called again for every pass."""
    func = _load_function(spec)
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


def open_data(
    data: Any,
    specs: Sequence[InputSpec],
    image_options: ImageOptions | None = None,
) -> DataSource:
    """Open calibration data for a model with inputs ``specs`` (see the module docstring).

    ``data`` is a path (``.npy``, ``.npz``, a folder of images), a ``"module:function"`` or
    ``"file.py:function"`` reader, an array (single input), a mapping from input name to
    array, an iterable of feed dicts, or an object with ``get_next()``. ``image_options`` only
    applies to image folders. Problems raise :class:`DataError` with a one-line message.
    """
    specs = list(specs)
    if not specs:
        raise DataError("the model has no inputs to feed")
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise DataError(
                f"one array feeds a single-input model; this model has inputs "
                f"{[s.name for s in specs]}: pass a dict from input name to array"
            )
        return ArraySource({specs[0].name: data}, specs, "array in memory")
    if isinstance(data, Mapping):
        names = [s.name for s in specs]
        missing = [n for n in names if n not in data]
        if missing:
            raise DataError(f"arrays lack model inputs {missing} (got keys {sorted(data)})")
        arrays = {n: np.asarray(data[n]) for n in names}
        return ArraySource(arrays, specs, "arrays in memory")
    if isinstance(data, str | os.PathLike):
        text = os.fspath(data)
        path = Path(text)
        if path.is_dir():
            from onnx_tools.images import ImageFolderSource

            return ImageFolderSource(path, specs, image_options or ImageOptions())
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".npy":
                return _npy_source(path, specs)
            if suffix == ".npz":
                return _npz_source(path, specs)
            raise DataError(
                f"unsupported data file {text!r}: expected .npy, .npz, a folder of images, "
                "or a 'module:function' reader"
            )
        if (
            isinstance(data, str)
            and _READER_SPEC.match(text)
            and not text.endswith((".npy", ".npz"))
        ):
            return _function_source(text, specs)
        raise DataError(f"data not found: {text}")
    return _reader_from_object(data, specs, f"{type(data).__name__} reader")
