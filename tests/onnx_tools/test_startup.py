"""Startup cost: what `bnref-onnx --help` and argument errors load (issue 14).

``import onnx`` alone costs ~1 s here with ml_dtypes 0.7 (its extension), so nothing on the
way to parsing the command line may import onnx or onnxruntime.
"""

from __future__ import annotations

import subprocess
import sys

import onnx_tools as ot
from tests.onnx_tools.helpers import ROOT


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_cli_parsing_imports_neither_onnx_nor_onnxruntime():
    loaded = _loaded_after(
        "from onnx_tools.cli import build_parser\n"
        "build_parser().parse_args(['recalibrate', 'm.onnx', '--data', 'd.npy', '-o', 'o.onnx'])"
    )
    assert "onnx" not in loaded and "onnxruntime" not in loaded


def test_public_names_resolve_lazily_to_the_right_objects():
    import onnx_tools.collection  # the submodule must not shadow the function of the same name

    assert callable(ot.collect) and ot.collect is onnx_tools.collection.collect
    assert ot.recalibrate.__module__ == "onnx_tools.pipeline"
    import importlib

    exports = ot._EXPORTS  # the table under test
    assert sorted(ot.__all__) == sorted(exports)  # __all__ is a literal copy: kept in step
    for name, module in exports.items():
        assert getattr(ot, name) is getattr(importlib.import_module(module), name), name
