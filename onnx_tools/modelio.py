"""Load, run and atomically write ONNX models (external data and the 2 GB limit included)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from onnx_tools.errors import Interrupted, ModelError, OutputError, ProviderError

logger = logging.getLogger(__name__)

#: A ModelProto larger than this cannot be serialized to one protobuf; such models go to
#: onnxruntime and the checker by path. Module-level so tests can lower it.
PROTOBUF_LIMIT = 2**31 - 1

#: Test injection point, called after the new model is written and checked and before it is
#: renamed into place (interruption tests raise from it).
before_replace: Callable[[str], None] | None = None


@dataclass
class LoadedModel:
    """A model with all tensor data in memory, and how it was stored on disk.

    ``external`` names the initializers that lived in external data files; ``locations``
    the files they used (relative to ``base_dir``).
    """

    model: onnx.ModelProto
    path: str | None = None
    base_dir: str | None = None
    external: set[str] = field(default_factory=set)
    locations: set[str] = field(default_factory=set)


def load_model(model: str | os.PathLike | onnx.ModelProto | LoadedModel) -> LoadedModel:
    """Load a model from a path (external data resolved) or copy a ModelProto.

    The caller's ModelProto is never modified: a copy is taken.
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _check_loaded(copy, "the given ModelProto")
        return LoadedModel(copy)
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelError(f"model path is a directory, not an ONNX file: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"cannot read {path} as an ONNX model (corrupt or not ONNX): {exc}"
        ) from exc
    except OSError as exc:
        raise ModelError(f"cannot read model {path}: {exc.strerror or exc}") from exc
    _check_loaded(proto, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    external: set[str] = set()
    locations: set[str] = set()
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            external.add(tensor.name)
            info = external_data_helper.ExternalDataInfo(tensor)
            locations.add(info.location)
    if external:
        try:
            external_data_helper.load_external_data_for_model(proto, base_dir)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the external data of {path}: {exc}") from exc
    return LoadedModel(proto, path, base_dir, external, locations)


def _check_loaded(proto: onnx.ModelProto, what: str) -> None:
    if not proto.HasField("graph") or not proto.opset_import or not proto.graph.node:
        raise ModelError(f"{what} is not an ONNX model with a graph (empty or corrupt file)")


def model_size(model: onnx.ModelProto) -> int:
    """Return the serialized size in bytes."""
    return model.ByteSize()


@contextlib.contextmanager
def model_source(model: onnx.ModelProto):
    """Yield what onnxruntime should load: bytes, or a temporary path above the 2 GB limit."""
    if model_size(model) <= PROTOBUF_LIMIT:
        yield model.SerializeToString()
        return
    tmpdir = tempfile.mkdtemp(prefix="bnref-onnx-")
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        path = os.path.join(tmpdir, "model.onnx")
        externalize_float_initializers(copy, "model.onnx.data")
        onnx.save_model(copy, path)
        logger.info("model is over the protobuf limit; onnxruntime loads it from %s", path)
        yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)


def externalize_float_initializers(model: onnx.ModelProto, location: str) -> None:
    """Mark every float initializer for external data in ``location`` (saved by onnx.save).

    Integer tensors stay inline: onnxruntime's shape inference must read shapes and axes.
    """
    for tensor in model.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES or external_data_helper.uses_external_data(
            tensor
        ):
            continue
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        external_data_helper.set_external_data(tensor, location)


def make_session(model: onnx.ModelProto, provider: str = "auto"):
    """Create an onnxruntime session; return ``(session, provider_used)``.

    ``auto`` uses CUDA when a session really gets ``CUDAExecutionProvider`` (checked with
    ``session.get_providers()``, since ``get_available_providers()`` only lists what is
    built), else CPU. ``cuda`` without a working CUDA is an error, never a silent fallback.
    """
    import onnxruntime as ort

    if provider not in ("auto", "cuda", "cpu"):
        raise ProviderError(f"unknown provider {provider!r}; expected auto, cuda or cpu")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Worker threads sleep between operators instead of spinning: the collection model is
    # many memory-bound operators, and spinning threads steal the cores others are using
    # (on a shared 2-core machine spinning made plain and rewritten runs alike slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    want_cuda = provider == "cuda" or (
        provider == "auto" and "CUDAExecutionProvider" in available
    )
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise ProviderError(
            "--provider cuda: this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (and not "
            "onnxruntime next to it: they share the import name)"
        )
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else [
        "CPUExecutionProvider"
    ]
    with model_source(model) as src:
        try:
            session = ort.InferenceSession(src, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load the model: {_short(exc)}") from exc
    used = session.get_providers()
    if want_cuda and "CUDAExecutionProvider" not in used:
        if provider == "cuda":
            raise ProviderError(
                "--provider cuda: onnxruntime could not start CUDA (driver, CUDA or cuDNN "
                "libraries missing?); use --provider cpu or auto"
            )
        logger.info("CUDA is built in but could not start; using CPU")
    name = "cuda" if "CUDAExecutionProvider" in used else "cpu"
    return session, name


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."


# Interrupts (SIGINT/SIGTERM through the CLI's handler) are deferred while a write is
# between renames that must land together; see ``interrupt``.
_hold_depth = 0
_pending_signal: int | None = None


def interrupt(signum: int) -> None:
    """Raise :class:`Interrupted` now, or, inside a critical section, as soon as it ends."""
    global _pending_signal
    if _hold_depth:
        _pending_signal = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A critical section: an ``interrupt`` arriving inside it is delivered on leaving it."""
    global _hold_depth, _pending_signal
    _hold_depth += 1
    try:
        yield
    finally:
        _hold_depth -= 1
        if not _hold_depth and _pending_signal is not None:
            signum, _pending_signal = _pending_signal, None
            raise Interrupted(signum)


def check_output(
    out: str | os.PathLike,
    *,
    what: str = "output",
    input_path: str | os.PathLike | None = None,
    in_place: bool = False,
) -> str:
    """Fail before any work when ``out`` cannot be written; return it as an absolute path.

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
        raise OutputError(f"{what} {out} is the input model; use --in-place (in_place=True) to overwrite it")
    return out


def write_model(
    model: onnx.ModelProto,
    out: str | os.PathLike,
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
    out = check_output(out, input_path=like.path if like is not None else None, in_place=in_place)
    target_dir = os.path.dirname(out)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".bnref-onnx-", dir=target_dir)
    except OSError as exc:
        raise OutputError(f"cannot write to {target_dir}: {exc.strerror or exc}") from exc
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        external = set(like.external) if like is not None else set()
        too_big = model_size(copy) > PROTOBUF_LIMIT
        location = None
        if external or too_big:
            location = os.path.basename(out) + ".data"
            if in_place and like is not None and len(like.locations) == 1:
                location = next(iter(like.locations))
            if os.sep in location or (os.altsep and os.altsep in location):
                location = os.path.basename(out) + ".data"
            for tensor in external_data_helper._get_all_tensors(copy):
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
            raise ModelError(f"the written model fails the onnx checker: {_short(exc)}") from exc
        if before_replace is not None:
            before_replace(out)
        # The data file and the model must land together: an interrupt between the two
        # renames would pair the old model with the new data file (--in-place). An interrupt
        # arriving here is delivered right after both.
        with _signals_held():
            if location is not None and os.path.exists(os.path.join(tmpdir, location)):
                os.replace(os.path.join(tmpdir, location), os.path.join(target_dir, location))
            try:
                os.replace(tmp_model, out)
            except OSError as exc:
                raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def atomic_write_bytes(data: bytes, out: str | os.PathLike) -> None:
    """Write bytes to ``out`` via a temporary file in the same folder and ``os.replace``."""
    out = check_output(out)
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
