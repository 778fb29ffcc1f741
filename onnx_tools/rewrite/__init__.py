"""Build the *collection model*: selected BNs normalize with their own batch statistics.

For each selected BN the rewrite inserts, before the (kept, inference-mode) BN node, the
staged two-pass reduction of its input to the batch mean and biased batch variance, feeds
those to the BN, and makes them (and ``Shape(X)``) the graph outputs, so only vectors of
length C leave the runtime. The formula is training-mode BN (eps inside the square root,
biased variance); it never uses ``training_mode=1``, which onnxruntime's CUDA provider refuses
from opset 14 and whose CPU kernel writes the running statistics into its (possibly shared)
inputs.

* :mod:`onnx_tools.rewrite.plan` — how each input is reduced: float32 stages of at most
  :data:`STAGE_LIMIT` values, or float64 where no staging bounds the error; the input types.
* :mod:`onnx_tools.rewrite.emit` — the nodes for one BN (mean, deviations, sum of squares
  by fused MatMul or ReduceSumSquare, float16 through float32).
* :mod:`onnx_tools.rewrite.model` — :func:`build_collection_model`: selection, checks, and
  splicing the nodes into a copy of the model, with an explicit BN -> outputs map.

The cost on onnxruntime's CPU provider (profiled): the statistics are three passes over X (a
ReduceMean, the Sub, the sum of squares); BatchNormalization is one more. Most of the
remaining gap to plain inference is not the statistics but the lost Conv+BN fold: with
run-time mean/var the BN cannot join the NCHWc convolution, so each BN input is reordered out
of and back into the blocked layout and Relu/Add run unfused. bfloat16 is refused
(onnxruntime's CPU build has no bfloat16 kernels).
"""

from onnx_tools.rewrite.model import (
    CollectionModel,
    StatOutputs,
    build_collection_model,
    select_batchnorms,
    upgrade_old_opset,
)
from onnx_tools.rewrite.plan import STAGE_LIMIT, ReductionPlan, plan_reduction

__all__ = [
    "STAGE_LIMIT",
    "CollectionModel",
    "ReductionPlan",
    "StatOutputs",
    "build_collection_model",
    "plan_reduction",
    "select_batchnorms",
    "upgrade_old_opset",
]
