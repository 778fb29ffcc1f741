"""Fixtures for the bnref-onnx tests (helpers live in ``helpers.py``)."""

from __future__ import annotations

import pytest

from tests.onnx_tools.helpers import write_cnn_files


@pytest.fixture
def cnn_files(tmp_path):
    """A CNN model file and a calibration .npy in tmp_path."""
    return write_cnn_files(tmp_path)
