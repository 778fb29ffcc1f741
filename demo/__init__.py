"""Real-data demonstration and experiments for Precise BatchNorm (``make demo``, ``make experiment``).

* ``demo.data``        — digits shipped inside wheels, a held-out split, deployment shifts.
* ``demo.model``       — a NumPy MLP with BatchNorm trained with bnref's forward and backward.
* ``demo.export``      — the trained net as an ONNX model (Gemm + BatchNormalization + Relu).
* ``demo.experiments`` — every table and plot under ``docs/experiments/``, one module per experiment.
* ``demo.run_demo``    — the ``make demo`` story: recalibrate under a deployment shift.
* ``demo.convnet``     — a NumPy conv net with BatchNorm (im2col), trained the same way; ``fold``.
* ``demo.conv_export`` — the conv net as ONNX, BN kept or folded into the convolutions.
* ``demo.conv_unfold`` — a NumPy reference of ``bnref-onnx unfold`` (exact by depth).
* ``demo.run_demo_folded`` — ``make demo-folded``: a folded model, ``inspect``, ``recalibrate --source``.
"""

import os

# Tiny matrix products are up to ~15x slower with two competing OpenBLAS threads on a 2-core
# machine; one thread is as fast for the big ones. Only effective before NumPy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
