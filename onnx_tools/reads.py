"""What a run reads, in one account that every output is checked against: :class:`RunReads`.

A run reads its model file and every external-data file the model references; its data: a
``.npy``/``.npz`` file, every file under an image folder (hidden ones included: the whole
folder is the run's input), or a reader's module file (``file.py:function``: that file;
``module:function``: the file Python imports for the module, found as the run finds it, and
the ``__init__.py`` of each package above it); STATS files; labels; and any other source a
command takes. Paths are resolved: symbolic links are followed to their final target, and
files are compared by ``(device, inode)``, so a hard link or a chain of links to an input *is*
that input.

:func:`onnx_tools.outputs.check_output` refuses, before any work, an output whose final
target is a file of the account (the model itself, and its own external data, aside when it
is written in place), or exists and is not a regular file; :func:`~onnx_tools.outputs.check_outputs`
also refuses two outputs that are one file. The :class:`~onnx_tools.outputs.OutputPath` it
returns carries the account, so :func:`~onnx_tools.outputs.write_model` checks the second file
a model with external data writes (``OUT.data``) against it too.

Every subcommand that writes builds one account from everything it reads and checks all its
outputs against it before any work; a new subcommand plugs in with one call::

    from onnx_tools.outputs import check_model_output, check_outputs

    reads = RunReads.of(model=args.model, data=args.source)       # everything it reads
    output = check_model_output(args.output, reads)                # a model, and OUT.data
    targets = check_outputs({"output": output, "report": args.report}, reads)
    ...                                                            # the work
    write_model(new_model, targets["output"], like=loaded)

(``check_output(path, reads=reads)`` for an output that is not a model; ``reads.add_file``,
``add_model``, ``add_data`` for inputs ``of`` does not name.)

The Python API (``recalibrate``, ``write_model``) builds the same account from its arguments.
Inputs that are not files (arrays, reader objects, a ``ModelProto``) add nothing; a path that
does not exist adds nothing either (the run itself reports it).
"""

from __future__ import annotations

import importlib.util
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import onnx

from onnx_tools.modelio import LoadedModel, all_tensors


@dataclass(frozen=True)
class ReadFile:
    """One file (or folder of files) a run reads: what it is to the run, and its path.

    ``own``: the input model's own file or external data, which ``in_place`` may replace.
    """

    what: str
    path: str
    own: bool = False


def file_key(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of the final target of ``path``; None when nothing is there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


class RunReads:
    """Every file a run reads (module docstring); :meth:`find` says whether a path is one."""

    def __init__(self) -> None:
        self.files: list[ReadFile] = []
        self.folders: list[ReadFile] = []  # every file below each of these is read
        #: The input model's external-data files: location -> path it is read from.
        self.model_locations: dict[str, str] = {}
        self._index: dict[tuple[int, int], ReadFile] | None = None  # built by find, once

    @classmethod
    def of(cls, *, model: Any = None, data: Any = None, stats: Iterable[Any] | str | None = None,
           labels: Any = None) -> RunReads:
        """The account of a run reading these (any may be None; ``stats``: one or several)."""
        reads = cls()
        if model is not None:
            reads.add_model(model)
        if data is not None:
            reads.add_data(data)
        if isinstance(stats, str | os.PathLike):
            reads.add_file("STATS", stats)
        elif stats is not None:
            paths = list(stats)
            for i, path in enumerate(paths):
                reads.add_file("STATS" if len(paths) == 1 else f"input STATS #{i + 1}", path)
        if labels is not None:
            reads.add_file("labels", labels)
        return reads

    def add_file(self, what: str, path: Any, own: bool = False) -> None:
        """One file the run reads (a path that is not a path adds nothing)."""
        if isinstance(path, str | os.PathLike):
            self.files.append(ReadFile(what, os.path.abspath(os.fspath(path)), own))
            self._index = None

    def add_model(self, model: Any, what: str = "input model") -> None:
        """A model file and each external-data file it references (a ModelProto: nothing).

        Accepts a path, a :class:`~onnx_tools.modelio.LoadedModel` or anything with a
        ``loaded`` attribute holding one (a ``ModelAnalysis``).
        """
        own = what == "input model"
        loaded = getattr(model, "loaded", model)
        if isinstance(loaded, LoadedModel):
            if loaded.path is None:
                return
            path, base_dir, locations = loaded.path, loaded.base_dir, loaded.locations
        elif isinstance(model, str | os.PathLike):
            path = os.fspath(model)
            base_dir = os.path.dirname(os.path.abspath(path))
            locations = _external_locations(path)
        else:
            return
        self.add_file(what, path, own)
        for location in sorted(locations):
            data_path = os.path.join(base_dir or "", location)
            self.add_file(f"external data of the {what}", data_path, own)
            if own:
                self.model_locations[location] = os.path.abspath(data_path)

    def add_data(self, data: Any, what: str = "data") -> None:
        """Calibration data: a file, every file under a folder, or a reader's module file(s)."""
        if not isinstance(data, str | os.PathLike):
            return  # arrays, mappings, reader objects: nothing on disk
        text = os.fspath(data)
        if os.path.isdir(text):
            self.folders.append(ReadFile(f"{what} folder", os.path.abspath(text)))
            self._index = None
        elif os.path.exists(text):
            self.add_file(what, text)
        else:
            from onnx_tools.data.readers import is_reader_spec

            if isinstance(data, str) and is_reader_spec(text):
                for path in reader_files(text):
                    self.add_file(f"reader module of {what}", path)

    def _candidates(self) -> Iterator[ReadFile]:
        yield from self.files
        for folder in self.folders:
            for root, _, names in os.walk(folder.path):
                for name in names:
                    path = os.path.join(root, name)
                    yield ReadFile(f"{folder.what} {folder.path} (its file {path})", path)

    def find(self, path: str | os.PathLike) -> ReadFile | None:
        """The input that the file at ``path`` is (after links, by device and inode), or None.

        A folder's files are looked at only when ``path`` exists (else nothing can match), and
        only once: every output of a run (and the external data a model write adds after the
        work) is looked up in one index of the inputs, not by walking their folders again.
        """
        key = file_key(os.fspath(path))
        if key is None:
            return None
        if self._index is None:
            self._index = {}
            for read in self._candidates():
                read_key = file_key(read.path)
                if read_key is not None:
                    self._index.setdefault(read_key, read)
        return self._index.get(key)


def _external_locations(path: str) -> set[str]:
    """External-data locations a model file references (empty when it cannot be read)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return set()
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable: the run reports it with its own message
        return set()
    locations = set()
    for tensor in all_tensors(proto):
        if onnx.external_data_helper.uses_external_data(tensor):
            locations.add(onnx.external_data_helper.ExternalDataInfo(tensor).location)
    return locations


def reader_files(spec: str) -> list[str]:
    """The files a ``file.py:function`` or ``module:function`` reader is imported from.

    ``file.py``: that file. ``module``: the file Python imports for it (found as
    :func:`onnx_tools.data.readers.load_function` finds it, the working folder on the path) and
    the ``__init__.py`` of each package above it. Finding a submodule imports its parent
    package, as running the reader would. A module that cannot be found gives nothing.
    """
    from onnx_tools.data.readers import READER_SPEC, working_folder_on_path

    match = READER_SPEC.match(spec)
    if match is None:
        return []
    target = match["target"]
    if target.endswith(".py"):
        return [target]
    files = []
    parts = target.split(".")
    with working_folder_on_path():
        for i in range(1, len(parts) + 1):
            try:
                found = importlib.util.find_spec(".".join(parts[:i]))
            except Exception:  # noqa: BLE001 - not importable: the run reports it itself
                break
            if found is not None and found.origin and os.path.isfile(found.origin):
                files.append(found.origin)
    return files
