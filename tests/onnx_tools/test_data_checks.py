"""Tests of the checks made before any batch runs: min_batch_size, DataSource.check, notes once.

Issue 13: a problem the data layer can see up front (a kept final batch too small for the
model, data that does not fit the model's inputs) is raised before a session is built or the
first batch is run, never after all other batches ran; a note is printed once per run.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from onnx_tools.data import BatchPlan, open_data
from onnx_tools.errors import DataError
from tests.onnx_tools.data_helpers import collect, one_input, rows

# --------------------------------------------------------------------------- min_batch_size


def test_kept_last_batch_of_one_is_refused_before_the_first_batch():
    source = open_data(rows(9), one_input())  # 9 = 2 x 4 + 1
    with pytest.raises(DataError, match=r"keep_partial.*last batch would hold 1 sample") as info:
        source.batches(BatchPlan(4, keep_partial=True, min_batch_size=2))  # at once, not lazily
    message = str(info.value)
    assert "2 a batch of this model needs" in message and "--" not in message
    # the same data is fine without keep_partial (the sample is dropped) or when the model
    # can take a batch of one (a BN after a conv sees H*W >= 2 values per channel)
    assert len(collect(source, batch_size=4, min_batch_size=2)) == 2
    assert len(collect(source, batch_size=4, keep_partial=True)) == 3
    assert len(collect(source, batch_size=4, keep_partial=True, min_batch_size=1)) == 3
    # a remainder of 2 or more is enough
    assert len(collect(open_data(rows(10), one_input()), batch_size=4, keep_partial=True,
                       min_batch_size=2)) == 3


def test_kept_last_batch_only_refused_in_the_shard_that_owns_it():
    source = open_data(rows(9), one_input())  # batches 0, 1 full; batch 2 holds 1 sample
    assert [i for i, _ in collect(source, batch_size=4, keep_partial=True, min_batch_size=2,
                                  shard=(1, 3))] == [1]
    with pytest.raises(DataError, match="last batch would hold 1 sample"):
        source.batches(BatchPlan(4, keep_partial=True, min_batch_size=2, shard=(2, 3)))


def test_batch_size_below_the_minimum_is_refused_when_resolved():
    source = open_data(rows(8), one_input())
    with pytest.raises(DataError, match=r"batch size 1 .*at least 2 samples$"):
        source.batches(BatchPlan(1, min_batch_size=2))
    with pytest.raises(DataError, match="min_batch_size must be"):
        BatchPlan(4, min_batch_size=0)
    # a static batch dimension of 1 is refused the same way
    with pytest.raises(DataError, match="batch size 1"):
        open_data(rows(8), one_input("1, 3, 4, 4")).batches(BatchPlan(4, min_batch_size=2))


def test_reader_refuses_a_too_small_kept_last_batch_when_it_reaches_it():
    feeds = [{"x": rows(4)}, {"x": rows(4)}, {"x": rows(1)}]  # a stream: length unknown
    got = []
    with pytest.raises(DataError, match=r"keep_partial.*1 sample.*fewer than the 2 a batch of this model needs"):
        for index, _ in open_data(feeds, one_input()).batches(
            BatchPlan(4, keep_partial=True, min_batch_size=2)
        ):
            got.append(index)
    assert got == [0, 1]


# --------------------------------------------------------------------------- DataSource.check


def test_check_refuses_what_batches_would_refuse_without_reading_the_data():
    source = open_data(rows(9), one_input())
    assert source.check(BatchPlan(4)).batch_size == 4  # returns the plan as it runs
    with pytest.raises(DataError, match="last batch would hold 1 sample"):
        source.check(BatchPlan(4, keep_partial=True, min_batch_size=2))
    with pytest.raises(DataError, match="fewer than the batch size 16"):
        source.check(BatchPlan(16))
    with pytest.raises(DataError, match="shard 3/4 gets no batch"):
        source.check(BatchPlan(4, shard=(3, 4)))
    with pytest.raises(DataError, match="no samples"):
        open_data(np.zeros((0, 3, 4, 4), np.float32), one_input()).check(BatchPlan(4))
    assert source.summary.num_batches == 0  # nothing was read


def test_check_reads_only_the_first_feed_of_a_reader_and_keeps_it():
    pulled = []

    def stream():
        for k in range(3):
            pulled.append(k)
            yield {"x": rows(4) + 100 * k}

    source = open_data(stream(), one_input())  # a one-shot generator
    source.check(BatchPlan(4))
    assert pulled == [0]
    got = collect(source, batch_size=4)  # the feed check read is not lost
    assert [float(f["x"][0, 0, 0, 0]) for _, f in got] == [0.0, 100.0, 200.0]
    bad = open_data([{"x": np.zeros((2, 3, 5, 5), np.float32)}], one_input())
    with pytest.raises(DataError, match=r"expected shape \(N, 3, 4, 4\)"):
        bad.check(BatchPlan(2))
    with pytest.raises(DataError, match="expects float32, got int64"):
        open_data([{"x": np.zeros((2, 3, 4, 4), np.int64)}], one_input()).check(BatchPlan(2))
    with pytest.raises(DataError, match="no samples"):
        open_data([], one_input()).check(BatchPlan(2))


# --------------------------------------------------------------------------- notes once


def test_a_run_prints_each_note_once(caplog):
    from onnx_tools.collection import collect as collect_stats
    from tests.onnx_tools.helpers import cnn_data, cnn_model

    caplog.set_level(logging.INFO, logger="onnx_tools")
    collect_stats(cnn_model(), cnn_data(40).astype(np.float64), batch_size=8, num_samples=100,
                  provider="cpu")
    texts = [r.getMessage() for r in caplog.records]
    assert texts.count("asked for 100 samples, the data has 40: using 40") == 1
    assert texts.count("cast float64 -> float32 for input 'x'") == 1
