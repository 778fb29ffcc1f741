"""Calibration data: open a file, folder or reader and yield model feeds batch by batch.

:func:`open_data` turns what the user points at into a :class:`DataSource`; its
:meth:`DataSource.batches` takes a :class:`BatchPlan` and yields ``(index, feed)`` pairs,
``feed`` being a dict from model input name to an array whose leading (batch) dimension is the
batch size; :attr:`DataSource.summary` (a :class:`DataSummary`) says what was fed::

    source = open_data("calib.npy", InputSpec.from_model(model))
    for index, feed in source.batches(BatchPlan(batch_size=32, shuffle=True)):
        ...
    source.summary.fingerprint

:meth:`DataSource.check` raises, before a session is built, what can be known without reading
every batch (the plan against the model, ``BatchPlan(min_batch_size=...)`` against a kept
final batch, a reader's first feed).

Where each part lives (each module's docstring has the rules it implements):

- :mod:`~onnx_tools.data.spec`: :class:`InputSpec` (one model input), dtype casts, the
  per-sample shape check, :func:`check_finite`.
- :mod:`~onnx_tools.data.plan`: :class:`BatchPlan` and the batching rules (order, shuffle,
  partial batch, shards, static batch dimension, ``min_batch_size``); :class:`DataSummary`.
- :mod:`~onnx_tools.data.fingerprint`: the data fingerprint, :func:`combine_fingerprints`.
- :mod:`~onnx_tools.data.source`: :class:`DataSource`, the interface of all data.
- :mod:`~onnx_tools.data.arrays`: ``.npy`` (memory-mapped, O(batch)), ``.npz`` (inputs loaded
  whole), arrays in memory.
- :mod:`~onnx_tools.data.readers`: ``"module:function"`` / ``"file.py:function"`` readers and
  reader objects (iterables of feed dicts, ``get_next()``), re-batched, O(batch + one feed).
- :mod:`~onnx_tools.data.images`: a folder of images (pillow), every file checked when
  opened, decoded per batch, O(batch); :class:`ImageOptions`.
- :mod:`~onnx_tools.data.listing`: which files of a folder are images (hidden ones skipped).
- :mod:`~onnx_tools.data.pixels`: one image file to pixels: pillow modes, 16-bit, EXIF, the
  open-time check.
- :mod:`~onnx_tools.data.open`: :func:`open_data`, which picks one of the above.
"""

from __future__ import annotations

from onnx_tools.data.arrays import ArraySource
from onnx_tools.data.fingerprint import combine_fingerprints
from onnx_tools.data.images import ImageFolderSource, ImageOptions
from onnx_tools.data.open import open_data
from onnx_tools.data.plan import BatchPlan, DataSummary
from onnx_tools.data.readers import ReaderSource
from onnx_tools.data.source import DataSource, IndexedSource
from onnx_tools.data.spec import Feed, InputSpec, check_finite

__all__ = [
    "ArraySource",
    "BatchPlan",
    "DataSource",
    "DataSummary",
    "Feed",
    "ImageFolderSource",
    "ImageOptions",
    "IndexedSource",
    "InputSpec",
    "ReaderSource",
    "check_finite",
    "combine_fingerprints",
    "open_data",
]
