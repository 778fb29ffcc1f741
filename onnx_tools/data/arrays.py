"""Arrays as calibration data: ``.npy`` and ``.npz`` files, and arrays in memory.

Formats and their memory cost
-----------------------------
- ``.npy`` (single-input models): opened with ``mmap_mode="r"`` and sliced per batch, so memory
  is O(batch) whatever the file size. With ``shuffle`` each batch gathers its rows from the map
  (sorted reads), still O(batch), plus O(N) int64 for the permutation.
- ``.npz``: a zip archive cannot be memory-mapped (NumPy ignores ``mmap_mode`` for archives), so
  each array that feeds a model input is loaded whole into memory, once, when the source is
  opened: memory = the sum of those arrays. Keys that are not model inputs (labels, say) are
  never loaded. For large sets, save one ``.npy`` per input instead.
- in Python, an ``np.ndarray`` (single input) or a mapping from input name to array; each batch
  is a copy, so the caller's arrays are never handed out or changed.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_tools.data.identity import array_identity
from onnx_tools.data.source import IndexedSource
from onnx_tools.data.spec import Feed, InputSpec, cast_rule, check_sample_shape
from onnx_tools.errors import DataError


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
            check_sample_shape(spec, array.shape[1:], array.shape)
            note = cast_rule(array.dtype, spec)
            if note:
                self._open_notes.append(note)
            self._casts[name] = spec.dtype if note else None
            lengths[name] = array.shape[0]
        if len(set(lengths.values())) > 1:
            raise DataError(f"inputs have different numbers of samples: {lengths}")
        self._arrays = dict(arrays)
        self._n = next(iter(lengths.values()))
        self._restart_summary()

    def _length(self) -> int:
        return self._n

    def identity(self) -> dict[str, Any]:
        """SHA-256 of the arrays as stored (:func:`~onnx_tools.data.identity.array_identity`)."""
        return array_identity(self._arrays)

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


def open_array(array: np.ndarray, specs: Sequence[InputSpec]) -> ArraySource:
    """One array in memory, for a single-input model."""
    if len(specs) != 1:
        raise DataError(
            f"one array feeds a single-input model; this model has inputs "
            f"{[s.name for s in specs]}: pass a dict from input name to array"
        )
    return ArraySource({specs[0].name: array}, specs, "array in memory")


def open_mapping(data: Mapping, specs: Sequence[InputSpec]) -> ArraySource:
    """A mapping from input name to array in memory; other keys are ignored."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data]
    if missing:
        raise DataError(f"arrays lack model inputs {missing} (got keys {sorted(data)})")
    arrays = {n: np.asarray(data[n]) for n in names}
    return ArraySource(arrays, specs, "arrays in memory")


def open_npy(path: Path, specs: Sequence[InputSpec]) -> ArraySource:
    """A ``.npy`` file, memory-mapped, for a single-input model."""
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


def open_npz(path: Path, specs: Sequence[InputSpec]) -> ArraySource:
    """A ``.npz`` archive: the arrays that feed model inputs are loaded whole, once."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is not a .npz archive")
    with archive:
        keys = list(archive.files)
        mapping, notes = _npz_keys(path, keys, [s.name for s in specs])
        arrays = {}
        for name, key in mapping.items():
            try:
                arrays[name] = archive[key]  # the whole array: archives cannot be mmapped
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
                raise DataError(f"cannot read key {key!r} of {path}: {exc}") from exc
            except Exception as exc:  # zlib.error and friends from a damaged member
                raise DataError(f"cannot read key {key!r} of {path}: {exc}") from exc
    return ArraySource(arrays, specs, f"{path}", notes)


def _npz_keys(path: Path, keys: list[str], names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Which archive key feeds which input (the only key, for a single input), and notes."""
    notes = []
    if len(names) == 1 and names[0] not in keys:
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
    return mapping, notes
