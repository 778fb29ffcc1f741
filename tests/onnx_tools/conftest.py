"""Fixtures for the bnref-onnx tests (helpers live in ``helpers.py``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.onnx_tools.helpers import cnn_data, cnn_model


@pytest.fixture
def cnn_files(tmp_path):
    """A CNN model file and a calibration .npy in tmp_path."""
    model_path = tmp_path / "model.onnx"
    onnx.save(cnn_model(), model_path)
    data_path = tmp_path / "calib.npy"
    np.save(data_path, cnn_data())
    return model_path, data_path
