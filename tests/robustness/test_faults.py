"""Fault injection: whatever goes wrong around bnref-onnx, nothing is lost.

Each case checks the same four promises: a one-line error naming the problem, a non-zero exit,
no partial output (the folder listing is unchanged, no temporary files), and the input model
byte-for-byte untouched. Faults come through injection points and patched I/O, never timing.
(``tests/onnx_tools/test_errors.py`` covers bad data, bad models, a reader failing halfway,
signals between batches and just before the final rename; this file covers faults while bytes
are being written.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_tools import outputs
from tests.onnx_tools.helpers import (
    assert_clean_failure,
    cnn_data,
    cnn_model,
    file_digest,
    listing,
    run_cli,
    write_cnn_files,
)


@pytest.fixture
def files(tmp_path):
    return write_cnn_files(tmp_path, n=32)


def _half_write_then(action):
    """A replacement for onnx.save_model that writes half the bytes, then calls ``action``."""

    def fake_save(proto, f, *args, **kwargs):
        data = proto.SerializeToString()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            action()

    return fake_save


def _raise_oserror(code):
    def action():
        raise OSError(code, os.strerror(code))

    return action


@pytest.mark.parametrize("command", ["recalibrate", "in-place"])
def test_disk_full_while_writing_model(files, monkeypatch, command):
    model, data = files
    folder = model.parent
    before, digest = listing(folder), file_digest(model)
    monkeypatch.setattr(onnx, "save_model", _half_write_then(_raise_oserror(errno.ENOSPC)))
    out = ["--in-place"] if command == "in-place" else ["-o", folder / "out.onnx"]
    rc, _, err = run_cli("recalibrate", model, "--data", data, "--batch-size", "8", *out)
    assert_clean_failure(rc, err, 1, "No space left on device", folder, before, model, digest)


def test_disk_full_while_writing_stats(files, monkeypatch):
    model, data = files
    folder = model.parent
    before, digest = listing(folder), file_digest(model)
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            self.fh.write(b[: len(b) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullFile(real_fdopen(fd, mode, *a, **k)))
    rc, _, err = run_cli("collect", model, "--data", data, "--batch-size", "8", "-o", folder / "s.npz")
    assert_clean_failure(rc, err, 1, "No space left on device", folder, before, model, digest)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_writing_model(files, monkeypatch, sig, code):
    model, data = files
    folder = model.parent
    before, digest = listing(folder), file_digest(model)
    monkeypatch.setattr(onnx, "save_model", _half_write_then(lambda: os.kill(os.getpid(), sig)))
    rc, _, err = run_cli("recalibrate", model, "--data", data, "--batch-size", "8", "-o", folder / "o.onnx")
    assert_clean_failure(rc, err, code, "interrupted", folder, before, model, digest)


def test_output_folder_not_writable(files, monkeypatch):
    # As root, permission bits do not stop a write; inject the EACCES the OS would raise.
    model, data = files
    folder = model.parent
    before, digest = listing(folder), file_digest(model)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", denied)
    monkeypatch.setattr(outputs.tempfile, "mkstemp", denied)
    for args in (["recalibrate", "-o", folder / "o.onnx"], ["collect", "-o", folder / "s.npz"]):
        rc, _, err = run_cli(args[0], model, "--data", data, "--batch-size", "8", *args[1:])
        assert_clean_failure(rc, err, 1, "Permission denied", folder, before, model, digest)


def test_corrupt_external_data_file(tmp_path):
    model_path = tmp_path / "ext.onnx"
    onnx.save(
        cnn_model(),
        model_path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    data = tmp_path / "calib.npy"
    np.save(data, cnn_data(n=16))
    ext = tmp_path / "ext.onnx.data"
    ext.write_bytes(ext.read_bytes()[:100])  # truncated: offsets point past the end
    before, digest, ext_digest = listing(tmp_path), file_digest(model_path), file_digest(ext)
    rc, _, err = run_cli(
        "recalibrate", model_path, "--data", data, "--batch-size", "8", "-o", tmp_path / "o.onnx"
    )
    assert_clean_failure(rc, err, 1, "ext.onnx", tmp_path, before, model_path, digest)
    assert file_digest(ext) == ext_digest


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
    except OSError:
        return False
    return r.returncode == 0


def test_really_full_disk(files, tmp_path):
    """A real 64 KiB tmpfs where the machine allows mounting one (root, as in CI here)."""
    model, data = files
    small = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(small, "64k"):
        pytest.skip("cannot mount a tmpfs here; the patched-write tests cover disk full")
    try:
        big = onnx.load(model)
        big.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(40_000, np.float32), "padding"))
        big_path = tmp_path / "big.onnx"
        onnx.save(big, big_path)  # ~160 KB: cannot fit in 64 KiB
        digest = file_digest(big_path)
        rc, _, err = run_cli(
            "recalibrate", big_path, "--data", data, "--batch-size", "8", "-o", small / "o.onnx"
        )
        assert rc == 1 and "No space left on device" in err and "Traceback" not in err, err
        assert list(small.iterdir()) == []
        assert file_digest(big_path) == digest
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize("command", ["recalibrate", "apply"])
def test_output_naming_the_input_is_refused(files, command):
    # Found by hand: `-o model.onnx` on model.onnx silently overwrote the input.
    model, data = files
    folder = model.parent
    if command == "apply":
        rc, _, err = run_cli("collect", model, "--data", data, "--batch-size", "8", "-o", folder / "s.npz")
        assert rc == 0, err
        args = ["apply", model, folder / "s.npz"]
    else:
        args = ["recalibrate", model, "--data", data, "--batch-size", "8"]
    before, digest = listing(folder), file_digest(model)
    rc, _, err = run_cli(*args, "-o", folder / "." / model.name)
    assert_clean_failure(rc, err, 1, "is the input model; overwrite it only in place", folder, before, model, digest)


def test_api_refuses_to_overwrite_input_without_in_place(files):
    import onnx_tools as ot

    model, data = files
    digest = file_digest(model)
    with pytest.raises(ot.OutputError, match="is the input model"):
        ot.recalibrate(str(model), str(data), batch_size=8, output=str(model))
    assert file_digest(model) == digest


def test_signal_between_data_and_model_rename_is_held(tmp_path, monkeypatch):
    # --in-place with external data renames two files; an interrupt between them would pair the
    # old model with the new data. The signal is held until both are in place.
    model_path = tmp_path / "ext.onnx"
    onnx.save(
        cnn_model(),
        model_path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    data = tmp_path / "calib.npy"
    np.save(data, cnn_data(n=16))
    real_replace = os.replace
    calls = []

    def replace_then_signal(src, dst):
        calls.append(os.path.basename(dst))
        if len(calls) == 1:  # the data file: a Ctrl-C arrives right here
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace_then_signal)
    rc, _, err = run_cli("recalibrate", model_path, "--data", data, "--batch-size", "8", "--in-place")
    assert rc == 130 and "interrupted" in err
    assert calls == ["ext.onnx.data", "ext.onnx"]  # both renames happened before the interrupt
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    written = onnx.load(model_path)  # model and data file agree
    onnx.checker.check_model(written)
    assert any(p.key.startswith("bnref") for p in written.metadata_props)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "ext.onnx", "ext.onnx.data"]
