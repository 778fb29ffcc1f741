"""Write models and files atomically: checked first, written beside the target, renamed.

Every output is checked before any work (:func:`check_output`: folder exists and is writable,
not a directory, not the input model unless in place). A write goes to a temporary file or
folder in the target folder, is checked (models: the onnx checker, by path), and is renamed
into place; on any error or interruption nothing is left behind and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import onnx
from onnx import external_data_helper

from onnx_tools import modelio
from onnx_tools.errors import ModelError, OutputError, short_message
from onnx_tools.interrupts import signals_held
from onnx_tools.modelio import LoadedModel, all_tensors, externalize_float_initializers, model_size
from onnx_tools.options import checked, setting

#: Test injection point, called after the new model is written and checked and before it is
#: renamed into place (interruption tests raise from it).
before_replace: Callable[[str], None] | None = None


@dataclass(frozen=True)
class OutputPath:
    """An absolute output path that :func:`check_output` found writable (and not the input).

    Functions that write take one of these or a plain path; a plain path is checked there,
    an ``OutputPath`` is not checked again.
    """

    path: str
    what: str = "output"

    def __fspath__(self) -> str:
        return self.path


@checked()
def check_output(
    out: str | os.PathLike,
    *,
    what: str = "output",
    input_path: str | os.PathLike | None = None,
    in_place: bool = False,
) -> OutputPath:
    """Fail before any work when ``out`` cannot be written; return it as an :class:`OutputPath`.

    Checks that its folder exists and is writable, that it is not a directory, and (unless
    ``in_place``) that it is not the input model itself: writing there would modify the input.
    """
    out = os.path.abspath(os.fspath(out))
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise OutputError(f"{what} folder does not exist: {folder}")
    if os.path.isdir(out):
        raise OutputError(f"{what} path is a directory: {out}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} folder is not writable: {folder}")
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise OutputError(f"{what} file is not writable: {out}")
    if (
        not in_place
        and input_path is not None
        and os.path.exists(out)
        and os.path.exists(input_path)
        and os.path.samefile(out, input_path)
    ):
        raise OutputError(f"{what} {out} is the input model; overwrite it only in place "
                          f"({setting('in_place', True)})")
    return OutputPath(out, what)


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(
    outputs: Mapping[str, str | os.PathLike | None],
    inputs: Mapping[str, object] = {},  # noqa: B006 - read only
) -> None:
    """Refuse, before any work, an output that is an input or another output.

    ``outputs`` and ``inputs`` map a description ("output", "report", "data", ...) to a
    path (None: not given). Inputs that are not existing files (a folder of images, a
    ``module:function`` reader, an array) cannot collide and are left out.
    """
    outs = [(what, os.fspath(p)) for what, p in outputs.items() if p is not None]
    ins = [(what, os.fspath(p)) for what, p in inputs.items()
           if isinstance(p, str | os.PathLike) and os.path.isfile(p)]
    for i, (what, path) in enumerate(outs):
        for other, other_path in outs[i + 1:]:
            if _same_file(path, other_path):
                raise OutputError(f"the {what} and the {other} are the same file ({path}): "
                                  "the second write would destroy the first")
        for other, other_path in ins:
            if _same_file(path, other_path):
                raise OutputError(f"the {what} {path} is the {other} file: writing it would "
                                  f"destroy the {other}")


def _checked(out: str | os.PathLike | OutputPath, input_path: str | None = None,
             in_place: bool = False) -> str:
    if isinstance(out, OutputPath):
        return out.path
    return check_output(out, input_path=input_path, in_place=in_place).path


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
    external stay external, in one file named after the output (``OUT.data``; ``--in-place``
    keeps the input's file name). A model over the protobuf limit always goes external.
    Everything is written into a temporary folder next to ``out``, checked, then renamed into
    place; on any error or interruption nothing is left behind.
    """
    out = _checked(out, input_path=like.path if like is not None else None, in_place=in_place)
    target_dir = os.path.dirname(out)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".bnref-onnx-", dir=target_dir)
    except OSError as exc:
        raise OutputError(f"cannot write to {target_dir}: {exc.strerror or exc}") from exc
    try:
        external = set(like.external) if like is not None else set()
        too_big = model_size(model) > modelio.PROTOBUF_LIMIT
        location = None
        copy = model
        if external or too_big:
            # Marking tensors external changes them: work on a copy, never the caller's model.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            location = os.path.basename(out) + ".data"
            if in_place and like is not None and len(like.locations) == 1:
                location = next(iter(like.locations))
            if os.sep in location or (os.altsep and os.altsep in location):
                location = os.path.basename(out) + ".data"
            for tensor in all_tensors(copy):
                if tensor.name in external and tensor.HasField("raw_data"):
                    external_data_helper.set_external_data(tensor, location)
            if too_big:
                externalize_float_initializers(copy, location)
        tmp_model = os.path.join(tmpdir, os.path.basename(out))
        try:
            onnx.save_model(copy, tmp_model)
        except OSError as exc:
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
        try:
            onnx.checker.check_model(tmp_model)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"the written model fails the onnx checker: {short_message(exc)}") from exc
        if before_replace is not None:
            before_replace(out)
        # The data file and the model must land together: an interrupt between the two
        # renames would pair the old model with the new data file (--in-place). An interrupt
        # arriving here is delivered right after both.
        with signals_held():
            if location is not None and os.path.exists(os.path.join(tmpdir, location)):
                os.replace(os.path.join(tmpdir, location), os.path.join(target_dir, location))
            try:
                os.replace(tmp_model, out)
            except OSError as exc:
                raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def atomic_write_bytes(data: bytes, out: str | os.PathLike | OutputPath) -> None:
    """Write bytes to ``out`` via a temporary file in the same folder and ``os.replace``."""
    out = _checked(out)
    target_dir = os.path.dirname(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bnref-onnx-", dir=target_dir)
    except OSError as exc:
        raise OutputError(f"cannot write to {target_dir}: {exc.strerror or exc}") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:  # disk full, quota, I/O error: the temporary file goes away below
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        if before_replace is not None:
            before_replace(out)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
