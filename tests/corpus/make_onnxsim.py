"""Regenerate ``data/onnxsim_*.onnx``: real onnxsim output of the unfold dialect tests' CNN.

Not a test (needs ``onnxsim``, which the project does not install)::

    python -m venv /tmp/sim && /tmp/sim/bin/pip install onnxsim onnxruntime numpy
    PYTHONPATH=. /tmp/sim/bin/python tests/corpus/make_onnxsim.py

``onnxsim_kept.onnx`` is :func:`tests.onnx_tools.unfold_twins.cnn` with non-trivial
statistics (BN-kept: Conv with and without bias, grouped, depthwise, grouped ConvTranspose).
``onnxsim_fold.onnx`` is onnxsim 0.8.1's output for it (every BN folded into its layer);
``onnxsim_muladd.onnx`` its output for the same model with each BN written as Mul then Add
(onnxsim folds the Mul into a Conv and leaves the Add: a partial fold).
``tests/onnx_tools/test_unfold_dialects.py`` checks that its own folds match these.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxsim

from tests.onnx_tools.unfold_twins import cnn, fold

HERE = Path(__file__).resolve().parent / "data"


def kept() -> onnx.ModelProto:
    """The CNN with statistics a fold must use (not zeros and ones)."""
    model = cnn()
    rng = np.random.default_rng(3)
    for t in model.graph.initializer:
        if t.name[0] in "mv" and len(t.dims) == 1:
            value = rng.normal(size=t.dims) if t.name[0] == "m" else rng.uniform(0.5, 2, t.dims)
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), t.name))
    return model


def main() -> None:
    k = kept()
    onnx.save(k, HERE / "onnxsim_kept.onnx")
    for name, model in (("fold", k), ("muladd", fold(k, "muladd")[0])):
        simplified, ok = onnxsim.simplify(model)
        assert ok
        simplified.producer_name, simplified.producer_version = "onnxsim", onnxsim.__version__
        onnx.save(simplified, HERE / f"onnxsim_{name}.onnx")
        print(name, [n.op_type for n in simplified.graph.node])


if __name__ == "__main__":
    main()
