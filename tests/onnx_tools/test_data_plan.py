"""Tests of onnx_tools.data.plan and .source: batching, shuffle, shards, fingerprints, summary."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from onnx_tools.data import BatchPlan, DataSummary, combine_fingerprints, open_data
from onnx_tools.errors import DataError
from tests.onnx_tools.data_helpers import collect, ids, one_input, rows

# --------------------------------------------------------------------------- empty data


def test_empty_array_has_no_samples(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 3, 4, 4), np.float32))
    source = open_data(tmp_path / "e.npy", one_input())
    with pytest.raises(DataError, match="no samples"):
        collect(source, batch_size=4)


def test_data_smaller_than_one_batch_says_keep_partial():
    source = open_data(rows(3), one_input())
    with pytest.raises(DataError, match="keep_partial"):
        collect(source, batch_size=4)
    assert len(collect(source, batch_size=4, keep_partial=True)) == 1


def test_empty_reader_has_no_samples():
    with pytest.raises(DataError, match="no samples"):
        collect(open_data([], one_input()), batch_size=2)


# --------------------------------------------------------------------------- shuffle


def test_shuffle_is_reproducible_and_a_permutation():
    source = open_data(rows(23), one_input())
    first = [
        ids(f["x"])
        for _, f in source.batches(BatchPlan(5, shuffle=True, seed=7, keep_partial=True))
    ]
    again = [
        ids(f["x"])
        for _, f in source.batches(BatchPlan(5, shuffle=True, seed=7, keep_partial=True))
    ]
    other = [
        ids(f["x"])
        for _, f in source.batches(BatchPlan(5, shuffle=True, seed=8, keep_partial=True))
    ]
    assert first == again
    assert first != other
    flat = [k for batch in first for k in batch]
    assert sorted(flat) == list(range(23)) and flat != list(range(23))
    expected = np.random.default_rng(7).permutation(23)
    assert flat == expected.tolist()


def test_shuffle_with_num_samples_is_a_subset_without_repeats(tmp_path):
    np.save(tmp_path / "x.npy", rows(50))
    source = open_data(tmp_path / "x.npy", one_input())
    flat = [
        k
        for _, f in source.batches(BatchPlan(batch_size=4, num_samples=20, shuffle=True, seed=1))
        for k in ids(f["x"])
    ]
    assert len(flat) == 20 == len(set(flat))
    assert flat != sorted(flat)
    assert flat == np.random.default_rng(1).permutation(50)[:20].tolist()


def test_shuffled_rows_match_the_stored_rows(tmp_path):
    x = rows(12)
    np.save(tmp_path / "x.npy", x)
    source = open_data(tmp_path / "x.npy", one_input())
    for _, feed in source.batches(BatchPlan(batch_size=4, shuffle=True, seed=3)):
        np.testing.assert_array_equal(feed["x"], x[ids(feed["x"])])


def test_shuffle_of_a_reader_is_refused():
    with pytest.raises(DataError, match="shuffle"):
        collect(open_data([{"x": rows(4)}], one_input()), batch_size=2, shuffle=True)


# --------------------------------------------------------------------------- sharding


@given(
    n=st.integers(1, 40),
    batch=st.integers(1, 7),
    k=st.integers(1, 5),
    shuffle=st.booleans(),
    keep_partial=st.booleans(),
    reader=st.booleans(),
)
@example(n=10, batch=3, k=3, shuffle=False, keep_partial=False, reader=False)  # 1 dropped
@example(n=10, batch=3, k=2, shuffle=False, keep_partial=False, reader=True)
@example(n=10, batch=3, k=2, shuffle=True, keep_partial=True, reader=False)
def test_shards_partition_the_unsharded_run(n, batch, k, shuffle, keep_partial, reader):
    x = rows(n, (2,))
    specs = one_input("N, 2")
    shuffle = shuffle and not reader

    def make():
        return open_data([{"x": x[i : i + 3]} for i in range(0, n, 3)] if reader else x, specs)

    whole = make()
    try:
        full = collect(whole, batch_size=batch, shuffle=shuffle, seed=5, keep_partial=keep_partial)
    except DataError:
        assert n < batch and not keep_partial
        return
    parts, fingerprints, dropped = {}, [], 0
    for i in range(k):
        shard_source = make()
        try:
            got = collect(
                shard_source,
                batch_size=batch,
                shuffle=shuffle,
                seed=5,
                keep_partial=keep_partial,
                shard=(i, k),
            )
        except DataError:
            got = []  # this shard owns no batch
        for index, feed in got:
            assert index % k == i
            assert index not in parts  # disjoint
            parts[index] = feed["x"]
        if got:
            fingerprints.append(shard_source.summary.fingerprint)
        dropped += shard_source.summary.dropped
    assert sorted(parts) == [index for index, _ in full]
    if not reader:
        assert whole.count_batches(BatchPlan(batch, keep_partial=keep_partial)) == len(full)
        counts = [
            make().count_batches(BatchPlan(batch, keep_partial=keep_partial, shard=(i, k)))
            for i in range(k)
        ]
        assert sum(counts) == len(full)
    for index, feed in full:
        np.testing.assert_array_equal(parts[index], feed["x"])
    assert combine_fingerprints(*fingerprints) == whole.summary.fingerprint
    assert dropped == whole.summary.dropped


def test_bad_shard_and_batch_size_are_refused():
    source = open_data(rows(4), one_input())
    with pytest.raises(DataError, match="shard"):
        collect(source, shard=(2, 2))
    with pytest.raises(DataError, match="batch size"):
        collect(source, batch_size=0)
    with pytest.raises(DataError, match="number of samples"):
        collect(source, num_samples=0)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_the_bytes_fed():
    x = rows(8)
    y = x.copy()
    y[5, 1, 2, 3] += 1.0
    a, b, c = (open_data(v, one_input()) for v in (x, x.copy(), y))
    for s in (a, b, c):
        collect(s, batch_size=4)
    assert a.summary.fingerprint == b.summary.fingerprint
    assert a.summary.fingerprint != c.summary.fingerprint
    assert len(a.summary.fingerprint) == 64
    collect(a, batch_size=2)
    assert a.summary.fingerprint != b.summary.fingerprint  # batching is part of it


def test_fingerprint_of_repeated_batches_does_not_cancel():
    # the fingerprint XORs per-batch digests; the batch index keeps equal batches apart
    r, q = rows(4), rows(4) + 100.0
    a, b = (
        open_data(np.concatenate([r, r]), one_input()),
        open_data(np.concatenate([q, q]), one_input()),
    )
    collect(a, batch_size=4)
    collect(b, batch_size=4)
    assert a.summary.fingerprint != b.summary.fingerprint

# --------------------------------------------------------------------------- static batch


def test_static_batch_dimension_overrides_the_batch_size_with_a_note():
    source = open_data(rows(20, (3,)), one_input("8, 3"))
    got = collect(source, batch_size=64, keep_partial=True)
    assert [len(f["x"]) for _, f in got] == [8, 8]
    s = source.summary
    assert s.batch_size == 8 and s.dropped == 4
    assert any("static batch dimension" in n and "64" in n for n in s.notes)
    assert any("keep_partial ignored" in n for n in s.notes)


def test_static_batch_dimension_rebatches_a_reader():
    feeds = [{"x": r[None]} for r in rows(9, (3,))]
    got = collect(open_data(feeds, one_input("4, 3")), batch_size=1)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_matching_static_batch_adds_no_size_note():
    source = open_data(rows(8, (3,)), one_input("4, 3"))
    collect(source, batch_size=4)
    assert not any("static batch" in n for n in source.summary.notes)


# --------------------------------------------------------------------------- BatchPlan, DataSummary


def test_batch_plan_checks_its_fields_when_made():
    assert BatchPlan() == BatchPlan(64, None, False, 0, False, None)
    with pytest.raises(DataError, match=r"^batch size must be an integer, got True$"):
        BatchPlan(batch_size=True)
    with pytest.raises(DataError, match=r"^batch size must be an integer, got 2\.0$"):
        BatchPlan(batch_size=2.0)
    with pytest.raises(DataError, match=r"^batch size must be at least 1, got 0$"):
        BatchPlan(batch_size=0)
    with pytest.raises(DataError, match=r"^number of samples must be a positive integer, got 0$"):
        BatchPlan(num_samples=0)
    with pytest.raises(DataError, match=r"^number of samples must be a positive integer, got '5'$"):
        BatchPlan(num_samples="5")
    with pytest.raises(DataError, match=r"^shard must be I/K with 0 <= I < K, got 2/2$"):
        BatchPlan(shard=(2, 2))
    with pytest.raises(DataError, match=r"^shard must be I/K with 0 <= I < K, got -1/3$"):
        BatchPlan(shard=(-1, 3))
    plan = BatchPlan(batch_size=np.int64(8), num_samples=np.int32(3), shard=[1, 3])
    assert (type(plan.batch_size), type(plan.num_samples), plan.shard) == (int, int, (1, 3))
    assert BatchPlan().sharding == (0, 1) and plan.sharding == (1, 3)
    assert [i for i in range(7) if plan.owns(i)] == [1, 4]


def test_batch_plan_resolves_against_a_static_batch_dimension():
    plan = BatchPlan(batch_size=64, keep_partial=True)
    assert plan.resolve(one_input("N, 3")) == (replace(plan, shard=(0, 1)), [])
    resolved, notes = plan.resolve(one_input("8, 3"))
    assert (resolved.batch_size, resolved.keep_partial, resolved.shard) == (8, False, (0, 1))
    assert notes == [
        "batch size 8 (the model's input has a static batch dimension), not the requested 64",
        "keep_partial ignored: the model's batch dimension is static",
    ]
    assert BatchPlan(8).resolve(one_input("8, 3")) == (BatchPlan(8, shard=(0, 1)), [])
    resolved, _ = BatchPlan(10, num_samples=25, keep_partial=True).resolve(one_input("N, 3"))
    assert (resolved.split(40), resolved.count(40), resolved.count(20)) == ((25, 2, 5), 3, 2)


def test_count_batches_matches_the_batches_yielded():
    source = open_data(rows(23), one_input())
    for plan in (BatchPlan(5), BatchPlan(5, keep_partial=True), BatchPlan(5, 12, shard=(1, 2))):
        assert source.count_batches(plan) == len(list(source.batches(plan)))
    assert open_data([{"x": rows(4)}], one_input()).count_batches(BatchPlan(2)) is None


def test_summary_is_a_typed_copy_with_the_run_settings():
    source = open_data(rows(10), one_input())
    before = source.summary
    assert isinstance(before, DataSummary)
    assert (before.source, before.batch_size, before.num_batches, before.notes) == (
        "array in memory", 0, 0, []
    )
    assert before.fingerprint == combine_fingerprints()
    collect(source, batch_size=3, shuffle=True, seed=9, shard=(1, 2))
    s = source.summary
    assert (s.batch_size, s.num_batches, s.num_samples, s.dropped) == (3, 1, 3, 1)
    assert (s.shuffle, s.seed, s.shard) == (True, 9, (1, 2))
    s.notes.append("changed by the caller")
    s.dropped = 99
    assert source.summary.notes == [] and source.summary.dropped == 1
