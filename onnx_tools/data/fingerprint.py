"""Data fingerprints: which tensors a run fed, as 64 hex digits.

A data fingerprint is the XOR of the SHA-256 digests of the batches yielded (:func:`batch_digest`:
global batch index, then per input in name order: name, dtype, shape, bytes as fed). It covers
exactly the tensors one iteration fed, depends on batch size and order, and, XOR being
order-free, the fingerprints of the shards of a run combine with :func:`combine_fingerprints`
into the unsharded one. The batch index keeps two equal batches from cancelling out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from onnx_tools.errors import DataError


def batch_digest(index: int, feed: Mapping[str, np.ndarray]) -> int:
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


def format_fingerprint(digest: int) -> str:
    """Return an accumulated digest as the 64 hex digits stored in STATS files."""
    return f"{digest:064x}"


def combine_fingerprints(*fingerprints: str) -> str:
    """Fingerprint of the union of disjoint sets of batches (e.g. the shards of one run).

    A data fingerprint is the XOR of the SHA-256 digests of its batches (see
    :meth:`onnx_tools.data.DataSource.batches`), so the shards of a run combine, in any
    order, to the fingerprint of the unsharded run.
    """
    acc = 0
    for fp in fingerprints:
        try:
            acc ^= int(fp, 16)
        except (TypeError, ValueError) as exc:
            raise DataError(f"not a data fingerprint: {fp!r}") from exc
    return format_fingerprint(acc)


#: The fingerprint of no batch at all.
EMPTY_FINGERPRINT = combine_fingerprints()
