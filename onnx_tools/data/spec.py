"""What the model expects of each input, and the checks every batch goes through.

:class:`InputSpec` is one graph input (name, dtype, declared shape). The rules here apply to
every kind of data:

Dtypes (:func:`cast_rule`): data whose float type differs from the input's is cast with a note
(float64 -> float32, float32 -> float16, ...); integer data is cast to a wider integer input
with a note; everything else (integers or booleans into a float input, floats into an integer
input, narrowing integer casts) is refused. Integer pixels belong in an image folder, which
scales and normalizes them.

Shapes (:func:`check_sample_shape`): every static dimension after the batch dimension must
match the model's declared input.

Values (:func:`check_finite`): every batch is checked for NaN/Inf before it is yielded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_tools.errors import DataError, ModelError
from onnx_tools.graph import tensor_dims

#: One declared dimension: static (``int``), named (``str``, a ``dim_param``) or unnamed.
Dim = int | str | None
#: What the model is fed: input name -> array with a leading batch dimension.
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One graph input of the model: its name, element dtype and declared shape.

    ``shape`` holds an ``int`` for a static dimension (a positive ``dim_value``) and a ``str``
    (``dim_param``) or ``None`` for a symbolic one (a ``dim_value <= 0``, as paddle2onnx writes
    ``-1``, is symbolic, as in onnxruntime; :func:`onnx_tools.graph.tensor_dims`); it is ``None`` as a whole when the model declares no rank. Dimension 0
    is the batch dimension.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def static_batch(self) -> int | None:
        """The batch size the model fixes, or ``None`` when dimension 0 is symbolic."""
        if self.shape and isinstance(self.shape[0], int):
            return self.shape[0]
        return None

    def describe_shape(self) -> str:
        """Return the declared shape as text, symbolic dimensions by name (``?`` if unnamed)."""
        if self.shape is None:
            return "(unknown rank)"
        dims = ["?" if d is None else str(d) for d in self.shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> list[InputSpec]:
        """Return the graph inputs that are not initializers (IR < 4 models list both)."""
        initializers = {t.name for t in model.graph.initializer}
        initializers |= {t.values.name for t in model.graph.sparse_initializer}
        return [cls._from_value(v) for v in model.graph.input if v.name not in initializers]

    @classmethod
    def _from_value(cls, value: onnx.ValueInfoProto) -> InputSpec:
        if value.type.WhichOneof("value") != "tensor_type":
            raise ModelError(
                f"graph input {value.name!r} is not a tensor "
                f"({value.type.WhichOneof('value')}); bnref-onnx feeds tensors only"
            )
        tensor = value.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        except (KeyError, ValueError) as exc:
            raise ModelError(
                f"graph input {value.name!r} has element type {tensor.elem_type}, "
                "which has no NumPy dtype"
            ) from exc
        dims = tensor_dims(value)  # a dim_value <= 0 (paddle2onnx's -1) is symbolic
        return cls(value.name, dtype, None if dims is None else tuple(dims))


def format_shape(shape: Sequence[int | str]) -> str:
    """Return a concrete shape as text, ``(2, 3)`` or ``(4,)``."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def cast_rule(data_dtype: np.dtype, spec: InputSpec) -> str | None:
    """Decide how data of ``data_dtype`` feeds ``spec``: ``None`` as is, else a note to cast.

    Raises :class:`DataError` for the casts that are refused (see the module docstring).
    """
    target = spec.dtype
    if data_dtype == target:
        return None
    note = f"cast {data_dtype} -> {target} for input {spec.name!r}"
    if data_dtype.kind == "f" and target.kind == "f":
        return note
    if data_dtype.kind in "iu" and target.kind in "iu" and np.can_cast(data_dtype, target, "safe"):
        return note
    hint = ""
    if data_dtype.kind in "iub" and target.kind == "f":
        hint = (
            "; integer data is not scaled or normalized here: convert it to the values the "
            "model expects, or pass a folder of images"
        )
    raise DataError(
        f"input {spec.name!r} expects {target}, got {data_dtype} data; "
        f"only float-to-float and widening integer casts are done{hint}"
    )


def check_sample_shape(
    spec: InputSpec, sample_shape: Sequence[int], got: Sequence[int | str]
) -> None:
    """Refuse data whose per-sample shape contradicts the model's declared static dims.

    ``sample_shape`` is one sample's shape (no batch dimension); ``got`` is the shape the
    error message shows (usually the whole array's).
    """
    if spec.shape is None:
        return
    declared = spec.shape[1:]
    ok = len(sample_shape) == len(declared) and all(
        not isinstance(d, int) or d == s for d, s in zip(declared, sample_shape, strict=False)
    )
    if not ok:
        raise DataError(
            f"input {spec.name!r}: expected shape {spec.describe_shape()} "
            f"(dimension 0 is the batch), got {format_shape(got)}"
        )


def check_finite(feed: Mapping[str, np.ndarray], index: int) -> None:
    """Raise :class:`DataError` naming batch ``index`` and the input if a value is NaN or Inf."""
    for name, array in feed.items():
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.inexact):
            continue
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            sample = int(np.argwhere(~finite)[0][0]) if array.ndim else 0
            raise DataError(
                f"batch {index}: input {name!r} contains {bad} NaN/Inf value(s) "
                f"(first in sample {sample} of the batch)"
            )
