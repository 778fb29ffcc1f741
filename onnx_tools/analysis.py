"""What one run needs to know about a model, worked out once: its BNs and its fingerprint.

``collect``, ``apply_stats`` and ``recalibrate`` accept a path, a ``ModelProto``, a
:class:`~onnx_tools.modelio.LoadedModel` or a :class:`ModelAnalysis`; :func:`analyze_model`
turns any of them into the last, so a run that collects and applies loads the model, finds
its BatchNormalization nodes and fingerprints it once.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import onnx

from onnx_tools.batchnorms import BatchNormInfo, find_batchnorms
from onnx_tools.fingerprint import model_fingerprint
from onnx_tools.modelio import LoadedModel, load_model

#: Everything the API accepts as a model.
ModelLike = str | os.PathLike | onnx.ModelProto | LoadedModel


@dataclass
class ModelAnalysis:
    """A loaded model with its BatchNormalization nodes (node order) and fingerprint.

    The analysis describes ``loaded.model`` as it is; it is not updated if that is changed.
    """

    loaded: LoadedModel
    batchnorms: list[BatchNormInfo]

    @property
    def model(self) -> onnx.ModelProto:
        """The model itself (all tensor data in memory)."""
        return self.loaded.model

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`~onnx_tools.fingerprint.model_fingerprint` of the model, computed once."""
        return model_fingerprint(self.loaded.model)


def analyze_model(model: ModelLike | ModelAnalysis) -> ModelAnalysis:
    """Load ``model`` (a ModelProto is copied, never modified) and find its BNs, once."""
    if isinstance(model, ModelAnalysis):
        return model
    loaded = load_model(model)
    return ModelAnalysis(loaded, find_batchnorms(loaded.model, loaded.base_dir))
