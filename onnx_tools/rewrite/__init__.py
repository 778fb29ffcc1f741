"""Build the *collection model*: selected BNs normalize with their own batch statistics.

Each selected BN computes its input's batch mean and biased batch variance, normalizes with
them (training-mode BN: eps inside the square root, biased variance), and the two (and
``Shape(X)``) become graph outputs, so only vectors of length C leave the runtime. Two routes:

* *training kernel* (onnxruntime's CPU provider only): the BN node becomes onnxruntime's own
  training-mode BatchNormalization with ``momentum=0``, so its running outputs are the batch
  statistics. Its mean/var inputs are fresh graph inputs fed zeros, never the model's tensors
  (which may hold NaN after a diverged run; the kernel also declares its running outputs
  aliases of them, and onnxruntime merges equal initializers). Used for BN inputs of at most 2^20 values per batch (it runs
  on one thread; larger inputs go faster on the primitive route's threads) where its float32
  sums are as exact as the primitive route's (:func:`~onnx_tools.rewrite.plan.training_kernel_fits`).
* *primitive operators* (every provider; CUDA refuses ``training_mode=1`` from opset 14):
  before the kept, inference-mode BN, the staged two-pass reduction of its input, float32
  within a sample and float64 over the first axis.

* :mod:`onnx_tools.rewrite.plan` — which route fits, and how each input is reduced on the
  primitive route: float32 stages of at most :data:`STAGE_LIMIT` values, or float64 where no
  staging bounds the error; the input types.
* :mod:`onnx_tools.rewrite.emit` — the nodes for one BN (the training kernel; or mean,
  deviations, sum of squares by fused MatMul or ReduceSumSquare, float16 through float32).
* :mod:`onnx_tools.rewrite.model` — :func:`build_collection_model`: selection, checks, and
  splicing the nodes into a copy of the model, with an explicit BN -> outputs map.

The cost on onnxruntime's CPU provider (profiled, ``benchmarks/bench_graph.py``): on the
primitive route the statistics are three passes over X (a ReduceMean, the Sub, the sum of
squares) and about ten nodes per BN; BatchNormalization is one more pass. The training kernel
does the same passes in one node. What remains of the gap to plain inference is the lost
Conv+BN fold: with batch statistics the BN cannot join the NCHWc convolution, so each BN input
is reordered out of and back into the blocked layout and Relu/Add run unfused. bfloat16 is
refused (onnxruntime's CPU build has no bfloat16 kernels).
"""

from onnx_tools.rewrite.model import (
    PRIMITIVE,
    TRAINING_KERNEL,
    CollectionModel,
    StatOutputs,
    build_collection_model,
    select_batchnorms,
    upgrade_old_opset,
)
from onnx_tools.rewrite.plan import (
    STAGE_LIMIT,
    ReductionPlan,
    plan_reduction,
    training_kernel_fits,
)

__all__ = [
    "PRIMITIVE",
    "STAGE_LIMIT",
    "TRAINING_KERNEL",
    "CollectionModel",
    "ReductionPlan",
    "StatOutputs",
    "build_collection_model",
    "plan_reduction",
    "select_batchnorms",
    "training_kernel_fits",
    "upgrade_old_opset",
]
