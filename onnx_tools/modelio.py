"""Load ONNX models (external data resolved) and serialize them for onnxruntime.

Models over the 2 GB protobuf limit cannot be one serialized message: :func:`model_source`
hands onnxruntime a temporary path with external data instead. Writing models and files
atomically lives in :mod:`onnx_tools.outputs`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from onnx_tools.errors import ModelError

logger = logging.getLogger(__name__)

#: A ModelProto larger than this cannot be serialized to one protobuf; such models go to
#: onnxruntime and the checker by path. Module-level so tests can lower it.
PROTOBUF_LIMIT = 2**31 - 1

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
    for tensor in all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            external.add(tensor.name)
            info = external_data_helper.ExternalDataInfo(tensor)
            locations.add(info.location)
    if external:
        try:
            external_data_helper.load_external_data_for_model(proto, base_dir)
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            # onnx refuses a data file outside the model's folder, or one with hard links
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


def all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of the model: initializers and tensor attributes, subgraphs included."""
    return list(external_data_helper._get_all_tensors(model))  # onnx has no public iterator
