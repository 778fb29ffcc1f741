"""Compare two models (e.g. before and after recalibration) on the same data.

Both models run in inference mode over the same batches (a final partial batch included).
On their first outputs: the largest absolute difference and, for outputs with a class axis
(axis 1 of a rank >= 2 output), the share of samples whose top-1 class agrees; with labels,
each model's top-1 accuracy.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from onnx_tools.data import BatchPlan, ImageOptions, InputSpec, open_data
from onnx_tools.errors import DataError
from onnx_tools.modelio import LoadedModel, load_model
from onnx_tools.session import make_session


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare_models`; accuracy fields are None without labels."""

    num_samples: int
    output_a: str
    output_b: str
    max_abs_diff: float
    top1_agreement: float | None
    accuracy_a: float | None
    accuracy_b: float | None
    nonfinite_a: int = 0  # NaN/Inf values in each model's output (max_abs_diff is then NaN)
    nonfinite_b: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def format(self) -> str:
        """Lines for the terminal."""
        lines = [f"samples: {self.num_samples}", f"max |A - B|: {self.max_abs_diff:.6g}"]
        for name, bad in (("A", self.nonfinite_a), ("B", self.nonfinite_b)):
            if bad:
                lines.append(f"warning: model {name} produced {bad} NaN/Inf output value(s)")
        if self.top1_agreement is not None:
            lines.append(f"top-1 agreement: {self.top1_agreement:.2%}")
        if self.accuracy_a is not None:
            lines.append(f"accuracy A: {self.accuracy_a:.2%}")
            lines.append(f"accuracy B: {self.accuracy_b:.2%}")
        return "\n".join(lines)


def _load_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, str | os.PathLike):
        path = os.fspath(labels)
        if not os.path.isfile(path):
            raise DataError(f"labels file not found: {path}")
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read labels {path}: {exc}") from exc
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"labels must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr


def compare_models(
    model_a: str | os.PathLike | onnx.ModelProto | LoadedModel,
    model_b: str | os.PathLike | onnx.ModelProto | LoadedModel,
    data: Any,
    *,
    labels: Any = None,
    batch_size: int = 64,
    num_samples: int | None = None,
    provider: str = "auto",
    image_options: ImageOptions | None = None,
) -> Comparison:
    """Run both models over ``data`` and compare their first outputs (see module docstring)."""
    a, b = load_model(model_a), load_model(model_b)
    specs = InputSpec.from_model(a.model)
    specs_b = InputSpec.from_model(b.model)
    if [(s.name, s.dtype) for s in specs] != [(s.name, s.dtype) for s in specs_b]:
        raise DataError("the two models have different inputs; they cannot share data")
    sess_a, _ = make_session(a.model, provider)
    sess_b, _ = make_session(b.model, provider)
    out_a, out_b = sess_a.get_outputs()[0].name, sess_b.get_outputs()[0].name
    label_arr = _load_labels(labels) if labels is not None else None
    source = open_data(data, specs, image_options)
    n = 0
    max_diff = 0.0
    agree = 0
    correct_a = correct_b = 0
    nonfinite_a = nonfinite_b = 0
    has_classes = True
    plan = BatchPlan(batch_size=batch_size, num_samples=num_samples, keep_partial=True)
    for _index, feed in source.batches(plan):
        ya = sess_a.run([out_a], feed)[0]
        yb = sess_b.run([out_b], feed)[0]
        if ya.shape != yb.shape:
            raise DataError(f"outputs differ in shape: {ya.shape} vs {yb.shape}")
        rows = ya.shape[0] if ya.ndim else 1
        nonfinite_a += int(ya.size - np.count_nonzero(np.isfinite(ya)))
        nonfinite_b += int(yb.size - np.count_nonzero(np.isfinite(yb)))
        if ya.size:  # np.maximum propagates NaN: a broken output never reads as a match
            max_diff = float(np.maximum(max_diff, np.max(np.abs(ya.astype(np.float64) - yb))))
        if ya.ndim >= 2 and ya.shape[1] > 1:
            pa, pb = np.argmax(ya, axis=1), np.argmax(yb, axis=1)
            agree += int(np.sum(np.all((pa == pb).reshape(rows, -1), axis=1)))
            if label_arr is not None:
                if n + rows > label_arr.shape[0]:
                    raise DataError(
                        f"labels hold {label_arr.shape[0]} entries, the data has more samples"
                    )
                lab = label_arr[n:n + rows]
                correct_a += int(np.sum(pa.reshape(rows, -1)[:, 0] == lab))
                correct_b += int(np.sum(pb.reshape(rows, -1)[:, 0] == lab))
        else:
            has_classes = False
        n += rows
    if label_arr is not None and not has_classes:
        raise DataError("labels given, but the first output has no class axis")
    if label_arr is not None and label_arr.shape[0] != n:
        raise DataError(f"labels hold {label_arr.shape[0]} entries for {n} samples")
    return Comparison(
        num_samples=n,
        output_a=out_a,
        output_b=out_b,
        max_abs_diff=max_diff,
        top1_agreement=agree / n if has_classes and n else None,
        accuracy_a=correct_a / n if label_arr is not None else None,
        accuracy_b=correct_b / n if label_arr is not None else None,
        nonfinite_a=nonfinite_a,
        nonfinite_b=nonfinite_b,
    )
