"""Import what a corpus case needs, or skip it (fail instead under BNREF_REQUIRE_FRAMEWORKS=1).

torchvision from PyPI can be installed and still fail to import (a build for another torch
raises ``RuntimeError: operator torchvision::nms does not exist``), so any exception skips,
not only ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

#: Installed by ``make test-all``/``make test-corpus`` (the frameworks extra and the corpus
#: stamp): under BNREF_REQUIRE_FRAMEWORKS=1 their absence is an error, not a skip.
REQUIRED_IN_CI = ("torch", "torchvision", "rapidocr_onnxruntime")


def _missing(name: str, why: str):
    if os.environ.get("BNREF_REQUIRE_FRAMEWORKS") == "1" and name in REQUIRED_IN_CI:
        raise RuntimeError(f"BNREF_REQUIRE_FRAMEWORKS=1 but {name} is not usable: {why}")
    pytest.skip(f"{name} not usable: {why}", allow_module_level=True)


def module(name: str):
    """``import name`` or skip the calling module."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        _missing(name, f"{type(exc).__name__}: {exc}")


def package_dir(name: str) -> Path:
    """The folder of an installed package, *without* importing it (its own deps may be absent)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        _missing(name, "not installed")
    return Path(next(iter(spec.submodule_search_locations)))


#: The marks of a corpus module that runs torch: a live-framework test, quiet about the
#: deprecation and user warnings torch.onnx and torchvision print while exporting.
TORCH_MARKS = [
    pytest.mark.frameworks,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
