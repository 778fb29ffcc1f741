"""Collected statistics, the STATS file (``.npz``), and exact merging of shards.

A STATS file holds, per selected BN, the full :class:`bnref.PreciseBN` state (both
estimators: pooled count/mean/M2 and the equal-weight-per-batch averages), plus everything
``apply`` needs: the estimator chosen at collection, batch size, sample counts, the model
fingerprint (:mod:`onnx_tools.fingerprint`: graph, weights, constants and input shapes, all
but the running statistics it replaces, so a STATS file applies to the model it was
collected on and is refused by any other checkpoint or export) and the data fingerprint.

Layout: one 0-d string array ``meta`` (JSON) and, for BN number ``i`` of ``meta["bns"]``,
arrays ``bn{i}/count``, ``bn{i}/mean``, ... as returned by ``PreciseBN.state_dict``. Loading
never unpickles.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import bnref
from onnx_tools.errors import StatsError
from onnx_tools.outputs import OutputPath, atomic_write_bytes

FORMAT = "bnref-onnx-stats"
#: 3: a shard records the identity of the whole data source (``data_source``,
#: :mod:`onnx_tools.data.identity`), which ``merge`` compares; version 2 files are read (their
#: shards merge with a note that their data could not be compared). 2: the model fingerprint
#: covers weights, constants and input shapes; version 1 files (structure only) are refused.
FORMAT_VERSION = 3
#: The oldest version read.
OLDEST_READ = 2


@dataclass
class BNStats:
    """Aggregated statistics of one BN: its key (output name), node name and PreciseBN."""

    key: str
    node_name: str
    channels: int
    precise: bnref.PreciseBN


@dataclass
class CollectedStats:
    """Per-BN PreciseBN state and the run that produced it.

    ``shards`` lists the shard indices (out of ``num_shards``) this object covers; a complete
    run covers all of them. ``num_samples`` counts input samples (not values per channel).
    ``data_fingerprint`` covers the batches this object was collected on; ``data_source``
    (shards only) identifies the whole data all shards read (:mod:`onnx_tools.data.identity`).
    """

    bns: dict[str, BNStats]
    estimator: str
    bessel: bool
    batch_size: int
    num_samples: int
    num_batches: int
    dropped: int
    model_fingerprint: str
    data_fingerprint: str
    num_shards: int = 1
    shards: list[int] = field(default_factory=lambda: [0])
    run: dict[str, Any] = field(default_factory=dict)
    provider: str = "cpu"
    notes: list[str] = field(default_factory=list)
    data_source: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """True when every shard of the run is included."""
        return sorted(self.shards) == list(range(self.num_shards))

    def precise(self, key: str, estimator: str | None = None, bessel: bool | None = None):
        """Return BN ``key``'s PreciseBN reporting with ``estimator``/``bessel``."""
        est = self.estimator if estimator is None else estimator
        bes = self.bessel if bessel is None else bessel
        return self.bns[key].precise.with_estimator(est, bes)

    def meta(self) -> dict[str, Any]:
        """JSON-ready description (everything but the arrays)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bnref_version": bnref.__version__,
            "estimator": self.estimator,
            "bessel": self.bessel,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
            "dropped": self.dropped,
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "num_shards": self.num_shards,
            "shards": sorted(self.shards),
            "run": self.run,
            "provider": self.provider,
            "notes": self.notes,
            "data_source": self.data_source,
            "bns": [
                {"key": b.key, "node": b.node_name, "channels": b.channels}
                for b in self.bns.values()
            ],
        }


def save_stats(stats: CollectedStats, path: str | os.PathLike | OutputPath) -> None:
    """Write ``stats`` to ``path`` (``.npz``) atomically."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(stats.meta()))}
    for i, b in enumerate(stats.bns.values()):
        for name, value in b.precise.state_dict().items():
            arrays[f"bn{i}/{name}"] = np.asarray(value)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(buf.getvalue(), path)


def load_stats(path: str | os.PathLike) -> CollectedStats:
    """Read a STATS file written by :func:`save_stats`; :class:`StatsError` if it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StatsError(f"STATS file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise StatsError(
            f"{path} is not a STATS file (a STATS file is the .npz archive that "
            "`bnref-onnx collect` or `merge` writes)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StatsError(f"cannot read {path} as a STATS file: {exc}") from exc
    try:
        meta = json.loads(str(arrays["meta"][()]))
        if meta.get("format") != FORMAT:
            raise StatsError(f"{path} is not a bnref-onnx STATS file")
        if int(meta.get("format_version", 0)) < OLDEST_READ:
            raise StatsError(
                f"{path} has STATS format {meta.get('format_version')}, written by an older "
                "bnref-onnx whose model fingerprint did not cover the weights; collect the "
                "statistics again"
            )
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise StatsError(
                f"{path} has STATS format {meta['format_version']}; this bnref-onnx reads "
                f"up to {FORMAT_VERSION}"
            )
        per_bn: dict[str, dict[str, np.ndarray]] = {}  # "bn{i}" -> its state arrays
        for k, v in arrays.items():
            prefix, _, name = k.partition("/")
            if name:
                per_bn.setdefault(prefix, {})[name] = v
        bns: dict[str, BNStats] = {}
        for i, info in enumerate(meta["bns"]):
            state = per_bn.get(f"bn{i}", {})
            precise = bnref.PreciseBN.from_state_dict(
                state, estimator=meta["estimator"], bessel=meta["bessel"]
            )
            bns[info["key"]] = BNStats(info["key"], info["node"], int(info["channels"]), precise)
        return CollectedStats(
            bns=bns,
            estimator=meta["estimator"],
            bessel=bool(meta["bessel"]),
            batch_size=int(meta["batch_size"]),
            num_samples=int(meta["num_samples"]),
            num_batches=int(meta["num_batches"]),
            dropped=int(meta["dropped"]),
            model_fingerprint=meta["model_fingerprint"],
            data_fingerprint=meta["data_fingerprint"],
            num_shards=int(meta["num_shards"]),
            shards=[int(s) for s in meta["shards"]],
            run=dict(meta.get("run", {})),
            provider=meta.get("provider", "cpu"),
            notes=list(meta.get("notes", [])),
            data_source=_data_source(meta.get("data_source")),
        )
    except StatsError:
        raise
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise StatsError(f"{path} is not a valid STATS file: {exc}") from exc


def _data_source(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not {"kind", "samples", "digest"} <= set(value):
        raise ValueError(f"data_source is {value!r}")
    return {"kind": str(value["kind"]), "samples": value["samples"], "digest": str(value["digest"])}


def _describe_source(source: dict[str, Any]) -> str:
    return f"{source['kind']}, {source['samples']} samples, identity {source['digest'][:12]}"


def _same_data(parts: list[CollectedStats]) -> str | None:
    """Refuse parts collected on different data; a note when that cannot be checked."""
    known = [p.data_source for p in parts if p.data_source is not None]
    for other in known[1:]:
        if other != known[0]:
            raise StatsError(
                f"STATS files were collected on different data ({_describe_source(known[0])} "
                f"vs {_describe_source(other)}); merge only the shards of one run"
            )
    if len(parts) > 1 and len(known) < len(parts):
        return ("the shards' data could not be checked to be the same data (a STATS file "
                "without its data's identity: written before STATS format 3, or unsharded)")
    return None


def _check_stream(merged: CollectedStats) -> None:
    """A complete set of a stream's shards makes up the stream's own fingerprint."""
    source = merged.data_source
    if merged.complete and source is not None and source["kind"] == "stream" and (
            merged.data_fingerprint != source["digest"]):
        raise StatsError(
            "the shards' batches do not make up the stream they were read from (their data "
            "fingerprints do not combine to the stream's): a reader that yields other data "
            "each time it is read cannot be sharded"
        )


def merge_state(merged: CollectedStats, parts: int) -> str:
    """``complete``, ``complete, ...not checked...`` or ``shards ... incomplete`` (for messages)."""
    if not merged.complete:
        return f"shards {merged.shards} of {merged.num_shards}: incomplete, apply refuses it"
    if parts > 1 and merged.data_source is None:
        return "complete by shard count; the shards' data could not be checked to be the same"
    return "complete"


def merge_stats(parts: list[CollectedStats]) -> CollectedStats:
    """Merge shards of one collection run; any order gives the same numbers.

    Refuses parts from another model, another run definition (batch size, shard count,
    shuffle/seed, sample limit, BN selection, estimator), other data (their ``data_source``,
    :mod:`onnx_tools.data.identity`; parts without one merge with a note) or overlapping
    shards. :func:`merge_state` says whether the result is complete.
    """
    if not parts:
        raise StatsError("merge needs at least one STATS file")
    first = parts[0]
    for other in parts[1:]:
        if other.model_fingerprint != first.model_fingerprint:
            raise StatsError("STATS files come from different models (model fingerprints differ)")
        if list(other.bns) != list(first.bns):
            raise StatsError("STATS files cover different BatchNormalization nodes")
        for attr in ("batch_size", "num_shards", "estimator", "bessel"):
            if getattr(other, attr) != getattr(first, attr):
                raise StatsError(
                    f"STATS files differ in {attr.replace('_', ' ')}: "
                    f"{getattr(first, attr)} vs {getattr(other, attr)}"
                )
        if other.run != first.run:
            diff = sorted(k for k in set(first.run) | set(other.run)
                          if first.run.get(k) != other.run.get(k))
            raise StatsError(f"STATS files come from different runs (differ in {', '.join(diff)})")
    seen: set[int] = set()
    for part in parts:
        dup = seen & set(part.shards)
        if dup:
            raise StatsError(
                f"shard {sorted(dup)[0]}/{first.num_shards} appears twice; each shard may be "
                "merged once"
            )
        seen |= set(part.shards)
    unchecked = _same_data(parts)
    # Order-independent: sort parts by shard before merging; PreciseBN.merge is symmetric.
    ordered = sorted(parts, key=lambda p: min(p.shards))
    bns: dict[str, BNStats] = {}
    for key, b in first.bns.items():
        acc = ordered[0].bns[key].precise
        for part in ordered[1:]:
            acc = acc.merge(part.bns[key].precise)
        bns[key] = BNStats(key, b.node_name, b.channels, acc)
    from onnx_tools.data import combine_fingerprints

    merged = CollectedStats(
        bns=bns,
        estimator=first.estimator,
        bessel=first.bessel,
        batch_size=first.batch_size,
        num_samples=sum(p.num_samples for p in parts),
        num_batches=sum(p.num_batches for p in parts),
        dropped=sum(p.dropped for p in parts),
        model_fingerprint=first.model_fingerprint,
        data_fingerprint=combine_fingerprints(*(p.data_fingerprint for p in parts)),
        num_shards=first.num_shards,
        shards=sorted(seen),
        run=dict(first.run),
        provider=first.provider,
        notes=list(dict.fromkeys([*(n for p in parts for n in p.notes),
                                  *([unchecked] if unchecked else [])])),
        data_source=None if unchecked else first.data_source,
    )
    _check_stream(merged)
    return merged
