"""Helpers of the onnx_tools.data tests (test_data_*.py): model inputs, identifiable rows.

Expected values are computed in the tests with plain NumPy slicing (and, for images, from the
pixel arrays the test itself wrote), never through the loader's code.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_tools.data import BatchPlan, DataSource, InputSpec


def specs_of(text: str) -> list[InputSpec]:
    """Input specs of a model written in ONNX text; the body just passes its inputs on."""
    return InputSpec.from_model(onnx.parser.parse_model(text))


def one_input(dims: str = "N, 3, 4, 4", dtype: str = "float") -> list[InputSpec]:
    return specs_of(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g ({dtype}[{dims}] x) => ({dtype}[{dims}] y) {{ y = Identity(x) }}"""
    )


TWO_INPUTS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2] a, float[N, 3] b) => (float[N, 2] ya, float[N, 3] yb) {
    ya = Identity(a)
    yb = Identity(b)
}"""


def rows(n: int, shape=(3, 4, 4), dtype=np.float32) -> np.ndarray:
    """Sample k is filled with k + position/1000, so each row is identifiable by its first value."""
    size = int(np.prod(shape))
    base = np.arange(n, dtype=np.float64)[:, None] + np.arange(size)[None, :] / 1000.0
    return base.reshape((n, *shape)).astype(dtype)


def ids(feed_array: np.ndarray) -> list[int]:
    """Which rows of ``rows(...)`` a batch holds."""
    return [int(round(float(v))) for v in feed_array.reshape(len(feed_array), -1)[:, 0]]


def collect(source: DataSource, **kwargs) -> list[tuple[int, dict[str, np.ndarray]]]:
    """All batches of ``source`` under ``BatchPlan(**kwargs)``."""
    return list(source.batches(BatchPlan(**kwargs)))
