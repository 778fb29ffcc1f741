"""Tests of onnx_tools.data.arrays: .npy (memory-mapped), .npz, arrays in memory, file errors."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from onnx_tools.data import open_data
from onnx_tools.errors import DataError
from tests.onnx_tools.data_helpers import TWO_INPUTS, collect, ids, one_input, rows, specs_of


def test_npy_is_memory_mapped_and_batches_in_stored_order(tmp_path):
    x = rows(10)
    np.save(tmp_path / "x.npy", x)
    source = open_data(tmp_path / "x.npy", one_input())
    assert source.num_samples == 10
    assert isinstance(source._arrays["x"], np.memmap)  # streaming: nothing loaded at open
    got = collect(source, batch_size=4)
    assert [i for i, _ in got] == [0, 1]
    np.testing.assert_array_equal(got[0][1]["x"], x[0:4])
    np.testing.assert_array_equal(got[1][1]["x"], x[4:8])
    assert not isinstance(got[0][1]["x"], np.memmap)
    s = source.summary
    assert (s.num_samples, s.num_batches, s.dropped, s.batch_size) == (8, 2, 2, 4)


def test_keep_partial_yields_the_final_small_batch(tmp_path):
    np.save(tmp_path / "x.npy", rows(10))
    source = open_data(str(tmp_path / "x.npy"), one_input())
    got = collect(source, batch_size=4, keep_partial=True)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert source.summary.dropped == 0 and source.summary.num_samples == 10


def test_num_samples_limits_the_data():
    source = open_data(rows(20), one_input())
    got = collect(source, batch_size=4, num_samples=10)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert source.summary.dropped == 2


def test_npz_multi_input_ignores_other_keys(tmp_path):
    a, b = rows(6, (2,)), rows(6, (3,))
    np.savez(tmp_path / "d.npz", a=a, b=b, labels=np.arange(6))
    source = open_data(tmp_path / "d.npz", specs_of(TWO_INPUTS))
    (_, feed), (_, feed2) = collect(source, batch_size=3)
    np.testing.assert_array_equal(feed["a"], a[:3])
    np.testing.assert_array_equal(feed2["b"], b[3:])
    assert set(feed) == {"a", "b"}
    assert any("labels" in n for n in source.summary.notes)


def test_npz_single_input_takes_its_only_key(tmp_path):
    np.savez_compressed(tmp_path / "d.npz", images=rows(4))
    source = open_data(tmp_path / "d.npz", one_input())
    np.testing.assert_array_equal(collect(source, batch_size=4)[0][1]["x"], rows(4))
    assert any("'images'" in n and "'x'" in n for n in source.summary.notes)


def test_npz_ambiguous_or_missing_keys_are_refused(tmp_path):
    np.savez(tmp_path / "two.npz", p=rows(4), q=rows(4))
    with pytest.raises(DataError, match=r"none is the model's input 'x'"):
        open_data(tmp_path / "two.npz", one_input())
    np.savez(tmp_path / "onlya.npz", a=rows(4, (2,)))
    with pytest.raises(DataError, match=r"lacks keys \['b'\]"):
        open_data(tmp_path / "onlya.npz", specs_of(TWO_INPUTS))


def test_npy_for_a_two_input_model_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", rows(4, (2,)))
    with pytest.raises(DataError, match=r"single-input model.*\['a', 'b'\]"):
        open_data(tmp_path / "x.npy", specs_of(TWO_INPUTS))


def test_in_memory_mapping_and_array():
    a, b = rows(4, (2,)), rows(4, (3,))
    source = open_data({"a": a, "b": b}, specs_of(TWO_INPUTS))
    ((_, feed),) = collect(source, batch_size=4)
    np.testing.assert_array_equal(feed["b"], b)
    feed["b"][0, 0] = -1.0  # feeds are copies: the caller's array stays intact
    assert b[0, 0] != -1.0
    with pytest.raises(DataError, match="pass a dict"):
        open_data(a, specs_of(TWO_INPUTS))


def test_inputs_with_different_sample_counts_are_refused():
    with pytest.raises(DataError, match="different numbers of samples"):
        open_data({"a": rows(4, (2,)), "b": rows(5, (3,))}, specs_of(TWO_INPUTS))


# --------------------------------------------------------------------------- file errors


def test_corrupt_npz_is_one_line_data_error(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match="cannot read") as info:
        open_data(tmp_path / "bad.npz", one_input())
    assert "\n" not in str(info.value)


def test_truncated_npz_is_data_error(tmp_path):
    np.savez_compressed(tmp_path / "ok.npz", x=rows(50))
    blob = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cannot read"):
        open_data(tmp_path / "cut.npz", one_input())


def test_npz_with_damaged_member_is_data_error(tmp_path):
    path = tmp_path / "damaged.npz"
    np.savez_compressed(path, x=rows(50))
    with zipfile.ZipFile(path) as z:
        info = z.infolist()[0]
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    blob = bytearray(path.read_bytes())
    for k in range(start + 20, start + 60):
        blob[k] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="cannot read"):
        open_data(path, one_input())


def test_corrupt_npy_is_data_error(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="cannot read"):
        open_data(tmp_path / "bad.npy", one_input())


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        open_data(tmp_path / "nope.npy", one_input())
    (tmp_path / "d.csv").write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"unsupported data file .*d\.csv"):
        open_data(tmp_path / "d.csv", one_input())
