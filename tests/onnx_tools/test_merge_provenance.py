"""Issue 19, item 9: ``merge`` knows what it merges (the data of every shard, and the set).

Shards record the identity of the whole source they read (``data_source``,
:mod:`onnx_tools.data.identity`); shards of other data are refused, never "(complete)".
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

import onnx_tools as ot
from tests.onnx_tools.helpers import cnn_data, listing, run_cli

READER = """
import numpy as np
def feeds():
    rng = np.random.default_rng({seed})
    for _ in range(7):
        yield {{'x': rng.normal(size=(5, 3, 6, 6)).astype(np.float32)}}
"""


def _collect(model, data, out, shard, extra=()):
    rc, _, err = run_cli("collect", model, "--data", data, "-o", out, "--shard", shard,
                         "--batch-size", "4", "-q", *extra)
    assert rc == 0, err


def _merge(tmp_path, *parts):
    return run_cli("merge", *parts, "-o", tmp_path / "m.npz")


def test_shards_of_different_data_files_are_refused(tmp_path, cnn_files):
    # Before: "merged 2 file(s): ... (complete)".
    model, data = cnn_files
    other = tmp_path / "other.npy"
    np.save(other, cnn_data(n=40, seed=7))
    _collect(model, data, tmp_path / "s0.npz", "0/2")
    _collect(model, other, tmp_path / "s1.npz", "1/2")
    before = listing(tmp_path)
    rc, out, err = _merge(tmp_path, tmp_path / "s0.npz", tmp_path / "s1.npz")
    assert rc == 1 and "collected on different data" in err and "complete" not in out
    assert listing(tmp_path) == before


def test_shards_of_one_data_file_merge_complete_and_equal_the_unsharded_run(tmp_path, cnn_files):
    model, data = cnn_files
    for i in range(3):
        _collect(model, data, tmp_path / f"s{i}.npz", f"{i}/3")
    rc, out, err = _merge(tmp_path, *(tmp_path / f"s{i}.npz" for i in (2, 0, 1)))
    assert rc == 0, err
    assert "(complete)" in out
    merged = ot.load_stats(tmp_path / "m.npz")
    whole = ot.collect(model, data, batch_size=4)
    assert merged.data_fingerprint == whole.data_fingerprint
    assert merged.data_source["kind"] == "arrays" and merged.data_source["samples"] == 40


def test_a_copy_of_the_data_is_the_same_data(tmp_path, cnn_files):
    model, data = cnn_files
    copy = tmp_path / "elsewhere.npy"
    copy.write_bytes(data.read_bytes())
    _collect(model, data, tmp_path / "s0.npz", "0/2")
    _collect(model, copy, tmp_path / "s1.npz", "1/2")
    rc, out, err = _merge(tmp_path, tmp_path / "s0.npz", tmp_path / "s1.npz")
    assert rc == 0 and "(complete)" in out, err


def test_reader_shards_identity_is_the_whole_streams_fingerprint(tmp_path, cnn_files, monkeypatch):
    model, _ = cnn_files
    monkeypatch.chdir(tmp_path)
    (tmp_path / "feeds_a19.py").write_text(READER.format(seed=0))
    (tmp_path / "feeds_b19.py").write_text(READER.format(seed=1))
    _collect(model, "feeds_a19.py:feeds", tmp_path / "s0.npz", "0/2")
    _collect(model, "feeds_a19.py:feeds", tmp_path / "s1.npz", "1/2")
    _collect(model, "feeds_b19.py:feeds", tmp_path / "t1.npz", "1/2")
    whole = ot.collect(model, "feeds_a19.py:feeds", batch_size=4)
    s0 = ot.load_stats(tmp_path / "s0.npz")
    assert s0.data_source == {"kind": "stream", "samples": 32, "digest": whole.data_fingerprint}
    rc, out, err = _merge(tmp_path, tmp_path / "s0.npz", tmp_path / "s1.npz")
    assert rc == 0 and "(complete)" in out, err
    assert ot.load_stats(tmp_path / "m.npz").data_fingerprint == whole.data_fingerprint
    rc, out, err = _merge(tmp_path, tmp_path / "s0.npz", tmp_path / "t1.npz")
    assert rc == 1 and "different data" in err


def test_a_reader_that_yields_other_data_each_time_is_refused(tmp_path, cnn_files, monkeypatch):
    model, _ = cnn_files
    monkeypatch.chdir(tmp_path)
    (tmp_path / "feeds_r19.py").write_text(READER.format(seed=None))
    _collect(model, "feeds_r19.py:feeds", tmp_path / "s0.npz", "0/2")
    _collect(model, "feeds_r19.py:feeds", tmp_path / "s1.npz", "1/2")
    rc, out, err = _merge(tmp_path, tmp_path / "s0.npz", tmp_path / "s1.npz")
    assert rc == 1 and "different data" in err


def test_image_folder_shards(tmp_path, cnn_files):
    from PIL import Image

    model, _ = cnn_files
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (8, 8 + (name == "b"), 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png")
    _collect(model, tmp_path / "a", tmp_path / "s0.npz", "0/2")
    _collect(model, tmp_path / "a", tmp_path / "s1.npz", "1/2")
    _collect(model, tmp_path / "b", tmp_path / "t1.npz", "1/2")
    _collect(model, tmp_path / "a", tmp_path / "u1.npz", "1/2", ["--image-mean", "0,0,0"])
    assert _merge(tmp_path, tmp_path / "s0.npz", tmp_path / "s1.npz")[0] == 0
    for other in ("t1", "u1"):  # other images; the same images normalized otherwise
        rc, _, err = _merge(tmp_path, tmp_path / "s0.npz", tmp_path / f"{other}.npz")
        assert rc == 1 and "different data" in err, other


def _as_format_2(path):
    """Rewrite a STATS file as STATS format 2 wrote it (no data_source)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"][()]))
    meta["format_version"] = 2
    del meta["data_source"]
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    assert zipfile.is_zipfile(path)


def test_format_2_shards_are_read_and_merged_with_a_note_never_plain_complete(tmp_path, cnn_files):
    model, data = cnn_files
    for i in range(2):
        _collect(model, data, tmp_path / f"s{i}.npz", f"{i}/2")
        _as_format_2(tmp_path / f"s{i}.npz")
    rc, out, err = _merge(tmp_path, tmp_path / "s0.npz", tmp_path / "s1.npz")
    assert rc == 0, err
    assert "(complete)" not in out and "could not be checked" in out
    merged = ot.load_stats(tmp_path / "m.npz")
    assert any("could not be checked" in n for n in merged.notes)
    assert merged.data_source is None


@pytest.mark.parametrize("version", [1, 99])
def test_other_stats_format_versions_are_refused_clearly(tmp_path, cnn_files, version):
    model, data = cnn_files
    _collect(model, data, tmp_path / "s0.npz", "0/2")
    with np.load(tmp_path / "s0.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"][()]))
    meta["format_version"] = version
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ot.StatsError, match=f"STATS format {version}"):
        ot.load_stats(tmp_path / "old.npz")


def test_an_incomplete_set_is_reported_as_such(tmp_path, cnn_files):
    model, data = cnn_files
    for i in range(3):
        _collect(model, data, tmp_path / f"s{i}.npz", f"{i}/3")
    rc, out, err = _merge(tmp_path, tmp_path / "s0.npz", tmp_path / "s2.npz")
    assert rc == 0, err
    assert "incomplete" in out and "(complete)" not in out
    rc, _, err = run_cli("apply", model, tmp_path / "m.npz", "-o", tmp_path / "o.onnx")
    assert rc == 1 and "merge all shards first" in err
