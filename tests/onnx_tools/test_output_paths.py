"""Issue 19, items 1-3 and 5: outputs never destroy what the run reads; writes keep modes and links.

Each test failed on the code before the :class:`onnx_tools.reads.RunReads` account (the
comment says how); the property over every writing subcommand is ``test_output_property.py``.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest

import onnx_tools as ot
from tests.onnx_tools.helpers import (
    assert_clean_failure,
    cnn_data,
    cnn_model,
    file_digest,
    listing,
    run_cli,
)

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def save_external(folder, name="ext.onnx", location="weights.bin"):
    """The CNN with every tensor in one external-data file ``location``."""
    path = folder / name
    onnx.save_model(cnn_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def digests(*paths):
    return {str(p): file_digest(p) for p in paths}


@pytest.fixture
def ext_files(tmp_path):
    model = save_external(tmp_path)
    data = tmp_path / "calib.npy"
    np.save(data, cnn_data(n=24))
    return model, tmp_path / "weights.bin", data


# -- item 1: -o onto a file the run reads ---------------------------------------------------------


def test_output_onto_the_reader_script_is_refused(tmp_path, cnn_files):
    # Before: exit 0, the reader script became the model.
    model, _ = cnn_files
    reader = tmp_path / "reader.py"
    reader.write_text("import numpy as np\ndef feeds():\n"
                      "    yield {'x': np.ones((8, 3, 6, 6), np.float32)}\n")
    before, want = listing(tmp_path), digests(model, reader)
    rc, _, err = run_cli("recalibrate", model, "--data", f"{reader}:feeds", "-o", reader,
                         "--batch-size", "8")
    assert_clean_failure(rc, err, 1, "reader module of data", tmp_path, before)
    assert digests(model, reader) == want


def test_output_onto_a_module_readers_file_is_refused(tmp_path, cnn_files, monkeypatch):
    # Before: `module:function` was "not a file", so its module could be overwritten.
    model, _ = cnn_files
    (tmp_path / "calib_mod19.py").write_text(
        "import numpy as np\ndef feeds():\n    yield {'x': np.ones((8, 3, 6, 6), np.float32)}\n")
    monkeypatch.chdir(tmp_path)
    before, want = listing(tmp_path), digests(model, tmp_path / "calib_mod19.py")
    rc, _, err = run_cli("recalibrate", model, "--data", "calib_mod19:feeds", "-o",
                         "calib_mod19.py", "--batch-size", "8")
    assert_clean_failure(rc, err, 1, "reader module", tmp_path, before)
    assert digests(model, tmp_path / "calib_mod19.py") == want


@pytest.mark.parametrize("command", ["recalibrate", "apply"])
def test_output_onto_the_input_models_external_data_is_refused(tmp_path, ext_files, command):
    # Before: exit 0; the input model's weights.bin was overwritten by the new model
    # (`inspect` then showed |mean| 4.6e30 and the next run failed).
    model, weights, data = ext_files
    if command == "apply":
        assert run_cli("collect", model, "--data", data, "-o", tmp_path / "s.npz", "-q",
                       "--batch-size", "8")[0] == 0
        args = ["apply", model, tmp_path / "s.npz"]
    else:
        args = ["recalibrate", model, "--data", data, "--batch-size", "8"]
    before, want = listing(tmp_path), digests(model, weights, data)
    rc, _, err = run_cli(*args, "-o", weights)
    assert_clean_failure(rc, err, 1, "external data of the input model", tmp_path, before)
    assert digests(model, weights, data) == want


def test_output_whose_data_file_is_the_inputs_is_refused(tmp_path):
    # Before: `-o w.onnx` with the input's data file named w.onnx.data: the input lost its weights.
    model = save_external(tmp_path, location="w.onnx.data")
    data = tmp_path / "calib.npy"
    np.save(data, cnn_data(n=24))
    before, want = listing(tmp_path), digests(model, tmp_path / "w.onnx.data")
    rc, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "w.onnx",
                         "--batch-size", "8")
    assert_clean_failure(rc, err, 1, "external data of the output", tmp_path, before)
    assert digests(model, tmp_path / "w.onnx.data") == want


def test_output_onto_an_image_of_the_data_folder_is_refused(tmp_path, cnn_files):
    # Before: a folder was "not a file", so nothing under it was protected.
    from PIL import Image

    model, _ = cnn_files
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    link = tmp_path / "latest.png"
    os.symlink(folder / "2.png", link)
    before, want = listing(tmp_path), digests(model, *sorted(folder.iterdir()))
    for out in (folder / "1.png", link):
        rc, _, err = run_cli("recalibrate", model, "--data", folder, "-o", out, "--batch-size", "2")
        assert_clean_failure(rc, err, 1, "data folder", tmp_path, before)
    assert digests(model, *sorted(folder.iterdir())) == want


def test_hard_link_and_link_chain_to_the_data_are_the_data(tmp_path, cnn_files):
    # Before: a hard link to the data was another file; a chain of links was replaced itself.
    model, data = cnn_files
    os.link(data, tmp_path / "hard.npy")
    os.symlink(tmp_path / "hard.npy", tmp_path / "l1")
    os.symlink("l1", tmp_path / "l2")
    before, want = listing(tmp_path), digests(model, data)
    for out in ("hard.npy", "l1", "l2"):
        rc, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / out,
                             "--batch-size", "8")
        assert_clean_failure(rc, err, 1, "would destroy the data", tmp_path, before)
    assert digests(model, data) == want


# -- item 2: special files -------------------------------------------------------------------------


def _device_stand_in(tmp_path):
    """A character device: a private /dev/null (mknod, as root), else a link to /dev/null."""
    path = tmp_path / "null"
    if ROOT_USER:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        os.symlink(os.devnull, path)
    return path


@pytest.mark.parametrize("kind", ["fifo", "device", "link-to-device"])
def test_special_file_outputs_are_refused(tmp_path, cnn_files, kind):
    # Before (as root): -o /dev/null replaced /dev/null with a regular file; a FIFO was replaced too.
    model, data = cnn_files
    if kind == "fifo":
        out = tmp_path / "pipe"
        os.mkfifo(out)
    else:
        out = _device_stand_in(tmp_path)
        if kind == "link-to-device":
            os.symlink(out, tmp_path / "link")
            out = tmp_path / "link"
    before = listing(tmp_path)
    for args in (["recalibrate", model, "--data", data, "-o", out],
                 ["collect", model, "--data", data, "-o", out],
                 ["recalibrate", model, "--data", data, "-o", tmp_path / "o.onnx", "--report", out]):
        rc, _, err = run_cli(*args, "--batch-size", "8")
        needle = "FIFO" if kind == "fifo" else "device"
        assert_clean_failure(rc, err, 1, needle, tmp_path, before)
    target = os.path.realpath(out)
    mode = os.stat(target).st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)


# -- item 3: links, modes, external data -----------------------------------------------------------


def test_in_place_on_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, cnn_files):
    # Before: the link became a regular file and the checkpoint stayed as it was.
    model, data = cnn_files
    (tmp_path / "ckpt").mkdir()
    target = tmp_path / "ckpt" / "v3.onnx"
    os.replace(model, target)
    os.symlink("ckpt/v3.onnx", tmp_path / "latest.onnx")
    old = file_digest(target)
    rc, _, err = run_cli("recalibrate", tmp_path / "latest.onnx", "--data", data, "--in-place",
                         "--batch-size", "8", "-q")
    assert rc == 0, err
    assert os.readlink(tmp_path / "latest.onnx") == "ckpt/v3.onnx"
    assert file_digest(target) != old
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["v3.onnx"]
    onnx.checker.check_model(str(target))


def test_output_through_a_dangling_link_writes_where_it_points(tmp_path, cnn_files):
    model, data = cnn_files
    os.symlink("new/fixed.onnx", tmp_path / "out.onnx")
    (tmp_path / "new").mkdir()
    rc, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "out.onnx",
                         "--batch-size", "8", "-q")
    assert rc == 0, err
    assert os.path.islink(tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "new" / "fixed.onnx"))


@pytest.mark.parametrize("mode", [0o600, 0o755, 0o640, 0o444])
def test_in_place_keeps_the_mode(tmp_path, cnn_files, mode):
    # Before: 600, 444 and 755 all became 644.
    if mode == 0o444 and not ROOT_USER:
        pytest.skip("a read-only model is refused unless run as root")
    model, data = cnn_files
    os.chmod(model, mode)
    rc, _, err = run_cli("recalibrate", model, "--data", data, "--in-place", "--batch-size", "8",
                         "-q")
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(model).st_mode) == mode


def test_stats_and_report_overwrites_keep_the_mode(tmp_path, cnn_files):
    model, data = cnn_files
    stats, report = tmp_path / "s.npz", tmp_path / "r.json"
    for p in (stats, report):
        p.write_text("old")
        os.chmod(p, 0o600)
    assert run_cli("collect", model, "--data", data, "-o", stats, "--batch-size", "8", "-q")[0] == 0
    assert run_cli("apply", model, stats, "-o", tmp_path / "o.onnx", "--report", report,
                   "-q")[0] == 0
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (stats, report)] == [0o600, 0o600]


@pytest.mark.parametrize("in_place", [False, True])
def test_external_data_gets_the_models_mode(tmp_path, ext_files, in_place):
    # Before: external data was written 600 beside a 644 model, even from a 644 data file.
    model, weights, data = ext_files
    os.chmod(model, 0o644)
    os.chmod(weights, 0o644)
    where = ["--in-place"] if in_place else ["-o", tmp_path / "o.onnx"]
    rc, _, err = run_cli("recalibrate", model, "--data", data, *where, "--batch-size", "8", "-q")
    assert rc == 0, err
    out = model if in_place else tmp_path / "o.onnx"
    data_file = weights if in_place else tmp_path / "o.onnx.data"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(data_file).st_mode) == 0o644
    assert ot.load_model(out).external


# -- item 5: the Python API refuses output + in_place ----------------------------------------------


def test_api_refuses_output_with_in_place(tmp_path, cnn_files):
    # Before: `output` was ignored and the input model overwritten.
    model, data = cnn_files
    before, want = listing(tmp_path), digests(model, data)
    with pytest.raises(ot.OptionError, match="not both"):
        ot.recalibrate(model, data, output=tmp_path / "o.onnx", in_place=True, batch_size=8)
    loaded = ot.load_model(model)
    with pytest.raises(ot.OutputError, match="in_place writes the input model itself"):
        ot.write_model(loaded.model, tmp_path / "o.onnx", like=loaded, in_place=True)
    assert listing(tmp_path) == before
    assert digests(model, data) == want


def test_api_write_model_refuses_the_inputs_data_file(tmp_path, ext_files):
    model, weights, _ = ext_files
    loaded = ot.load_model(model)
    want = digests(model, weights)
    with pytest.raises(ot.OutputError, match="external data of the input model"):
        ot.write_model(loaded.model, weights, like=loaded)
    assert digests(model, weights) == want


def test_in_place_on_a_link_into_another_folder_with_external_data_is_refused(tmp_path, ext_files):
    # onnx reads the data beside the link; writing beside the target would part model and data.
    model, weights, data = ext_files
    (tmp_path / "ckpt").mkdir()
    os.replace(model, tmp_path / "ckpt" / "ext.onnx")
    os.symlink("ckpt/ext.onnx", model)
    before, want = listing(tmp_path), digests(model, weights)
    rc, _, err = run_cli("recalibrate", model, "--data", data, "--in-place", "--batch-size", "8")
    assert_clean_failure(rc, err, 1, "in another folder", tmp_path, before)
    assert digests(model, weights) == want


def test_external_data_is_never_written_through_a_link(tmp_path, ext_files):
    # onnx refuses external data behind a link: such a model could never be loaded again.
    model, weights, data = ext_files
    os.symlink(tmp_path / "elsewhere.bin", tmp_path / "o.onnx.data")
    before = listing(tmp_path)
    rc, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "o.onnx",
                         "--batch-size", "8")
    assert_clean_failure(rc, err, 1, "symbolic link", tmp_path, before)


def test_report_onto_the_new_models_data_file_is_refused(tmp_path, ext_files):
    # The report would overwrite the external data the new model was just written with.
    model, _, data = ext_files
    before = listing(tmp_path)
    rc, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "o.onnx",
                         "--report", tmp_path / "o.onnx.data", "--batch-size", "8")
    assert_clean_failure(rc, err, 1, "same file", tmp_path, before)


def test_dot_dot_after_a_link_is_resolved_as_the_system_does(tmp_path, cnn_files):
    # `a/link/../calib.npy` is the calib.npy beside the link's target, not `a/calib.npy`.
    model, data = cnn_files
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "c").mkdir(parents=True)
    os.replace(data, tmp_path / "b" / "calib.npy")
    data = tmp_path / "b" / "calib.npy"
    os.symlink(tmp_path / "b" / "c", tmp_path / "a" / "link")
    before, want = listing(tmp_path), digests(model, data)
    rc, _, err = run_cli("recalibrate", model, "--data", data, "-o",
                         f"{tmp_path}/a/link/../calib.npy", "--batch-size", "8")
    assert_clean_failure(rc, err, 1, "would destroy the data", tmp_path, before)
    assert digests(model, data) == want


@pytest.mark.skipif(not ROOT_USER, reason="only root can give a file another owner")
def test_in_place_as_root_keeps_the_owner(tmp_path, ext_files):
    model, weights, data = ext_files
    os.chown(model, 1234, 5678)
    rc, _, err = run_cli("recalibrate", model, "--data", data, "--in-place", "--batch-size", "8",
                         "-q")
    assert rc == 0, err
    for path in (model, weights):
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1234, 5678)


def test_a_packaged_module_reader_protects_its_module_and_packages(tmp_path, monkeypatch):
    from onnx_tools.reads import RunReads

    pkg = tmp_path / "pkg19" / "sub"
    pkg.mkdir(parents=True)
    for path in (tmp_path / "pkg19" / "__init__.py", pkg / "__init__.py", pkg / "feeds.py"):
        path.write_text("")
    monkeypatch.chdir(tmp_path)
    reads = RunReads.of(data="pkg19.sub.feeds:batches")
    for path in (tmp_path / "pkg19" / "__init__.py", pkg / "__init__.py", pkg / "feeds.py"):
        assert reads.find(path) is not None, path
    assert RunReads.of(data="no_such_module19:f").files == []
