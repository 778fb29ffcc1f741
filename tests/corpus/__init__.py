"""The exporter-dialect corpus (issue 13): real exporters' graphs, each checked independently.

* ``test_torchvision.py``: torchvision architectures exported by torch.onnx (TorchScript with
  ``training=PRESERVE``, dynamo with ``optimize=False``) against PyTorch's own train-mode
  statistics on the same batches (``torch_cases.py``).
* ``test_dialects.py``: paddle2onnx- and tf2onnx-shaped graphs built with onnx.helper
  (``dialects.py``) and real tf2onnx conversions (``data/``, ``make_tf2onnx.py``), against the
  fuzzer's node-by-node interpreter (``reference.py``).
* ``test_wheels.py``: the paddle2onnx-exported PP-OCR models that the rapidocr-onnxruntime
  wheel ships with un-folded BatchNormalization, against the same interpreter.
* ``test_keras_export.py``: Keras 3's own ONNX export writes BN as arithmetic (no BN node), and
  ``inspect`` says so.
* ``data/onnxsim_*.onnx`` (``make_onnxsim.py``): real onnxsim output, full and partial BN
  folds, read by ``tests/onnx_tools/test_unfold_dialects.py``.

A representative few run with the rest of the suite (``make test-all``, CI); the others carry
the ``corpus`` marker (``make test-corpus`` runs everything here). Without torchvision or the
wheel the cases that need them skip (``needs.py``).
"""
