"""Write collected statistics into a model's BatchNormalization mean/var tensors.

What is written, per BN (float64 aggregation, cast to the dtype the model stored):

``population``
    the pooled mean and the pooled *biased* variance of every value seen (fvcore's
    ``update_bn_stats``, the paper's Sec. 3.2); ``bessel=True`` multiplies it by
    ``n / (n - 1)``, n the values per channel.
``mean_of_variances``
    the equal-weight-per-batch mean of batch means and of *unbiased* batch variances
    (``torch.optim.swa_utils.update_bn``, pycls, mmpretrain).

``prior_strength=N0`` blends the stored and new statistics as Schneider et al. (2020) do:
``N0/(N0+n) * old + n/(N0+n) * new`` for means and variances, n the number of samples.

The only changes to the model are these values, the new tensors that un-sharing needs (a
tensor anything else reads, e.g. a TorchScript ``running_var = Identity(weight)`` alias, is
never written: the BN gets its own new initializer, or a new Constant node under IR < 4), and
provenance in ``metadata_props``. Nodes, their order and names, other tensors, graph
inputs/outputs and opsets are untouched.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

import bnref
from onnx_tools.analysis import ModelAnalysis, ModelLike, analyze_model
from onnx_tools.batchnorms import BatchNormInfo, check_supported
from onnx_tools.errors import ModelError, StatsError
from onnx_tools.graph import TensorSource, UniqueNamer
from onnx_tools.modelio import LoadedModel
from onnx_tools.options import arg, check_estimator, check_prior_strength, checked
from onnx_tools.report import DriftReport, bn_drift
from onnx_tools.stats import CollectedStats, load_stats

logger = logging.getLogger(__name__)

METADATA_PREFIX = "bnref."


@dataclass
class ApplyResult:
    """The new model, its drift report, and what changed.

    ``written`` lists tensors whose values were replaced in place; ``added`` the new tensors
    created to un-share; ``loaded`` describes how the input was stored (for writing it back).
    """

    model: onnx.ModelProto
    report: DriftReport
    written: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    loaded: LoadedModel | None = None


def _set_constant(node: onnx.NodeProto, value: np.ndarray) -> None:
    """Replace a Constant node's value, keeping its attribute kind, dtype and shape."""
    for attr in node.attribute:
        if attr.name == "value":
            old = attr.t
            new = numpy_helper.from_array(
                value.astype(helper.tensor_dtype_to_np_dtype(old.data_type)).reshape(
                    tuple(old.dims)
                ),
                old.name,
            )
            attr.t.CopyFrom(new)
            return
        if attr.name == "value_floats":
            del attr.floats[:]
            attr.floats.extend(float(v) for v in value.ravel())
            return
        if attr.name == "value_float":
            attr.f = float(value.ravel()[0])
            return
    raise ModelError(f"Constant node {node.name!r} has no value attribute")


def _write(
    model: onnx.ModelProto,
    bn: BatchNormInfo,
    role: str,
    value: np.ndarray,
    namer: UniqueNamer,
    inserts: dict[int, list[onnx.NodeProto]],
    initializers: dict[str, onnx.TensorProto],
) -> tuple[str | None, str | None]:
    """Write ``value`` as ``role`` of ``bn``; return ``(written_name, added_name)``."""
    src: TensorSource = bn.sources[role]
    old = bn.values.get(role)
    if not src.writable or old is None:
        raise ModelError(
            f"the {role} of BatchNormalization {bn.label!r} is {src.kind} at run time "
            f"({src.storage!r}), not stored in the model: nothing to write it into"
        )
    value = np.asarray(value)
    if not np.all(np.isfinite(value)):  # the last gate: no NaN/Inf is ever written
        raise ModelError(
            f"the new {role} of BatchNormalization {bn.label!r} holds "
            f"{int(np.count_nonzero(~np.isfinite(value)))} non-finite value(s); nothing written"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        new = value.astype(old.dtype).reshape(old.shape)
    if np.issubdtype(old.dtype, np.floating) and not np.all(np.isfinite(new)):
        # float16 statistics overflow at 65504: writing inf would silently break the model.
        raise ModelError(
            f"the new {role} of BatchNormalization {bn.label!r} does not fit in the model's "
            f"{old.dtype} (max |value| {float(np.max(np.abs(value))):.4g} > "
            f"{float(np.finfo(old.dtype).max):.4g}); nothing written"
        )
    graph = model.graph
    if not src.shared:
        if src.kind == "constant":
            assert src.constant_node is not None
            _set_constant(graph.node[src.constant_node], new)
        else:
            initializers[src.storage].CopyFrom(numpy_helper.from_array(new, src.storage))
        return src.storage, None
    # Shared: never change what another reader sees; give this BN its own tensor.
    node = graph.node[bn.index]
    name = namer(f"{bn.node_name or bn.output}.bnref_{role}")
    if model.ir_version < 4:
        # IR < 4 lists every initializer as a graph input; a Constant keeps the inputs as they are.
        const = helper.make_node(
            "Constant", [], [name], name=namer(f"{name}_constant"),
            value=numpy_helper.from_array(new, name),
        )
        inserts.setdefault(bn.index, []).append(const)
    else:
        graph.initializer.append(numpy_helper.from_array(new, name))
    node.input[bn.input_position(role)] = name  # the BN, or the call site of its function
    return None, name


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set ``metadata_props`` entries (replacing those with the same key)."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def _check_applicable(analysis: ModelAnalysis, stats: CollectedStats) -> None:
    if not stats.complete:
        raise StatsError(
            f"the STATS file holds shards {stats.shards} of {stats.num_shards}; merge all "
            "shards first (bnref-onnx merge)"
        )
    if analysis.fingerprint(stats.bns) != stats.model_fingerprint:
        raise StatsError(
            "the STATS file was collected on another model (model fingerprints differ: "
            "another graph, other weights or constants, or other input shapes); collect "
            "statistics on this model"
        )


def _blend(bn: BatchNormInfo, new_mean: np.ndarray, new_var: np.ndarray, n: int,
           prior_strength: float, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The prior blended in, but only on channels whose stored statistics can be a prior.

    A channel whose stored mean or variance is NaN/Inf (a diverged run) or whose variance is
    negative carries no information to trust: it takes the new statistics alone, and a note
    says which. Refusing instead would leave the user no way to keep the prior elsewhere.
    """
    old_mean, old_var = bn.values.get("mean"), bn.values.get("var")
    if old_mean is None or old_var is None:
        raise ModelError(f"a prior strength needs the stored statistics of {bn.label!r}")
    old_mean = np.asarray(old_mean, np.float64).reshape(new_mean.shape)
    old_var = np.asarray(old_var, np.float64).reshape(new_var.shape)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(old_mean) & np.isfinite(old_var)) | (old_var < 0)
    if bad.any():
        notes.append(
            f"{arg('prior_strength')}: BatchNormalization {bn.label!r} stores non-finite or "
            f"negative statistics in {int(bad.sum())} of {bad.size} channel(s); those take "
            "the new statistics alone (no prior)"
        )
        logger.warning("%s", notes[-1])
        old_mean, old_var = np.where(bad, new_mean, old_mean), np.where(bad, new_var, old_var)
    return bnref.blend_prior(old_mean, old_var, new_mean, new_var, n, prior_strength)


def _new_statistics(bn: BatchNormInfo, stats: CollectedStats, estimator: str, bessel: bool,
                    prior_strength: float | None,
                    notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and variance to write into ``bn`` (with the prior blended in, if any)."""
    precise = stats.precise(bn.key, estimator, bessel)
    new_mean, new_var = precise.mean, precise.var
    if bn.channels is not None and new_mean.size != bn.channels:
        raise StatsError(
            f"BatchNormalization {bn.label!r} has {bn.channels} channels, the STATS file "
            f"{new_mean.size}"
        )
    if prior_strength:
        new_mean, new_var = _blend(bn, new_mean, new_var, stats.num_samples, prior_strength,
                                   notes)
    return new_mean, new_var


def _insert_nodes(model: onnx.ModelProto, inserts: dict[int, list[onnx.NodeProto]]) -> None:
    """Put each list of new nodes right before the node of its index."""
    if not inserts:
        return
    nodes = []
    for i, node in enumerate(model.graph.node):
        nodes.extend(inserts.get(i, []))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _provenance(stats: CollectedStats, est: str, bes: bool,
                prior_strength: float | None) -> tuple[dict, dict[str, str]]:
    """The report's run description and the ``metadata_props`` written into the model."""
    meta = {
        "bnref_version": bnref.__version__,
        "estimator": est,
        "bessel": bool(bes),
        "prior_strength": prior_strength,
        "num_samples": stats.num_samples,
        "num_batches": stats.num_batches,
        "batch_size": stats.batch_size,
        "dropped": stats.dropped,
        "data_fingerprint": stats.data_fingerprint,
        "provider": stats.provider,
        "batchnorms": len(stats.bns),
        "notes": stats.notes,
    }
    if stats.run.get("skipped_images"):
        meta["skipped_images"] = stats.run["skipped_images"]
    props = {
        f"{METADATA_PREFIX}version": bnref.__version__,
        f"{METADATA_PREFIX}estimator": est + (" (bessel)" if bes and est == "population" else ""),
        f"{METADATA_PREFIX}num_samples": str(stats.num_samples),
        f"{METADATA_PREFIX}batch_size": str(stats.batch_size),
        f"{METADATA_PREFIX}data_fingerprint": stats.data_fingerprint,
        **({f"{METADATA_PREFIX}prior_strength": repr(float(prior_strength))}
           if prior_strength else {}),
    }
    return meta, props


@checked()
def apply_stats(
    model: ModelLike | ModelAnalysis,
    stats: CollectedStats | str | os.PathLike,
    *,
    estimator: str | None = None,
    bessel: bool | None = None,
    prior_strength: float | None = None,
) -> ApplyResult:
    """Return a copy of ``model`` with the BN statistics of ``stats`` written in.

    Args:
        model: path, ModelProto (not modified), LoadedModel or ModelAnalysis.
        stats: collected statistics or the path of a STATS file.
        estimator: override the estimator chosen at collection.
        bessel: override the Bessel option (population only).
        prior_strength: Schneider et al. prior ``N0`` (None or 0: new statistics only).

    Raises:
        StatsError: the STATS file belongs to another model or names missing BNs.
        ModelError: statistics not stored in the model (computed at run time).
    """
    analysis = analyze_model(model)
    if not isinstance(stats, CollectedStats):
        stats = load_stats(stats)
    check_supported(analysis.model)
    analysis.check_supported()
    _check_applicable(analysis, stats)
    check_prior_strength(prior_strength)
    est = stats.estimator if estimator is None else estimator
    # Overriding the estimator starts from bessel=False: a STATS file collected with Bessel's
    # correction can still be applied as mean_of_variances (which has no such option).
    bes = bool(bessel) if bessel is not None else (stats.bessel if estimator is None else False)
    check_estimator(est, bes)
    out = onnx.ModelProto()
    out.CopyFrom(analysis.model)
    # The analysis describes the input; node indices and storage are the same in the copy.
    bns = {bn.key: bn for bn in analysis.batchnorms}
    namer = UniqueNamer(out)
    initializers = {t.name: t for t in out.graph.initializer}  # by name, built once
    inserts: dict[int, list[onnx.NodeProto]] = {}
    rows, written, added, notes = [], [], [], []
    for key in stats.bns:
        bn = bns.get(key)
        if bn is None:
            raise StatsError(f"the model has no BatchNormalization with output {key!r}")
        new_mean, new_var = _new_statistics(bn, stats, est, bes, prior_strength, notes)
        for role, value in (("mean", new_mean), ("var", new_var)):
            w, a = _write(out, bn, role, value, namer, inserts, initializers)
            written += [w] if w else []
            added += [a] if a else []
        old_mean, old_var = bn.values.get("mean"), bn.values.get("var")
        if old_mean is not None and old_var is not None:
            rows.append(bn_drift(key, bn.node_name, old_mean, old_var, new_mean, new_var,
                                 bn.epsilon))
    _insert_nodes(out, inserts)
    meta, props = _provenance(stats, est, bes, prior_strength)
    meta["notes"] = [*meta["notes"], *notes]
    set_metadata(out, props)
    logger.debug("wrote %d tensors, added %d", len(written), len(added))
    return ApplyResult(out, DriftReport(rows, meta), written, added, analysis.loaded)
