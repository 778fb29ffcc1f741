"""Tests of onnx_tools.data / onnx_tools.images: formats, batching, sharding, casts, errors.

Expected values are computed here with plain NumPy slicing (and, for images, from the pixel
arrays the test itself wrote), never through the loader's code.
"""

from __future__ import annotations

import sys
import zipfile
from dataclasses import replace

import numpy as np
import onnx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from onnx_tools.data import (
    DataSource,
    ImageOptions,
    InputSpec,
    check_finite,
    combine_fingerprints,
    open_data,
)
from onnx_tools.errors import DataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


# --------------------------------------------------------------------------- helpers


def specs_of(text: str) -> list[InputSpec]:
    """Input specs of a model written in ONNX text; the body just passes its inputs on."""
    return InputSpec.from_model(onnx.parser.parse_model(text))


def one_input(dims: str = "N, 3, 4, 4", dtype: str = "float") -> list[InputSpec]:
    return specs_of(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g ({dtype}[{dims}] x) => ({dtype}[{dims}] y) {{ y = Identity(x) }}"""
    )


TWO_INPUTS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2] a, float[N, 3] b) => (float[N, 2] ya, float[N, 3] yb) {
    ya = Identity(a)
    yb = Identity(b)
}"""


def rows(n: int, shape=(3, 4, 4), dtype=np.float32) -> np.ndarray:
    """Sample k is filled with k + position/1000, so each row is identifiable by its first value."""
    size = int(np.prod(shape))
    base = np.arange(n, dtype=np.float64)[:, None] + np.arange(size)[None, :] / 1000.0
    return base.reshape((n, *shape)).astype(dtype)


def ids(feed_array: np.ndarray) -> list[int]:
    """Which rows of ``rows(...)`` a batch holds."""
    return [int(round(float(v))) for v in feed_array.reshape(len(feed_array), -1)[:, 0]]


def collect(source: DataSource, **kwargs) -> list[tuple[int, dict[str, np.ndarray]]]:
    return list(source.batches(**kwargs))


# --------------------------------------------------------------------------- InputSpec


def test_input_spec_from_model_skips_initializers_and_keeps_symbolic_dims():
    model = onnx.parser.parse_model(
        """<ir_version: 3, opset_import: ["" : 9]>
        g (float[N, 3, 8, 8] x, float[3] w, int64[batch, ?] t) => (float[N, 3, 8, 8] y) {
            y = Identity(x)
        }"""
    )
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "w"))
    specs = InputSpec.from_model(model)
    assert [s.name for s in specs] == ["x", "t"]
    assert specs[0].dtype == np.float32 and specs[0].shape == ("N", 3, 8, 8)
    assert specs[1].dtype == np.int64 and specs[1].shape == ("batch", None)
    assert specs[0].static_batch is None
    assert InputSpec("x", np.float32, (8, 3)).static_batch == 8


# --------------------------------------------------------------------------- .npy / .npz / memory


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
    assert (s["num_samples"], s["num_batches"], s["dropped"], s["batch_size"]) == (8, 2, 2, 4)


def test_keep_partial_yields_the_final_small_batch(tmp_path):
    np.save(tmp_path / "x.npy", rows(10))
    source = open_data(str(tmp_path / "x.npy"), one_input())
    got = collect(source, batch_size=4, keep_partial=True)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert source.summary["dropped"] == 0 and source.summary["num_samples"] == 10


def test_num_samples_limits_the_data():
    source = open_data(rows(20), one_input())
    got = collect(source, batch_size=4, num_samples=10)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert source.summary["dropped"] == 2


def test_npz_multi_input_ignores_other_keys(tmp_path):
    a, b = rows(6, (2,)), rows(6, (3,))
    np.savez(tmp_path / "d.npz", a=a, b=b, labels=np.arange(6))
    source = open_data(tmp_path / "d.npz", specs_of(TWO_INPUTS))
    (_, feed), (_, feed2) = collect(source, batch_size=3)
    np.testing.assert_array_equal(feed["a"], a[:3])
    np.testing.assert_array_equal(feed2["b"], b[3:])
    assert set(feed) == {"a", "b"}
    assert any("labels" in n for n in source.summary["notes"])


def test_npz_single_input_takes_its_only_key(tmp_path):
    np.savez_compressed(tmp_path / "d.npz", images=rows(4))
    source = open_data(tmp_path / "d.npz", one_input())
    np.testing.assert_array_equal(collect(source, batch_size=4)[0][1]["x"], rows(4))
    assert any("'images'" in n and "'x'" in n for n in source.summary["notes"])


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


# --------------------------------------------------------------------------- empty data


def test_empty_array_has_no_samples(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 3, 4, 4), np.float32))
    source = open_data(tmp_path / "e.npy", one_input())
    with pytest.raises(DataError, match="no samples"):
        collect(source, batch_size=4)


def test_data_smaller_than_one_batch_says_keep_partial():
    source = open_data(rows(3), one_input())
    with pytest.raises(DataError, match="keep-partial"):
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
        for _, f in source.batches(batch_size=5, shuffle=True, seed=7, keep_partial=True)
    ]
    again = [
        ids(f["x"])
        for _, f in source.batches(batch_size=5, shuffle=True, seed=7, keep_partial=True)
    ]
    other = [
        ids(f["x"])
        for _, f in source.batches(batch_size=5, shuffle=True, seed=8, keep_partial=True)
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
        for _, f in source.batches(batch_size=4, num_samples=20, shuffle=True, seed=1)
        for k in ids(f["x"])
    ]
    assert len(flat) == 20 == len(set(flat))
    assert flat != sorted(flat)
    assert flat == np.random.default_rng(1).permutation(50)[:20].tolist()


def test_shuffled_rows_match_the_stored_rows(tmp_path):
    x = rows(12)
    np.save(tmp_path / "x.npy", x)
    source = open_data(tmp_path / "x.npy", one_input())
    for _, feed in source.batches(batch_size=4, shuffle=True, seed=3):
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
            fingerprints.append(shard_source.summary["fingerprint"])
        dropped += shard_source.summary["dropped"]
    assert sorted(parts) == [index for index, _ in full]
    if not reader:
        assert whole.count_batches(batch, keep_partial=keep_partial) == len(full)
        counts = [make().count_batches(batch, None, keep_partial, (i, k)) for i in range(k)]
        assert sum(counts) == len(full)
    for index, feed in full:
        np.testing.assert_array_equal(parts[index], feed["x"])
    assert combine_fingerprints(*fingerprints) == whole.summary["fingerprint"]
    assert dropped == whole.summary["dropped"]


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
    assert a.summary["fingerprint"] == b.summary["fingerprint"]
    assert a.summary["fingerprint"] != c.summary["fingerprint"]
    assert len(a.summary["fingerprint"]) == 64
    collect(a, batch_size=2)
    assert a.summary["fingerprint"] != b.summary["fingerprint"]  # batching is part of it


def test_fingerprint_of_repeated_batches_does_not_cancel():
    # the fingerprint XORs per-batch digests; the batch index keeps equal batches apart
    r, q = rows(4), rows(4) + 100.0
    a, b = (
        open_data(np.concatenate([r, r]), one_input()),
        open_data(np.concatenate([q, q]), one_input()),
    )
    collect(a, batch_size=4)
    collect(b, batch_size=4)
    assert a.summary["fingerprint"] != b.summary["fingerprint"]


# --------------------------------------------------------------------------- readers


def test_batch_one_reader_is_stacked_to_the_batch_size():
    x = rows(10)
    feeds = [{"x": x[i : i + 1]} for i in range(10)]
    source = open_data(feeds, one_input())
    assert source.num_samples is None
    got = collect(source, batch_size=4)
    assert [i for i, _ in got] == [0, 1]
    np.testing.assert_array_equal(got[1][1]["x"], x[4:8])
    assert source.summary["dropped"] == 2


def test_reader_feeds_of_mixed_sizes_and_without_batch_dim_are_rebatched():
    x = rows(11)
    feeds = [{"x": x[0:3]}, {"x": x[3]}, {"x": x[4:9]}, {"x": x[9:11]}]
    source = open_data(iter(feeds), one_input())
    got = collect(source, batch_size=4, keep_partial=True)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert any("added a batch dimension" in n for n in source.summary["notes"])


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
    first = listed.summary["fingerprint"]
    collect(listed, batch_size=2)
    assert listed.summary["fingerprint"] == first
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
    a = [f["x"] for _, f in source.batches(batch_size=3)]
    b = [f["x"] for _, f in source.batches(batch_size=3)]
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
        for index, _ in source.batches(batch_size=2):
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


# --------------------------------------------------------------------------- static batch


def test_static_batch_dimension_overrides_the_batch_size_with_a_note():
    source = open_data(rows(20, (3,)), one_input("8, 3"))
    got = collect(source, batch_size=64, keep_partial=True)
    assert [len(f["x"]) for _, f in got] == [8, 8]
    s = source.summary
    assert s["batch_size"] == 8 and s["dropped"] == 4
    assert any("static batch dimension" in n and "64" in n for n in s["notes"])
    assert any("keep-partial ignored" in n for n in s["notes"])


def test_static_batch_dimension_rebatches_a_reader():
    feeds = [{"x": r[None]} for r in rows(9, (3,))]
    got = collect(open_data(feeds, one_input("4, 3")), batch_size=1)
    assert [ids(f["x"]) for _, f in got] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_matching_static_batch_adds_no_size_note():
    source = open_data(rows(8, (3,)), one_input("4, 3"))
    collect(source, batch_size=4)
    assert not any("static batch" in n for n in source.summary["notes"])


# --------------------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize(
    ("data_dtype", "model_dtype", "expected"),
    [
        (np.float64, "float", np.float32),
        (np.float32, "float16", np.float16),
        (np.float16, "double", np.float64),
        (np.int32, "int64", np.int64),
    ],
)
def test_allowed_casts_carry_a_note(data_dtype, model_dtype, expected):
    x = np.arange(8).reshape(4, 2).astype(data_dtype)
    source = open_data(x, one_input("N, 2", model_dtype))
    ((_, feed),) = collect(source, batch_size=4)
    assert feed["x"].dtype == expected
    np.testing.assert_array_equal(feed["x"], x.astype(expected))
    assert (
        f"cast {np.dtype(data_dtype)} -> {np.dtype(expected)} for input 'x'"
        in (source.summary["notes"])
    )


def test_no_note_without_a_cast():
    source = open_data(rows(4, (2,)), one_input("N, 2"))
    collect(source, batch_size=4)
    assert source.summary["notes"] == []


@pytest.mark.parametrize(
    ("data_dtype", "model_dtype"),
    [
        (np.uint8, "float"),  # raw pixels: not normalized here
        (np.int64, "float"),
        (np.bool_, "float"),
        (np.float32, "int64"),
        (np.int64, "int32"),  # narrowing
    ],
)
def test_refused_casts(data_dtype, model_dtype):
    x = np.zeros((4, 2), data_dtype)
    with pytest.raises(DataError, match=r"input 'x' expects"):
        open_data(x, one_input("N, 2", model_dtype))


def test_reader_feeds_are_cast_with_a_note_or_refused():
    source = open_data([{"x": np.ones((2, 2), np.float64)}], one_input("N, 2"))
    ((_, feed),) = collect(source, batch_size=2)
    assert feed["x"].dtype == np.float32
    assert "cast float64 -> float32 for input 'x'" in source.summary["notes"]
    with pytest.raises(DataError, match="expects float32, got int64"):
        collect(open_data([{"x": np.ones((2, 2), np.int64)}], one_input("N, 2")), batch_size=2)


def test_shape_mismatch_names_input_expected_and_got(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 3, 5, 4), np.float32))
    with pytest.raises(DataError) as info:
        open_data(tmp_path / "x.npy", one_input())
    message = str(info.value)
    assert "'x'" in message and "(N, 3, 4, 4)" in message and "(10, 3, 5, 4)" in message
    with pytest.raises(DataError, match=r"expected shape \(N, 3, 4, 4\).*got \(2, 3, 4\)"):
        open_data(np.zeros((2, 3, 4), np.float32), one_input())
    with pytest.raises(DataError, match=r"'x'.*got \(1, 4, 4, 4\)"):
        collect(open_data([{"x": np.zeros((1, 4, 4, 4), np.float32)}], one_input()), batch_size=1)


def test_symbolic_non_batch_dims_accept_any_size():
    source = open_data(rows(4, (7, 5)), one_input("N, C, 5"))
    assert collect(source, batch_size=2)[0][1]["x"].shape == (2, 7, 5)


# --------------------------------------------------------------------------- check_finite


def test_check_finite_names_batch_and_input():
    feed = {"a": np.zeros((4, 2), np.float32), "b": np.zeros((4, 3), np.float32)}
    check_finite(feed, 3)
    feed["b"][2, 1] = np.nan
    feed["b"][3, 0] = np.inf
    with pytest.raises(DataError, match=r"batch 7: input 'b' contains 2 NaN/Inf.*sample 2"):
        check_finite(feed, 7)
    check_finite({"i": np.array([[1, 2]], np.int64)}, 0)


# --------------------------------------------------------------------------- images

Image = pytest.importorskip("PIL.Image")


def write_png(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def expected_nchw(pixels: np.ndarray) -> np.ndarray:
    """ImageNet normalization of (H, W, 3) uint8 pixels, written out in float64."""
    return ((pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    names = ["b/2.png", "a/10.png", "a/1.png", "c.png", "b/1.jpeg.png"]
    pixels = {n: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for n in names}
    for name, p in pixels.items():
        write_png(tmp_path / "imgs" / name, p)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    order = ["a/1.png", "a/10.png", "b/1.jpeg.png", "b/2.png", "c.png"]
    return tmp_path / "imgs", [pixels[n] for n in order]


def test_image_folder_sorted_order_and_imagenet_normalization(image_folder):
    folder, in_order = image_folder
    # resize 8 == the image side: the resize is the identity and the expectation exact
    source = open_data(folder, one_input("N, 3, 8, 8"), ImageOptions(resize=8))
    assert source.num_samples == 5
    got = collect(source, batch_size=2, keep_partial=True)
    batch = np.concatenate([f["x"] for _, f in got])
    assert batch.dtype == np.float32 and batch.shape == (5, 3, 8, 8)
    expected = np.stack([expected_nchw(p) for p in in_order])
    np.testing.assert_allclose(batch, expected, rtol=0, atol=1e-5)
    assert any("8x8 taken from input 'x'" in n for n in source.summary["notes"])


def test_image_folder_nhwc_is_inferred_and_float16_follows_the_model(image_folder):
    folder, in_order = image_folder
    source = open_data(folder, one_input("N, 8, 8, 3", "float16"), ImageOptions(resize=8))
    batch = np.concatenate([f["x"] for _, f in source.batches(batch_size=5)])
    assert batch.dtype == np.float16 and batch.shape == (5, 8, 8, 3)
    expected = np.stack([expected_nchw(p).transpose(1, 2, 0) for p in in_order])
    np.testing.assert_allclose(batch.astype(np.float64), expected, atol=5e-3)
    assert any("NHWC" in n for n in source.summary["notes"])


def test_image_options_change_the_output(image_folder):
    folder, in_order = image_folder
    options = ImageOptions(mean=(0.5,), std=(0.25,), scale=1.0 / 255.0, layout="NHWC")
    source = open_data(folder, one_input("N, ?, ?, ?"), options)
    # crop is None and the model gives no size: 224 default, resize 256 (= 224 / 0.875)
    assert (source.size, source.resize) == ((224, 224), 256)
    feed = collect(source, batch_size=1)[0][1]["x"]
    assert feed.shape == (1, 224, 224, 3)
    default = open_data(folder, one_input("N, 3, 8, 8"))
    assert (default.size, default.resize) == ((8, 8), 9)  # crop from the model, 8 / 0.875
    small = open_data(folder, one_input("N, 8, 8, 3"), replace(options, resize=8))
    feed = collect(small, batch_size=1)[0][1]["x"]
    np.testing.assert_allclose(feed[0], (in_order[0] / 255.0 - 0.5) / 0.25, atol=1e-5)


def test_center_crop_offsets_follow_torchvision(tmp_path):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)  # H=4, W=7
    tall = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)  # H=6, W=4
    write_png(tmp_path / "i" / "a.png", wide)
    write_png(tmp_path / "i" / "b.png", tall)
    # resize == the shorter side (4): the resize is the identity, only the crop acts
    options = ImageOptions(crop=4, resize=4)
    got = collect(open_data(tmp_path / "i", one_input("N, 3, 4, 4"), options), batch_size=2)
    batch = got[0][1]["x"]
    left = int(round((7 - 4) / 2.0))  # 2: Python rounds half to even, as torchvision does
    top = int(round((6 - 4) / 2.0))
    np.testing.assert_allclose(batch[0], expected_nchw(wide[:, left : left + 4]), atol=1e-5)
    np.testing.assert_allclose(batch[1], expected_nchw(tall[top : top + 4, :]), atol=1e-5)


def test_resize_shrinks_the_shorter_side_before_cropping(tmp_path):
    color = np.array([200, 10, 60], np.uint8)
    write_png(tmp_path / "i" / "solid.png", np.broadcast_to(color, (60, 100, 3)).copy())
    source = open_data(tmp_path / "i", one_input("N, 3, 16, 16"), ImageOptions(resize=20))
    ((_, feed),) = collect(source, batch_size=1)
    expected = expected_nchw(np.broadcast_to(color, (16, 16, 3)))
    np.testing.assert_allclose(feed["x"][0], expected, atol=1e-5)


def test_grayscale_model_and_uint8_model(image_folder):
    folder, in_order = image_folder
    gray = open_data(folder, one_input("N, 1, 8, 8"), ImageOptions(resize=8))
    feed = collect(gray, batch_size=1)[0][1]["x"]
    luma = np.asarray(Image.fromarray(in_order[0]).convert("L"), np.float64)
    np.testing.assert_allclose(feed[0, 0], (luma / 255.0 - 0.449) / 0.226, atol=1e-5)
    raw = open_data(folder, one_input("N, 8, 8, 3", "uint8"), ImageOptions(resize=8))
    feed = collect(raw, batch_size=1)[0][1]["x"]
    assert feed.dtype == np.uint8
    np.testing.assert_array_equal(feed[0], in_order[0])
    assert any("raw pixels" in n for n in raw.summary["notes"])


def test_image_folder_shuffle_and_shards(image_folder):
    folder, in_order = image_folder
    source = open_data(folder, one_input("N, 3, 8, 8"), ImageOptions(resize=8))
    got = collect(source, batch_size=1, shuffle=True, seed=4, shard=(1, 2))
    perm = np.random.default_rng(4).permutation(5)
    assert [i for i, _ in got] == [1, 3]
    for index, feed in got:
        np.testing.assert_allclose(feed["x"][0], expected_nchw(in_order[perm[index]]), atol=1e-5)


def test_image_folder_errors(tmp_path, image_folder):
    folder, _ = image_folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        collect(open_data(tmp_path / "empty", one_input("N, 3, 8, 8")), batch_size=1)
    with pytest.raises(DataError, match="one 4-D input"):
        open_data(folder, specs_of(TWO_INPUTS))
    with pytest.raises(DataError, match=r"expected shape \(N, 3, 8, 8\).*got \(N, 3, 4, 4\)"):
        open_data(folder, one_input("N, 3, 8, 8"), ImageOptions(crop=4))
    with pytest.raises(DataError, match="images feed float or uint8"):
        open_data(folder, one_input("N, 3, 8, 8", "int64"))
    with pytest.raises(DataError, match="resize 4 is smaller than the crop"):
        open_data(folder, one_input("N, 3, 8, 8"), ImageOptions(resize=4))
    (folder / "zz_broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*zz_broken\.png"):
        collect(open_data(folder, one_input("N, 3, 8, 8")), batch_size=6)
