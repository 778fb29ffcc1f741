"""Live cross-framework conformance: the real frameworks against bnref on the same inputs.

Frameworks of the main environment (PyTorch, JAX/Flax, Keras on JAX, fvcore, ONNX,
onnxruntime) run in the test process: each module ``pytest.importorskip``s its framework. Those
that need environments of their own (TensorFlow and tf-keras 2, Keras 3 on TensorFlow and on
torch, PaddlePaddle, MXNet) run in worker processes (``remote``, ``worker``; adapters in
``adapters_tf``/``adapters_paddle``/``adapters_mxnet``, environments pinned in ``envs/``,
created by ``make test-reference``/``make test-all``) and are marked ``reference``. All tests
are marked ``frameworks``; the results feed ``docs/conformance.md`` (``scripts/make_conformance.py``).
"""
