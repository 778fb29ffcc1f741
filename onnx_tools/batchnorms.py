"""Find the BatchNormalization nodes of a model: attributes, channels and tensor storage.

:func:`find_batchnorms` returns one :class:`BatchNormInfo` per BN of the main graph, with each
of its scale, bias, mean and var resolved to a :class:`~onnx_tools.graph.TensorSource` and the
stored values read; :func:`batchnorms_in_subgraphs` names those inside control-flow bodies
(unsupported). :data:`EXPORT_ADVICE` says how to export a model with BN kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_tools.errors import ModelError
from onnx_tools.graph import GraphIndex, TensorSource, attribute, domain_opset, subgraphs

#: Index of each BatchNormalization input, by role.
ROLES = ("scale", "bias", "mean", "var")
ROLE_INDEX = {"scale": 1, "bias": 2, "mean": 3, "var": 4}
#: How to keep BN in an export; printed when a model has none.
EXPORT_ADVICE = (
    "it was probably folded into the preceding Conv/Gemm at export. Export with BN kept: "
    "torch.onnx.export(..., dynamo=False, training=torch.onnx.TrainingMode.PRESERVE) or "
    "do_constant_folding=False; the dynamo exporter with optimize=False; onnxsim with "
    "--skip-fuse-bn; tf2onnx without its conv-BN fusion optimizer (from_keras(..., "
    "optimizers=...) without remove_back_to_back). Keras 3's own ONNX export (every backend) "
    "writes BN as Mul/Add arithmetic, with nothing left to recalibrate"
)

@dataclass
class BatchNormInfo:
    """One BatchNormalization node of the main graph, as :func:`find_batchnorms` sees it."""

    index: int
    node_name: str
    input: str
    output: str
    opset: int
    epsilon: float
    momentum: float
    channels: int | None
    sources: dict[str, TensorSource]
    values: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)
    training_mode: bool = False
    extra_outputs: tuple[str, ...] = ()
    spatial: int = 1
    #: For a BN inside a model-local function: the call site (``index`` is its node index),
    #: role -> position of the call's input that feeds it, and where it is, for messages.
    call_inputs: dict[str, int] | None = None
    function: str | None = None

    def input_position(self, role: str) -> int:
        """Which input of node ``index`` feeds ``role`` (the call's input for a function BN)."""
        return self.call_inputs[role] if self.call_inputs else ROLE_INDEX[role]

    @property
    def key(self) -> str:
        """Stable identifier used in STATS files and reports: the BN's output tensor name."""
        return self.output

    @property
    def label(self) -> str:
        """Name for messages: the node name, else the output name."""
        return self.node_name or self.output

    def summary(self) -> dict[str, float | None]:
        """Summary of the stored statistics (None where they are not stored in the model)."""
        mean, var = self.values.get("mean"), self.values.get("var")
        out: dict[str, float | None] = {
            "mean_abs_mean": None,
            "var_min": None,
            "var_mean": None,
            "var_max": None,
        }
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf stored: no warning
            if mean is not None:
                out["mean_abs_mean"] = float(np.mean(np.abs(mean.astype(np.float64))))
            if var is not None:
                v = var.astype(np.float64)
                out.update(var_min=float(v.min()), var_mean=float(v.mean()),
                           var_max=float(v.max()))
        return out

    def to_dict(self) -> dict:
        """JSON-ready description (``inspect --json``)."""
        return {
            "node": self.node_name,
            "output": self.output,
            "input": self.input,
            "channels": self.channels,
            "epsilon": self.epsilon,
            "momentum": self.momentum,
            "opset": self.opset,
            "training_mode": self.training_mode,
            "function": self.function,
            "storage": {
                role: {
                    "kind": src.kind,
                    "tensor": src.name,
                    "storage": src.storage,
                    "identity_chain": len(src.chain),
                    "shared_with": list(src.shared_with),
                }
                for role, src in self.sources.items()
            },
            "stats": self.summary(),
        }

def _bn_in_subgraphs(graph: onnx.GraphProto, path: str = "") -> Iterator[str]:
    for node in graph.node:
        for sub in subgraphs(node):
            where = f"{path}{node.op_type} {node.name or '(unnamed)'} > "
            for inner in sub.node:
                if inner.op_type == "BatchNormalization" and inner.domain in ("", "ai.onnx"):
                    yield f"{where}{inner.name or inner.output[0]}"
            yield from _bn_in_subgraphs(sub, where)


def batchnorms_in_subgraphs(model: onnx.ModelProto) -> list[str]:
    """Names (with their If/Loop/Scan path) of BN nodes inside control-flow bodies."""
    return list(_bn_in_subgraphs(model.graph))


#: What to do about a BN inside a model-local function that cannot be recalibrated.
FUNCTION_ADVICE = (
    "inline the functions first (onnx.inliner.inline_local_functions(model), then save it) "
    "or export without torch.onnx's export_modules_as_functions"
)


def check_supported(model: onnx.ModelProto) -> None:
    """Refuse a model with BN inside control-flow bodies (not recalibrated).

    Refused as a whole, not just those BNs: recalibrating the others would leave a model
    whose BNs disagree on the data they were calibrated on, with nothing said. (BN inside
    model-local functions: :mod:`onnx_tools.functions`.)
    """
    nested = batchnorms_in_subgraphs(model)
    if nested:
        raise ModelError("BatchNormalization inside a control-flow body is not supported: "
                         + "; ".join(nested[:5]) + (" ..." if len(nested) > 5 else ""))


def _channels(index: GraphIndex, node: onnx.NodeProto, values: dict) -> int | None:
    for role in ROLES:
        v = values.get(role)
        if v is not None and v.ndim == 1:
            return int(v.shape[0])
    for tensor_name in node.input[1:5]:
        init = index.initializers.get(tensor_name)
        if init is not None and len(init.dims) == 1:
            return int(init.dims[0])
    return None

def find_batchnorms(model: onnx.ModelProto, base_dir: str | None = None) -> list[BatchNormInfo]:
    """All BatchNormalization nodes of the main graph, in node order, with their sources."""
    opset = domain_opset(model)
    index = GraphIndex(model)
    found: list[BatchNormInfo] = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 5 or not all(node.input[:5]):
            raise ModelError(f"BatchNormalization {node.name or i!r} does not have 5 inputs")
        sources = {role: index.resolve(i, ROLE_INDEX[role]) for role in ROLES}
        values = {role: index.value(src, base_dir) for role, src in sources.items()}
        training = bool(attribute(node, "training_mode", 0))
        if opset < 7:
            training = not bool(attribute(node, "is_test", 0))
        extra = tuple(o for o in node.output[1:] if o)
        found.append(
            BatchNormInfo(
                index=i,
                node_name=node.name,
                input=node.input[0],
                output=node.output[0],
                opset=opset,
                epsilon=float(attribute(node, "epsilon", 1e-5)),
                momentum=float(attribute(node, "momentum", 0.9)),
                channels=_channels(index, node, values),
                sources=sources,
                values=values,
                training_mode=training,
                extra_outputs=extra,
                spatial=int(attribute(node, "spatial", 1)),
            )
        )
    return found
