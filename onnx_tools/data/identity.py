"""The identity of a whole data source, so that the shards of one run can be told apart.

A shard's STATS file records the fingerprint of the batches that shard fed
(:mod:`onnx_tools.data.fingerprint`) and, to let ``merge`` check that every shard read the
same data, the identity of the whole source (``data_source`` in its meta):
``{"kind", "samples", "digest"}``. ``merge`` refuses shards whose identities differ. Per kind:

- ``arrays`` (``.npy``, ``.npz``, arrays in memory): SHA-256 of each input's name, dtype,
  shape and bytes as stored (before any cast), read once in chunks (O(chunk) memory).
- ``images`` (a folder): SHA-256 of each image's relative path and size, in order, and of
  the options that turn pixels into tensors (size, resize, mode, scale, mean, std, layout,
  EXIF, JPEG draft, dtype). Pixels are not hashed, which would read every image in every
  shard: an image rewritten in place with the same size and name goes unnoticed.
- ``stream`` (a ``module:function`` or ``file.py:function`` reader, a reader object): the data
  fingerprint of the whole stream, every batch of every shard (each shard reads the whole
  stream anyway), which is the fingerprint an unsharded run records; so the fingerprints
  of a complete set of shards must also combine to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Bytes hashed per read of an array.
CHUNK = 1 << 26


def array_identity(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Identity of arrays with a leading sample dimension (module docstring)."""
    h = hashlib.sha256(b"arrays\0")
    samples = 0
    for name in sorted(arrays):
        array = arrays[name]
        samples = int(array.shape[0]) if array.ndim else 0
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        rows = max(1, CHUNK // max(1, array[:1].nbytes)) if array.ndim else 1
        for start in range(0, max(samples, 1), rows):
            part = np.ascontiguousarray(array[start:start + rows] if array.ndim else array)
            h.update(part.data.cast("B") if part.size else b"")
    return {"kind": "arrays", "samples": samples, "digest": h.hexdigest()}


def image_identity(folder: Path, files: Sequence[Path], params: Sequence[Any]) -> dict[str, Any]:
    """Identity of an image folder: paths, sizes and the conversion ``params`` (docstring)."""
    h = hashlib.sha256(b"images\0")
    h.update(repr(list(params)).encode() + b"\0")
    for path in files:
        h.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
    return {"kind": "images", "samples": len(files), "digest": h.hexdigest()}


def stream_identity(fingerprint: str, samples: int) -> dict[str, Any]:
    """Identity of a stream: the data fingerprint of all its batches (module docstring)."""
    return {"kind": "stream", "samples": int(samples), "digest": fingerprint}
