"""Tests of onnx_tools.data.readers: feed streams re-batched, reader objects and functions."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from onnx_tools.data import BatchPlan, open_data
from onnx_tools.errors import DataError
from tests.onnx_tools.data_helpers import TWO_INPUTS, collect, ids, one_input, rows, specs_of

# --------------------------------------------------------------------------- readers


def test_batch_one_reader_is_stacked_to_the_batch_size():
    x = rows(10)
    feeds = [{"x": x[i : i + 1]} for i in range(10)]
    source = open_data(feeds, one_input())
    assert source.num_samples is None
    got = collect(source, batch_size=4)
    assert [i for i, _ in got] == [0, 1]
    np.testing.assert_array_equal(got[1][1]["x"], x[4:8])
    assert source.summary.dropped == 2


def test_reader_feeds_of_mixed_sizes_and_without_batch_dim_are_rebatched():
    x = rows(11)
    feeds = [{"x": x[0:3]}, {"x": x[3]}, {"x": x[4:9]}, {"x": x[9:11]}]
    source = open_data(iter(feeds), one_input())
    got = collect(source, batch_size=4, keep_partial=True)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert any("added a batch dimension" in n for n in source.summary.notes)


def test_reader_num_samples_cuts_inside_a_feed_and_stops_reading():
    pulled = []

    def gen():
        for i in range(0, 100, 5):
            pulled.append(i)
            yield {"x": rows(100)[i : i + 5]}

    source = open_data(gen(), one_input())
    got = collect(source, batch_size=4, num_samples=7, keep_partial=True)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6]]
    assert pulled == [0, 5]


def test_reader_that_reuses_its_buffer_is_copied_while_queued():
    buffer = np.zeros((1, 2), np.float32)

    def gen():
        for i in range(6):
            buffer[:] = i  # the same array, refilled for every item
            yield {"x": buffer}

    got = collect(open_data(gen(), one_input("N, 2")), batch_size=3)
    assert [f["x"][:, 0].tolist() for _, f in got] == [[0, 1, 2], [3, 4, 5]]


def test_list_reader_reads_twice_but_a_generator_only_once():
    feeds = [{"x": rows(4)}]
    listed = open_data(feeds, one_input())
    collect(listed, batch_size=2)
    first = listed.summary.fingerprint
    collect(listed, batch_size=2)
    assert listed.summary.fingerprint == first
    once = open_data(iter(feeds), one_input())
    collect(once, batch_size=2)
    with pytest.raises(DataError, match="already read"):
        collect(once, batch_size=2)


class CountingReader:
    """A CalibrationDataReader look-alike: get_next() then None, and rewind()."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.i = 0

    def get_next(self):
        if self.i == len(self.x):
            return None
        self.i += 1
        return {"x": self.x[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0


def test_get_next_reader_with_rewind_can_be_read_twice():
    x = rows(6)
    source = open_data(CountingReader(x), one_input())
    a = [f["x"] for _, f in source.batches(BatchPlan(batch_size=3))]
    b = [f["x"] for _, f in source.batches(BatchPlan(batch_size=3))]
    np.testing.assert_array_equal(np.concatenate(a), x)
    np.testing.assert_array_equal(np.concatenate(b), x)


def test_onnxruntime_calibration_data_reader():
    quantization = pytest.importorskip("onnxruntime.quantization")
    x = rows(4)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x[i : i + 1]} for i in range(4)])

        def get_next(self):
            return next(self.it, None)

    got = collect(open_data(Reader(), one_input()), batch_size=2)
    np.testing.assert_array_equal(np.concatenate([f["x"] for _, f in got]), x)


def test_reader_that_raises_halfway_names_the_batch():
    def gen():
        for i in range(5):
            yield {"x": rows(5)[i : i + 1]}
        raise RuntimeError("disk on fire")

    source = open_data(gen(), one_input())
    seen = []
    with pytest.raises(
        DataError, match=r"data reader raised at batch 2: RuntimeError: disk on fire"
    ) as info:
        for index, _ in source.batches(BatchPlan(batch_size=2)):
            seen.append(index)
    assert seen == [0, 1]
    assert isinstance(info.value.__cause__, RuntimeError)


def test_reader_items_must_be_dicts_with_the_model_inputs():
    with pytest.raises(DataError, match="expected a dict"):
        collect(open_data([rows(2)], one_input()), batch_size=2)
    with pytest.raises(DataError, match=r"missing \['x'\].*unknown \['z'\]"):
        collect(open_data([{"z": rows(2)}], one_input()), batch_size=2)
    with pytest.raises(DataError, match="different batch sizes"):
        collect(
            open_data([{"a": rows(2, (2,)), "b": rows(3, (3,))}], specs_of(TWO_INPUTS)),
            batch_size=2,
        )
    with pytest.raises(DataError, match="expected an iterable"):
        open_data(42, one_input())


READER_MODULE = """
import numpy as np
CALLS = []

def make():
    CALLS.append(1)
    x = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    return ({"x": x[i : i + 1]} for i in range(6))

def broken():
    raise ValueError("no calibration folder")
"""


def test_reader_from_file_py_function_is_called_per_pass(tmp_path):
    (tmp_path / "calib_reader.py").write_text(READER_MODULE)
    spec = f"{tmp_path / 'calib_reader.py'}:make"
    source = open_data(spec, one_input("N, 2"))
    for _ in range(2):
        got = collect(source, batch_size=3)
        np.testing.assert_array_equal(
            np.concatenate([f["x"] for _, f in got]), np.arange(12, dtype=np.float32).reshape(6, 2)
        )
    assert source.description == f"reader {spec}"


def test_reader_from_module_function_in_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "my_calib_mod_xyz.py").write_text(READER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_calib_mod_xyz", raising=False)
    source = open_data("my_calib_mod_xyz:make", one_input("N, 2"))
    assert len(collect(source, batch_size=2)) == 3
    with pytest.raises(DataError, match="data reader raised at batch 0: ValueError"):
        open_data("my_calib_mod_xyz:broken", one_input("N, 2"))
    with pytest.raises(DataError, match="no function 'nothing'"):
        open_data("my_calib_mod_xyz:nothing", one_input("N, 2"))
    with pytest.raises(DataError, match="cannot import reader"):
        open_data("no_such_module_q:make", one_input("N, 2"))
