"""Bad input: one-line error, exit status, nothing written, input untouched; interruptions."""

from __future__ import annotations

import importlib
import os
import signal

import numpy as np
import onnx
import pytest

from onnx_tools import outputs
from tests.onnx_tools.helpers import assert_clean_failure, cnn_data, file_digest, listing, run_cli

# ``onnx_tools.collect`` the attribute is the function; the hooks live in the module.
collect_mod = importlib.import_module("onnx_tools.collection")


def _expect_error(tmp_path, model_path, args, needle, code=1):
    before = listing(tmp_path)
    digest = file_digest(model_path) if os.path.isfile(model_path) else None
    out = tmp_path / "out.onnx"
    rc, _, err = run_cli(*args, "-o", out) if "-o" not in args else run_cli(*args)
    assert_clean_failure(rc, err, code, needle, tmp_path, before, model_path if digest else None, digest)


def test_nan_in_data_names_the_batch(tmp_path, cnn_files):
    model, _ = cnn_files
    x = cnn_data()
    x[21, 0, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", tmp_path / "nan.npy",
                                    "--batch-size", "8"], "batch 2")


def test_inf_in_data(tmp_path, cnn_files):
    model, _ = cnn_files
    x = cnn_data()
    x[3, 1, 0, 0] = np.inf
    np.save(tmp_path / "inf.npy", x)
    _expect_error(tmp_path, model, ["collect", model, "--data", tmp_path / "inf.npy",
                                    "--batch-size", "8"], "NaN/Inf")


def test_shape_mismatch(tmp_path, cnn_files):
    model, _ = cnn_files
    np.save(tmp_path / "bad.npy", np.zeros((16, 3, 7, 7), np.float32))
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", tmp_path / "bad.npy",
                                    "--batch-size", "8"], "expected shape")


def test_dtype_mismatch(tmp_path, cnn_files):
    model, _ = cnn_files
    np.save(tmp_path / "int.npy", np.zeros((16, 3, 6, 6), np.int32))
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", tmp_path / "int.npy",
                                    "--batch-size", "8"], "expects float32")


def test_no_samples(tmp_path, cnn_files):
    model, _ = cnn_files
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 6, 6), np.float32))
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", tmp_path / "empty.npy"],
                  "no samples")


def test_fewer_samples_than_batch(tmp_path, cnn_files):
    model, data = cnn_files
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", data, "--batch-size", "64"],
                  "fewer than the batch size")


def test_missing_model(tmp_path, cnn_files):
    _, data = cnn_files
    _expect_error(tmp_path, tmp_path / "nope.onnx",
                  ["recalibrate", tmp_path / "nope.onnx", "--data", data], "not found")


def test_corrupt_model(tmp_path, cnn_files):
    model, data = cnn_files
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model.read_bytes()[: len(model.read_bytes()) // 2])
    _expect_error(tmp_path, bad, ["recalibrate", bad, "--data", data], "bad.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model at all")
    rc, _, err = run_cli("inspect", junk)
    assert rc == 1 and "junk.onnx" in err and "Traceback" not in err


def test_model_without_bn(tmp_path, cnn_files):
    _, data = cnn_files
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[N,3,6,6] x) => (float[N,3,6,6] y) { y = Relu(x) }""")
    p = tmp_path / "nobn.onnx"
    onnx.save(m, p)
    _expect_error(tmp_path, p, ["recalibrate", p, "--data", data, "--batch-size", "8"],
                  "no BatchNormalization")


def test_unwritable_output(tmp_path, cnn_files):
    model, data = cnn_files
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", data, "--batch-size", "8",
                                    "-o", tmp_path / "missing-dir" / "o.onnx"], "does not exist")
    (tmp_path / "adir").mkdir()
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", data, "--batch-size", "8",
                                    "-o", tmp_path / "adir"], "directory")
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", data, "--batch-size", "8",
                                    "-o", tmp_path / "o.onnx", "--report",
                                    tmp_path / "nodir" / "r.json"], "report folder")


def test_reader_that_raises(tmp_path, cnn_files):
    model, _ = cnn_files
    reader = tmp_path / "reader.py"
    reader.write_text(
        "import numpy as np\n"
        "def feeds():\n"
        "    for i in range(10):\n"
        "        if i == 3:\n"
        "            raise RuntimeError('camera unplugged')\n"
        "        yield {'x': np.zeros((4, 3, 6, 6), np.float32) + i}\n"
    )
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", f"{reader}:feeds",
                                    "--batch-size", "4"], "camera unplugged")


def test_batch_too_small_for_bn_after_gemm(tmp_path, cnn_files):
    model, data = cnn_files
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", data, "--batch-size", "1"],
                  "at least 2 values per channel")


def test_provider_cuda_without_cuda(tmp_path, cnn_files):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    model, data = cnn_files
    _expect_error(tmp_path, model, ["recalibrate", model, "--data", data, "--batch-size", "8",
                                    "--provider", "cuda"], "CUDA")


def test_usage_errors_exit_2(tmp_path, cnn_files):
    model, data = cnn_files
    before = listing(tmp_path)
    x, s = tmp_path / "x", tmp_path / "s.npz"
    assert run_cli("recalibrate", model, "--data", data)[0] == 2  # no --output/--in-place
    assert run_cli("recalibrate", model, "--data", data, "-o", x, "--in-place")[0] == 2
    assert run_cli("collect", model, "--data", data, "-o", s, "--shard", "3/2")[0] == 2
    assert run_cli("recalibrate", model, "--data", data, "-o", x, "--batch-size", "0")[0] == 2
    assert run_cli("frobnicate")[0] == 2
    assert listing(tmp_path) == before


def test_debug_shows_traceback(tmp_path, cnn_files):
    _, data = cnn_files
    rc, _, err = run_cli("recalibrate", tmp_path / "nope.onnx", "--data", data, "-o",
                         tmp_path / "o.onnx", "--debug")
    assert rc == 1 and "Traceback" in err


def test_stats_file_errors(tmp_path, cnn_files):
    model, _ = cnn_files
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK not really")
    _expect_error(tmp_path, model, ["apply", model, junk], "STATS")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    _expect_error(tmp_path, model, ["apply", model, tmp_path / "other.npz"], "STATS")
    _expect_error(tmp_path, model, ["merge", tmp_path / "missing.npz", "-o",
                                    tmp_path / "m.npz"], "not found")


# -- interruptions, via injection points rather than timing ------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_between_batches(tmp_path, cnn_files, monkeypatch, sig, code):
    model, data = cnn_files
    calls = []

    def hook(index):
        calls.append(index)
        if index == 1:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(collect_mod, "between_batches", hook)
    handlers = {sg: signal.getsignal(sg) for sg in (signal.SIGINT, signal.SIGTERM)}
    before = listing(tmp_path)
    rc, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "o.onnx",
                         "--batch-size", "8")
    assert rc == code and "interrupted" in err
    assert calls == [0, 1]
    assert listing(tmp_path) == before
    assert {sg: signal.getsignal(sg) for sg in handlers} == handlers  # both handlers restored


@pytest.mark.parametrize("command", ["recalibrate", "in-place", "collect"])
def test_interrupt_just_before_rename_leaves_nothing(tmp_path, cnn_files, monkeypatch, command):
    model, data = cnn_files
    digest = file_digest(model)
    seen = []

    def hook(path):
        seen.append(path)
        # the new file is complete (written and checked) but not yet in place
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(outputs, "before_replace", hook)
    before = listing(tmp_path)
    if command == "collect":
        args = ["collect", model, "--data", data, "-o", tmp_path / "s.npz"]
    elif command == "in-place":
        args = ["recalibrate", model, "--data", data, "--in-place"]
    else:
        args = ["recalibrate", model, "--data", data, "-o", tmp_path / "o.onnx"]
    rc, _, _ = run_cli(*args, "--batch-size", "8")
    assert rc == 130 and seen
    assert listing(tmp_path) == before
    assert file_digest(model) == digest
