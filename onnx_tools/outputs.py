"""Write models and files atomically: checked first, written beside the target, renamed.

Every output is checked before any work (:func:`check_output`, :func:`check_outputs`):
followed through symbolic links to its final target (a dangling link included: its target
is what gets written, and the link stays), it must not be a file the run reads
(:class:`~onnx_tools.reads.RunReads`; the input model itself, with its own external data,
only in place), must not exist as anything but a regular file (a FIFO, a device, a socket,
a folder), its folder must exist and be writable, and no two outputs may be one file.
A write goes to a temporary file or folder beside the final target, is checked (models: the
onnx checker, by path), given the mode (and, run as root, the owner) of the file it
replaces, or the umask's default for a new file, and is renamed into place; on any error or
interruption nothing is left behind and the target is untouched. A model's external data
is written the same way, with the model's mode.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

import onnx
from onnx import external_data_helper

from onnx_tools import modelio
from onnx_tools.errors import ModelError, OptionError, OutputError, short_message
from onnx_tools.interrupts import signals_held
from onnx_tools.modelio import LoadedModel, all_tensors, externalize_float_initializers, model_size
from onnx_tools.options import arg, checked, setting
from onnx_tools.reads import RunReads, file_key

#: Test injection point, called after the new model is written and checked and before it is
#: renamed into place (interruption tests raise from it).
before_replace: Callable[[str], None] | None = None



@dataclass(frozen=True)
class OutputPath:
    """An output that :func:`check_output` accepted: its final target, and what was given.

    ``path`` is absolute, symbolic links followed (what is written); ``given`` the path as
    the user gave it; ``reads`` the account it was checked against (a model's external data
    file is checked against it when written); ``data`` that file, when known beforehand. Functions that write take one of these or a
    plain path; a plain path is checked there, an ``OutputPath`` is not checked again.
    """

    path: str
    what: str = "output"
    given: str = ""
    reads: RunReads | None = field(default=None, compare=False, repr=False)
    in_place: bool = False
    data: str | None = None  # a model's external-data file, when known to be written

    def __fspath__(self) -> str:
        return self.path


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _final_target(out: str, given: str, what: str) -> str:
    target = os.path.realpath(out)  # each ``..`` after the link before it is resolved
    if os.path.islink(target):  # realpath stops at a loop
        raise OutputError(f"{what} {given} is a loop of symbolic links")
    return target



@checked()
def check_output(
    out: str | os.PathLike,
    *,
    what: str = "output",
    reads: RunReads | None = None,
    input_path: str | os.PathLike | None = None,
    in_place: bool = False,
) -> OutputPath:
    """Fail before any work when ``out`` cannot be written; return it as an :class:`OutputPath`.

    See the module docstring. ``reads`` is everything the run reads (``input_path``, the
    input model, alone when it is None); ``in_place`` allows the input model's own files.
    """
    given = os.path.abspath(os.fspath(out))
    target = _final_target(os.fspath(out), given, what)  # not the lexical ``given``: a/link/..
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise OutputError(f"{what} folder does not exist: {folder}")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"{what} path is a directory: {given}")
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{what} {given} is {_kind(mode)}, not a regular file: writing "
                          "replaces the file at the path, so give the path of a regular file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} folder is not writable: {folder}")
    if mode is not None and not os.access(target, os.W_OK):
        raise OutputError(f"{what} file is not writable: {given}")
    if reads is None and input_path is not None:
        reads = RunReads.of(model=input_path)
    read = reads.find(target) if reads is not None else None
    if read is not None and not (in_place and read.own):
        if read.what == "input model" and what == "output" and not in_place:
            raise OutputError(f"{what} {given} is the input model; overwrite it only in place "
                              f"({setting('in_place', True)})")
        raise OutputError(f"the {what} {given} is the {read.what} file {read.path}: writing it "
                          f"would destroy the {read.what}")
    return OutputPath(target, what, given, reads, in_place)


def check_model_output(out: str | os.PathLike, reads: RunReads, *, what: str = "output",
                       in_place: bool = False) -> OutputPath:
    """:func:`check_output` for a model, and its external-data file when the input has one."""
    checked = check_output(out, what=what, reads=reads, in_place=in_place)
    if reads.model_locations:
        return replace(checked, data=data_file(checked, reads.model_locations).path)
    return checked


def data_file(out: OutputPath, locations: Collection[str]) -> OutputPath:
    """Check, and return, the external-data file a model written to ``out`` writes.

    ``OUT.data`` beside the model; in place, the input's own data file name when it had one
    in the model's folder. Under ``in_place`` the data file must be where the input's was
    read from (a model that is a link into another folder keeps its data beside the link).
    It may not be a link (onnx reads no external data through one).
    """
    location = os.path.basename(out.path) + ".data"
    if out.in_place and len(locations) == 1:
        location = next(iter(locations))
    if os.sep in location or (os.altsep and os.altsep in location):
        location = os.path.basename(out.path) + ".data"
    path = os.path.join(os.path.dirname(out.path), location)
    if os.path.islink(path):  # onnx refuses to read external data through a link
        raise OutputError(f"the external data of the {out.what} would be written to {path}, "
                          "a symbolic link, which onnx refuses to read; remove the link")
    read_from = out.reads.model_locations.get(location) if out.reads is not None else None
    if out.in_place and read_from is not None and file_key(read_from) != file_key(path):
        raise OutputError(
            f"{out.given} is a link to {out.path} in another folder, and its external data "
            f"is read from {read_from}: writing it in place would separate the two; write a "
            "new model instead"
        )
    return check_output(path, what=f"external data of the {out.what}", reads=out.reads,
                        in_place=out.in_place)


def check_outputs(outputs: Mapping[str, str | os.PathLike | OutputPath | None],
                  reads: RunReads | None = None) -> dict[str, OutputPath | None]:
    """Check each output (a plain path against ``reads``) and that no two are one file.

    ``outputs`` maps what each output is ("output", "report", ...) to its path (None: not
    given); returns the same keys with checked :class:`OutputPath` values.
    """
    checked = {what: (p if isinstance(p, OutputPath) or p is None
                      else check_output(p, what=what, reads=reads))
               for what, p in outputs.items()}
    files = [(what, p.given, p.path) for what, p in checked.items() if p is not None]
    files += [(f"external data of the {what}", p.data, p.data)
              for what, p in checked.items() if p is not None and p.data is not None]
    for i, (what, given, path) in enumerate(files):
        key = file_key(path)
        for other, _, other_path in files[i + 1:]:
            if path == other_path or (key is not None and key == file_key(other_path)):
                raise OutputError(f"the {what} and the {other} are the same file ({given}): "
                                  "the second write would destroy the first")
    return checked


def _checked(out: str | os.PathLike | OutputPath) -> OutputPath:
    return out if isinstance(out, OutputPath) else check_output(out)


def _give_mode(paths: list[str], destination: str) -> None:
    """Give ``paths`` the mode (and, as root, the owner) of ``destination``, or a new file's."""
    try:
        st = os.stat(destination)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode, owner = 0o666 & ~umask, None
    else:
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    for path in paths:
        if owner is not None and hasattr(os, "geteuid") and os.geteuid() == 0:
            os.chown(path, *owner)
        os.chmod(path, mode)


@checked()
def write_model(
    model: onnx.ModelProto,
    out: str | os.PathLike | OutputPath,
    *,
    like: LoadedModel | None = None,
    in_place: bool = False,
) -> None:
    """Write ``model`` to ``out`` atomically and check it with the onnx checker (by path).

    External data is written back the same way the input stored it: the tensors that were
    external stay external, in one file named after the output (``OUT.data``; in place keeps
    the input's file name). A model over the protobuf limit always goes external. ``out``
    is followed through links (the link stays); ``in_place=True`` needs ``out`` to be
    ``like``'s own file. Everything is written into a temporary folder beside the target,
    checked, given the target's mode, then renamed into place; on any error or interruption
    nothing is left behind.
    """
    if not isinstance(out, OutputPath):
        reads = RunReads.of(model=like) if like is not None else None
        out = check_output(out, reads=reads, in_place=in_place)
    if in_place and (like is None or like.path is None
                     or file_key(like.path) != file_key(out.path)):
        raise OutputError(f"in_place writes the input model itself, not {out.given or out.path}: "
                          "give the output without in_place, or in_place without an output")
    target_dir = os.path.dirname(out.path)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".bnref-onnx-", dir=target_dir)
    except OSError as exc:
        raise OutputError(f"cannot write to {target_dir}: {exc.strerror or exc}") from exc
    try:
        _write_and_replace(model, out, like, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _write_and_replace(model: onnx.ModelProto, out: OutputPath, like: LoadedModel | None,
                       tmpdir: str) -> None:
    external = set(like.external) if like is not None else set()
    too_big = model_size(model) > modelio.PROTOBUF_LIMIT
    data = None
    copy = model
    if external or too_big:
        # Marking tensors external changes them: work on a copy, never the caller's model.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        data = data_file(out, like.locations if like is not None else ())
        location = os.path.basename(data.given)
        for tensor in all_tensors(copy):
            if tensor.name in external and tensor.HasField("raw_data"):
                external_data_helper.set_external_data(tensor, location)
        if too_big:
            externalize_float_initializers(copy, location)
    tmp_model = os.path.join(tmpdir, os.path.basename(out.path))
    try:
        onnx.save_model(copy, tmp_model)
    except OSError as exc:
        raise OutputError(f"cannot write {out.path}: {exc.strerror or exc}") from exc
    try:
        onnx.checker.check_model(tmp_model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the written model fails the onnx checker: {short_message(exc)}") from exc
    tmp_data = None
    if data is not None and os.path.exists(os.path.join(tmpdir, os.path.basename(data.given))):
        tmp_data = os.path.join(tmpdir, os.path.basename(data.given))
    # onnx writes external data 0600: both files get the mode of the model they replace
    _give_mode([tmp_model, *([tmp_data] if tmp_data else [])], out.path)
    if before_replace is not None:
        before_replace(out.path)
    # The data file and the model must land together: an interrupt between the two renames
    # would pair the old model with the new data file (in place). An interrupt arriving here
    # is delivered right after both.
    with signals_held():
        try:
            if tmp_data is not None:
                os.replace(tmp_data, data.path)
            os.replace(tmp_model, out.path)
        except OSError as exc:
            raise OutputError(f"cannot write {out.path}: {exc.strerror or exc}") from exc


def atomic_write_bytes(data: bytes, out: str | os.PathLike | OutputPath) -> None:
    """Write bytes to ``out`` via a temporary file beside it and ``os.replace`` (see above)."""
    out = _checked(out)
    target_dir = os.path.dirname(out.path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bnref-onnx-", dir=target_dir)
    except OSError as exc:
        raise OutputError(f"cannot write to {target_dir}: {exc.strerror or exc}") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:  # disk full, quota, I/O error: the temporary file goes away below
            raise OutputError(f"cannot write {out.path}: {exc.strerror or exc}") from exc
        _give_mode([tmp], out.path)  # mkstemp makes 0600
        if before_replace is not None:
            before_replace(out.path)
        os.replace(tmp, out.path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def model_target(loaded: LoadedModel, output: str | os.PathLike | OutputPath | None, in_place: bool,
                 reads: RunReads) -> OutputPath | None:
    """Where an API call that writes a model writes it (checked before any work), or None.

    ``in_place`` overwrites ``loaded``'s own file and takes no ``output`` (but the
    :class:`OutputPath` the caller checked it as); an :class:`OutputPath` was checked by the
    caller (the CLI), in place or not, and is not checked again; a plain path is checked
    against ``reads`` (:mod:`onnx_tools.reads`); no output: nothing is written.
    """
    if isinstance(output, OutputPath) and output.in_place == in_place and (
            not in_place or loaded.path is not None
            and file_key(loaded.path) == file_key(output.path)):
        return output
    if in_place and output is not None:
        raise OptionError("give output or in_place, not both: in_place=True overwrites the "
                          "input model itself")
    if in_place:
        if loaded.path is None:
            raise OutputError(f"{arg('in_place')} needs a model path")
        return check_model_output(loaded.path, reads, in_place=True)
    if output is None:
        return None
    return check_model_output(output, reads)
