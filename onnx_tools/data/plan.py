"""Which batches a run takes (:class:`BatchPlan`) and what it took (:class:`DataSummary`).

Batching rules
--------------
Samples are taken in stored order (sorted path order for images) unless ``shuffle``, which
draws ``np.random.default_rng(seed).permutation(N)`` (with ``num_samples=n``, its first ``n``
entries: a reproducible random subset). Batch ``i`` holds samples ``i*B .. (i+1)*B - 1`` of that
order. A final batch smaller than ``B`` is dropped and counted in ``summary.dropped`` unless
``keep_partial``. ``shard=(I, K)`` yields the whole batches ``I, I+K, I+2K, ...`` of that same
sequence, so the shards partition the unsharded run. A static batch dimension in the model's
input fixes ``B`` (a note says so when it overrides the requested size), and then a partial
batch cannot be fed: ``keep_partial`` is ignored (with a note).

``min_batch_size`` is the smallest batch the model can take (the caller knows why: one sample
into a BN after a fully connected layer gives it one value per channel, no variance). A batch
size below it is refused when the plan is resolved, and a kept final batch below it is refused
before the first batch is read when the number of samples is known (arrays, images;
:meth:`BatchPlan.check_partial`), else when the stream reaches it (readers); only in the shard
that owns that batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from onnx_tools.data.fingerprint import EMPTY_FINGERPRINT
from onnx_tools.data.spec import InputSpec
from onnx_tools.errors import DataError
from onnx_tools.options import arg

#: How many skipped files a summary names (all are counted).
MAX_LISTED = 10


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


@dataclass(frozen=True)
class BatchPlan:
    """How to batch the data: size, how many samples, order, partial batch, shard.

    Attributes:
        batch_size: samples per batch (a static batch dimension of the model overrides it).
        num_samples: use at most this many samples; ``None``: all.
        shuffle: draw samples in a seeded random order (indexed data only, not readers).
        seed: seed of that order.
        keep_partial: yield a final batch smaller than ``batch_size`` instead of dropping it.
        shard: ``(I, K)``: only the whole batches ``I, I+K, I+2K, ...``; ``None``: all.
        min_batch_size: the fewest samples a batch of the model may hold (default 1); see
            the module docstring.

    The fields are checked when the plan is made; a bad one raises :class:`DataError`.
    """

    batch_size: int = 64
    num_samples: int | None = None
    shuffle: bool = False
    seed: int = 0
    keep_partial: bool = False
    shard: tuple[int, int] | None = None
    min_batch_size: int = 1

    def __post_init__(self) -> None:
        if not _is_int(self.batch_size):
            raise DataError(f"batch size must be an integer, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {self.batch_size}")
        object.__setattr__(self, "batch_size", int(self.batch_size))
        if self.num_samples is not None:
            if not _is_int(self.num_samples) or self.num_samples < 1:
                raise DataError(
                    f"number of samples must be a positive integer, got {self.num_samples!r}"
                )
            object.__setattr__(self, "num_samples", int(self.num_samples))
        if self.shard is not None:
            shard_i, shard_k = self.shard
            if not (0 <= shard_i < shard_k):
                raise DataError(f"shard must be I/K with 0 <= I < K, got {shard_i}/{shard_k}")
            object.__setattr__(self, "shard", (shard_i, shard_k))
        if not _is_int(self.min_batch_size) or self.min_batch_size < 1:
            raise DataError(
                f"min_batch_size must be a positive integer, got {self.min_batch_size!r}"
            )
        object.__setattr__(self, "min_batch_size", int(self.min_batch_size))

    @property
    def sharding(self) -> tuple[int, int]:
        """``shard`` as ``(I, K)``; ``(0, 1)`` when unsharded."""
        return self.shard if self.shard is not None else (0, 1)

    def owns(self, index: int) -> bool:
        """Whether batch ``index`` belongs to this plan's shard."""
        first, step = self.sharding
        return index % step == first

    def resolve(self, specs: Sequence[InputSpec]) -> tuple[BatchPlan, list[str]]:
        """Return the plan as it runs for a model with inputs ``specs``, and notes on changes.

        A static batch dimension replaces ``batch_size`` and turns ``keep_partial`` off; the
        returned plan always has ``shard`` set.
        """
        size, size_note = effective_batch_size(specs, self.batch_size)
        if size < self.min_batch_size:
            fixed = " (fixed by the model's static batch dimension)" if size_note else ""
            raise DataError(
                f"batch size {size}{fixed} is too small for this model: a batch needs at "
                f"least {self.min_batch_size} samples"
            )
        notes = [size_note] if size_note else []
        keep_partial = self.keep_partial
        if keep_partial and any(s.static_batch for s in specs):
            keep_partial = False  # a partial batch cannot be fed to a static batch dimension
            notes.append(f"{arg('keep_partial')} ignored: the model's batch dimension is static")
        return replace(self, batch_size=size, keep_partial=keep_partial, shard=self.sharding), notes

    def split(self, total: int) -> tuple[int, int, int]:
        """For ``total`` samples: samples used, whole batches, samples left in a partial batch."""
        n = total if self.num_samples is None else min(self.num_samples, total)
        full, rest = divmod(n, self.batch_size)
        return n, full, rest

    def count(self, total: int) -> int:
        """Batches this (resolved) plan yields from ``total`` samples, in its shard only."""
        _, full, rest = self.split(total)
        count = full + (1 if rest and self.keep_partial else 0)
        first, step = self.sharding
        return len(range(first, count, step))

    def check_partial(self, total: int) -> None:
        """Refuse, before any batch is read, a kept final batch below ``min_batch_size``.

        For a resolved plan over ``total`` samples; only the shard that owns that batch
        refuses it.
        """
        n, full, rest = self.split(total)
        if self.keep_partial and 0 < rest < self.min_batch_size and self.owns(full):
            raise partial_batch_error(self, rest, f"{n} samples in batches of {self.batch_size}")


def partial_batch_error(plan: BatchPlan, rest: int, why: str) -> DataError:
    """The error for a kept final batch of ``rest`` samples, below ``plan.min_batch_size``."""
    return DataError(
        f"{arg('keep_partial')}: the last batch would hold {rest} sample(s) ({why}), fewer "
        f"than the {plan.min_batch_size} a batch of this model needs; drop "
        f"{arg('keep_partial')} to leave them out, or choose a {arg('batch_size')} that "
        "leaves a larger remainder"
    )


def effective_batch_size(specs: Sequence[InputSpec], requested: int) -> tuple[int, str | None]:
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


@dataclass
class DataSummary:
    """What the latest (or current) iteration of a :class:`~onnx_tools.data.DataSource` fed.

    Attributes:
        source: the data's description (path, ``reader module:function``, ...).
        batch_size: after a static batch dimension overrode it (0 before any iteration).
        num_samples: samples yielded.
        num_batches: batches yielded.
        dropped: samples of a final partial batch left out, counted in the shard that owns
            that batch, so shards sum to the unsharded count.
        fingerprint: of the batches yielded (see :mod:`onnx_tools.data.fingerprint`).
        notes: casts, overrides, keys ignored, ...
        num_skipped: files left out when the data was opened (unreadable images with
            ``ImageOptions(skip_bad_images=True)``); hidden files are only noted.
        skipped: the first :data:`MAX_LISTED` of those, ``"relative/path: reason"``.
        shuffle, seed, shard: the settings of the iteration (``shard`` ``(0, 1)`` if unsharded).
    """

    source: str
    batch_size: int = 0
    num_samples: int = 0
    num_batches: int = 0
    dropped: int = 0
    fingerprint: str = EMPTY_FINGERPRINT
    notes: list[str] = field(default_factory=list)
    shuffle: bool = False
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)

    def copy(self) -> DataSummary:
        """Return a copy that shares nothing mutable with this one."""
        return replace(self, notes=list(self.notes), skipped=list(self.skipped))
