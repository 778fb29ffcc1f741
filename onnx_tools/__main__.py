"""``python -m onnx_tools``: the ``bnref-onnx`` command line."""

import sys

from onnx_tools.cli import main

sys.exit(main())
