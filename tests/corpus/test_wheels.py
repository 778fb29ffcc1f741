"""Models that PyPI wheels ship with un-folded BatchNormalization, against the interpreter.

The rapidocr-onnxruntime 1.4.4 wheel (Apache-2.0) ships three paddle2onnx exports of
PaddleOCR models: the text-direction classifier ``ch_ppocr_mobile_v2.0_cls_infer.onnx``
(opset 11, 35 BN, every weight and statistic a Constant node, batch ``dim_value -1``), and
the PP-OCRv4 detector (opset 12, 3 BN) and recognizer (opset 12, 6 BN, SVTR neck). Install
it with ``pip install --no-deps rapidocr-onnxruntime==1.4.4`` (``make test-corpus`` and
``make test-all`` do): only its model files are read, it is never imported (its own
dependencies, OpenCV and co., are not needed). Without it these cases skip.

Data: 2 batches of 8 random images (uniform in [-1, 1], the models' normalized input range)
at a small size each model accepts. Reference and tolerance as in ``test_dialects.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.corpus import needs
from tests.corpus.test_dialects import check_against_interpreter

MODELS = needs.package_dir("rapidocr_onnxruntime") / "models"

#: file -> (input height, width), marks
CASES = [
    pytest.param("ch_ppocr_mobile_v2.0_cls_infer.onnx", (48, 96), id="ppocr-cls"),
    pytest.param("ch_PP-OCRv4_det_infer.onnx", (64, 64), id="ppocrv4-det", marks=pytest.mark.corpus),
    pytest.param("ch_PP-OCRv4_rec_infer.onnx", (48, 96), id="ppocrv4-rec", marks=pytest.mark.corpus),
]


@pytest.mark.parametrize("name, size", CASES)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's Sigmoid
def test_shipped_paddle2onnx_model(name, size):
    model = onnx.load(MODELS / name)
    rng = np.random.default_rng(0)
    data = rng.uniform(-1, 1, size=(16, 3, *size)).astype(np.float32)
    check_against_interpreter(model, data)
