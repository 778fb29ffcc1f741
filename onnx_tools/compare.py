"""Compare two models (e.g. before and after recalibration) on the same data.

Both models run in inference mode over the same batches (a final partial batch included),
and *every* output is compared: outputs are paired by name when both models have the same
output names, else by position (same number of outputs required). For each pair: the
largest absolute difference and the NaN/Inf counts; for classifier outputs, shape
``(N, K)`` with ``K > 1``, the share of samples whose top-1 class agrees and, with labels,
each model's top-1 accuracy. Any other output (a feature map, a box tensor) gets no top-1:
an argmax over its axis 1 would mean nothing. With ``num_samples=n`` the first ``n``
samples are compared, and the first ``n`` labels are used.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnx_tools.analysis import ModelLike
from onnx_tools.collection import run_batch
from onnx_tools.data import BatchPlan, ImageOptions, InputSpec, open_data
from onnx_tools.errors import DataError, ModelError, short_message
from onnx_tools.modelio import load_model
from onnx_tools.options import arg, checked
from onnx_tools.session import make_session


@dataclass
class OutputComparison:
    """One output pair: the difference, NaN/Inf counts, and top-1 figures for classifiers."""

    output_a: str
    output_b: str
    shape: list[int | None] = field(default_factory=list)  # of the last batch, batch dim None
    max_abs_diff: float = 0.0
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    classifier: bool = False
    top1_agreement: float | None = None
    accuracy_a: float | None = None
    accuracy_b: float | None = None
    _agree: int = field(default=0, repr=False)
    _correct: list[int] = field(default_factory=lambda: [0, 0], repr=False)


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare_models`: every output pair, and the headline figures.

    ``max_abs_diff`` and the NaN/Inf counts are over all outputs; ``top1_agreement`` and
    the accuracies are those of the first classifier output (None if there is none, or
    without labels).
    """

    num_samples: int
    outputs: list[OutputComparison]

    def _first_classifier(self) -> OutputComparison | None:
        return next((o for o in self.outputs if o.classifier), None)

    @property
    def max_abs_diff(self) -> float:
        """Largest ``|A - B|`` over every output (NaN if any output had NaN/Inf)."""
        return float(max((o.max_abs_diff for o in self.outputs), default=0.0,
                         key=lambda v: np.inf if np.isnan(v) else v))

    @property
    def nonfinite_a(self) -> int:
        """NaN/Inf values in model A's outputs."""
        return sum(o.nonfinite_a for o in self.outputs)

    @property
    def nonfinite_b(self) -> int:
        """NaN/Inf values in model B's outputs."""
        return sum(o.nonfinite_b for o in self.outputs)

    @property
    def top1_agreement(self) -> float | None:
        """Top-1 agreement of the first classifier output."""
        first = self._first_classifier()
        return first.top1_agreement if first else None

    @property
    def accuracy_a(self) -> float | None:
        """Model A's top-1 accuracy on the first classifier output (with labels)."""
        first = self._first_classifier()
        return first.accuracy_a if first else None

    @property
    def accuracy_b(self) -> float | None:
        """Model B's top-1 accuracy on the first classifier output (with labels)."""
        first = self._first_classifier()
        return first.accuracy_b if first else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the headline figures and one entry per output."""
        outputs = [{k: v for k, v in asdict(o).items() if not k.startswith("_")}
                   for o in self.outputs]
        return {"num_samples": self.num_samples, "max_abs_diff": self.max_abs_diff,
                "top1_agreement": self.top1_agreement, "accuracy_a": self.accuracy_a,
                "accuracy_b": self.accuracy_b, "nonfinite_a": self.nonfinite_a,
                "nonfinite_b": self.nonfinite_b, "outputs": outputs}

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
        if len(self.outputs) > 1:
            for o in self.outputs:
                top1 = f", top-1 agreement {o.top1_agreement:.2%}" if o.classifier else ""
                lines.append(f"  output {o.output_a}: max |A - B| {o.max_abs_diff:.6g}{top1}")
        return "\n".join(lines)


def _read_labels(path: str) -> np.ndarray:
    """A ``.npy`` file, or a ``.npz`` archive holding exactly one array."""
    if not os.path.isfile(path):
        raise DataError(f"{arg('labels')} file not found: {path}")
    try:
        with contextlib.ExitStack() as stack:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                stack.callback(loaded.close)
                if len(loaded.files) != 1:
                    raise DataError(
                        f"{arg('labels')} {path} is an .npz archive of {len(loaded.files)} "
                        f"arrays ({', '.join(loaded.files[:5])}); give a .npy file, or an "
                        ".npz holding only the labels")
                loaded = loaded[loaded.files[0]]
            return loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {arg('labels')} {path}: {short_message(exc)}") from exc


def _load_labels(labels: Any) -> np.ndarray:
    where = ""
    if isinstance(labels, str | os.PathLike):
        where = f" ({os.fspath(labels)})"
        labels = _read_labels(os.fspath(labels))
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"{arg('labels')} must be a 1-D array of integer class labels, got "
                        f"{arr.ndim}-D {arr.dtype} of shape {arr.shape}{where}")
    return arr


def _pair_outputs(sess_a: Any, sess_b: Any) -> list[OutputComparison]:
    names_a = [o.name for o in sess_a.get_outputs()]
    names_b = [o.name for o in sess_b.get_outputs()]
    if sorted(names_a) == sorted(names_b):
        return [OutputComparison(n, n) for n in names_a]
    if len(names_a) != len(names_b):
        raise ModelError(
            f"the models have different outputs ({', '.join(names_a)} vs {', '.join(names_b)}); "
            "they cannot be compared"
        )
    return [OutputComparison(a, b) for a, b in zip(names_a, names_b, strict=True)]


def _check_inputs(specs_a: list[InputSpec], specs_b: list[InputSpec]) -> None:
    def describe(specs: list[InputSpec]) -> str:
        return ", ".join(f"{s.name} {s.dtype} {s.describe_shape()}" for s in specs)

    if [(s.name, s.dtype) for s in specs_a] != [(s.name, s.dtype) for s in specs_b]:
        raise DataError(
            f"the two models have different inputs ({describe(specs_a)} vs "
            f"{describe(specs_b)}); they cannot share data"
        )
    for a, b in zip(specs_a, specs_b, strict=True):
        if a.shape is None or b.shape is None:
            continue
        clash = len(a.shape) != len(b.shape) or any(
            isinstance(x, int) and isinstance(y, int) and x != y
            or isinstance(x, int) != isinstance(y, int) and i == 0  # one static batch
            for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)))
        if clash:
            raise DataError(
                f"input {a.name!r} has shape {a.describe_shape()} in model A and "
                f"{b.describe_shape()} in model B (rank, batch or size differ); the same "
                "batches cannot feed both"
            )


def _update(o: OutputComparison, ya: np.ndarray, yb: np.ndarray, lab: np.ndarray | None) -> None:
    """Add one batch of one output pair."""
    if ya.shape != yb.shape:
        raise DataError(f"output {o.output_a!r}: shapes differ: {ya.shape} vs {yb.shape}")
    o.shape = [None, *ya.shape[1:]] if ya.ndim else []
    o.nonfinite_a += int(ya.size - np.count_nonzero(np.isfinite(ya)))
    o.nonfinite_b += int(yb.size - np.count_nonzero(np.isfinite(yb)))
    if ya.size:  # np.maximum propagates NaN: a broken output never reads as a match
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, counted above
            o.max_abs_diff = float(np.maximum(o.max_abs_diff,
                                              np.max(np.abs(ya.astype(np.float64) - yb))))
    o.classifier = ya.ndim == 2 and ya.shape[1] > 1
    if o.classifier:
        pa, pb = np.argmax(ya, axis=1), np.argmax(yb, axis=1)
        o._agree += int(np.sum(pa == pb))
        if lab is not None:
            o._correct[0] += int(np.sum(pa == lab))
            o._correct[1] += int(np.sum(pb == lab))


def _finish(o: OutputComparison, n: int, labelled: bool) -> None:
    if o.classifier and n:
        o.top1_agreement = o._agree / n
        if labelled:
            o.accuracy_a, o.accuracy_b = o._correct[0] / n, o._correct[1] / n


@checked()
def compare_models(
    model_a: ModelLike,
    model_b: ModelLike,
    data: Any,
    *,
    labels: Any = None,
    batch_size: int = 64,
    num_samples: int | None = None,
    provider: str = "auto",
    image_options: ImageOptions | None = None,
) -> Comparison:
    """Run both models over ``data`` and compare every output (see the module docstring)."""
    a, b = load_model(model_a), load_model(model_b)
    specs = InputSpec.from_model(a.model)
    _check_inputs(specs, InputSpec.from_model(b.model))
    label_arr = _load_labels(labels) if labels is not None else None
    source = open_data(data, specs, image_options)
    plan = BatchPlan(batch_size=batch_size, num_samples=num_samples, keep_partial=True)
    sess_a, _ = make_session(a.model, provider)
    sess_b, _ = make_session(b.model, provider)
    pairs = _pair_outputs(sess_a, sess_b)
    n = 0
    for index, feed in source.batches(plan):
        ya_all = list(run_batch(sess_a, [o.output_a for o in pairs], feed, index,
                                "model A").values())
        yb_all = list(run_batch(sess_b, [o.output_b for o in pairs], feed, index,
                                "model B").values())
        rows = len(next(iter(feed.values())))
        lab = None
        if label_arr is not None:
            if n + rows > label_arr.shape[0]:
                raise DataError(f"labels hold {label_arr.shape[0]} entries, the data has more samples")
            lab = label_arr[n:n + rows]
        for o, ya, yb in zip(pairs, ya_all, yb_all, strict=True):
            _update(o, ya, yb, lab)
        n += rows
    if label_arr is not None:
        if not any(o.classifier for o in pairs):
            raise DataError("labels given, but no output has the shape (N, classes) of a classifier")
        if num_samples is None and label_arr.shape[0] != n:
            raise DataError(f"labels hold {label_arr.shape[0]} entries for {n} samples")
    for o in pairs:
        _finish(o, n, label_arr is not None)
    return Comparison(num_samples=n, outputs=pairs)
