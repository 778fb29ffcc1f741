""":func:`open_data`: turn what the user points at into a :class:`~onnx_tools.data.DataSource`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_tools.data.arrays import open_array, open_mapping, open_npy, open_npz
from onnx_tools.data.images import ImageFolderSource, ImageOptions
from onnx_tools.data.readers import is_reader_spec, open_function_reader, open_object_reader
from onnx_tools.data.source import DataSource
from onnx_tools.data.spec import InputSpec
from onnx_tools.errors import DataError


def open_data(
    data: Any,
    specs: Sequence[InputSpec],
    image_options: ImageOptions | None = None,
) -> DataSource:
    """Open calibration data for a model with inputs ``specs`` (see :mod:`onnx_tools.data`).

    ``data`` is a path (``.npy``, ``.npz``, a folder of images), a ``"module:function"`` or
    ``"file.py:function"`` reader, an array (single input), a mapping from input name to
    array, an iterable of feed dicts, or an object with ``get_next()``. ``image_options`` only
    applies to image folders. Problems raise :class:`DataError` with a one-line message.
    """
    specs = list(specs)
    if not specs:
        raise DataError("the model has no inputs to feed")
    if isinstance(data, np.ndarray):
        return open_array(data, specs)
    if isinstance(data, Mapping):
        return open_mapping(data, specs)
    if isinstance(data, str | os.PathLike):
        return _open_path(data, specs, image_options)
    return open_object_reader(data, specs, f"{type(data).__name__} reader")


def _open_path(
    data: str | os.PathLike, specs: list[InputSpec], image_options: ImageOptions | None
) -> DataSource:
    """A folder of images, a ``.npy``/``.npz`` file, or a ``module:function`` reader."""
    text = os.fspath(data)
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path, specs, image_options or ImageOptions())
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return open_npy(path, specs)
        if suffix == ".npz":
            return open_npz(path, specs)
        raise DataError(
            f"unsupported data file {text!r}: expected .npy, .npz, a folder of images, "
            "or a 'module:function' reader"
        )
    if isinstance(data, str) and is_reader_spec(text):
        return open_function_reader(text, specs)
    raise DataError(f"data not found: {text}")
