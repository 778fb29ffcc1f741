"""What one run needs to know about a model, worked out once: its BNs and its fingerprint.

``collect``, ``apply_stats`` and ``recalibrate`` accept a path, a ``ModelProto``, a
:class:`~onnx_tools.modelio.LoadedModel` or a :class:`ModelAnalysis`; :func:`analyze_model`
turns any of them into the last, so a run that collects and applies loads the model, finds
its BatchNormalization nodes and fingerprints it once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

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

    _fingerprints: dict[frozenset[str], str] = field(default_factory=dict, init=False, repr=False)

    def statistics_storage(self, keys: Iterable[str]) -> frozenset[str]:
        """Tensors holding the running mean/var of the BNs ``keys`` that nothing else reads."""
        wanted = set(keys)
        return frozenset(
            src.storage
            for bn in self.batchnorms if bn.key in wanted
            for src in (bn.sources["mean"], bn.sources["var"])
            if src.writable and not src.shared
        )

    def fingerprint(self, keys: Iterable[str]) -> str:
        """Fingerprint for statistics of the BNs ``keys`` (computed once per selection).

        :func:`~onnx_tools.fingerprint.model_fingerprint` without the values of those BNs'
        own running mean/var, which collection never reads.
        """
        skip = self.statistics_storage(keys)
        if skip not in self._fingerprints:
            self._fingerprints[skip] = model_fingerprint(self.loaded.model, skip)
        return self._fingerprints[skip]


def analyze_model(model: ModelLike | ModelAnalysis) -> ModelAnalysis:
    """Load ``model`` (a ModelProto is copied, never modified) and find its BNs, once."""
    if isinstance(model, ModelAnalysis):
        return model
    loaded = load_model(model)
    return ModelAnalysis(loaded, find_batchnorms(loaded.model, loaded.base_dir))
