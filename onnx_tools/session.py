"""onnxruntime sessions: the provider asked for, and the one a session really runs on."""

from __future__ import annotations

import logging

import onnx

from onnx_tools import modelio
from onnx_tools.errors import ModelError, ProviderError, short_message
from onnx_tools.options import PROVIDERS, setting

logger = logging.getLogger(__name__)


def runnable_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose graph inputs declare no dimension as ``dim_value <= 0``.

    Converters (paddle2onnx and others) write dynamic dimensions as ``dim_value: -1`` or
    ``0``; bnref-onnx reads both as dynamic, and onnxruntime accepts -1 but takes 0 as a real
    size ("Got invalid dimensions ... Expected: 0"). Such dimensions become unnamed dynamic
    ones, so the model runs as its converter meant it. The caller's model is not changed.
    """
    def bad(vi: onnx.ValueInfoProto) -> bool:
        tt = vi.type.tensor_type
        return tt.HasField("shape") and any(
            d.HasField("dim_value") and d.dim_value <= 0 for d in tt.shape.dim)

    if not any(bad(vi) for vi in (*model.graph.input, *model.graph.output)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in (*copy.graph.input, *copy.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value <= 0:
                    d.ClearField("dim_value")
    return copy


def cpu_only(provider: str = "auto") -> bool:
    """Whether a session for ``provider`` runs on onnxruntime's CPU provider alone.

    True for ``cpu``, and for ``auto`` when this onnxruntime build has no CUDA provider. (With
    CUDA built in, ``auto`` may still end up on the CPU when CUDA cannot start; that is only
    known once a session exists.)
    """
    if provider == "cpu":
        return True
    if provider != "auto":
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" not in ort.get_available_providers()


def make_session(model: onnx.ModelProto, provider: str = "auto"):
    """Create an onnxruntime session; return ``(session, provider_used)``.

    ``auto`` uses CUDA when a session really gets ``CUDAExecutionProvider`` (checked with
    ``session.get_providers()``, since ``get_available_providers()`` only lists what is
    built), else CPU. ``cuda`` without a working CUDA is an error, never a silent fallback.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; expected auto, cuda or cpu")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Worker threads sleep between operators instead of spinning: the collection model is
    # many memory-bound operators, and spinning threads steal the cores others are using
    # (on a shared 2-core machine spinning made plain and rewritten runs alike slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    want_cuda = provider == "cuda" or (
        provider == "auto" and "CUDAExecutionProvider" in available
    )
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise ProviderError(
            f"{setting('provider', 'cuda')}: this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (and not "
            "onnxruntime next to it: they share the import name)"
        )
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else [
        "CPUExecutionProvider"
    ]
    with modelio.model_source(runnable_inputs(model)) as src:
        try:
            session = ort.InferenceSession(src, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load the model: {short_message(exc)}") from exc
    used = session.get_providers()
    if want_cuda and "CUDAExecutionProvider" not in used:
        if provider == "cuda":
            raise ProviderError(
                f"{setting('provider', 'cuda')}: onnxruntime could not start CUDA (driver, CUDA "
                f"or cuDNN libraries missing?); use {setting('provider', 'cpu')} or "
                f"{setting('provider', 'auto')}"
            )
        logger.info("CUDA is built in but could not start; using CPU")
    name = "cuda" if "CUDAExecutionProvider" in used else "cpu"
    return session, name
