"""Issue 13's errors as promised: what new users really type, and what must never happen.

Each test here failed on the code before it (a traceback, a swallowed signal, a silent
overwrite, a wrong comparison); the comment on each says what happened then.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_tools as ot
from tests.onnx_tools.helpers import (
    ROOT,
    assert_clean_failure,
    cnn_data,
    cnn_model,
    file_digest,
    listing,
    run_cli,
)

collect_mod = importlib.import_module("onnx_tools.collection")


# -- signals arriving inside onnxruntime or inside the user's reader -----------------------------


class _SignallingSession:
    """Wraps a session; the signal arrives while ``run`` is executing (as from Ctrl-C)."""

    def __init__(self, session, sig, at_call):
        self.session, self.sig, self.at_call, self.calls = session, sig, at_call, 0

    def run(self, names, feed):
        self.calls += 1
        if self.calls == self.at_call:
            os.kill(os.getpid(), self.sig)  # the handler runs inside this call
        return self.session.run(names, feed)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_inside_session_run_is_an_interruption(tmp_path, cnn_files, monkeypatch, sig, code):
    # Before: "batch 1: onnxruntime could not run the model on it ..." and exit 1.
    model, data = cnn_files
    real = collect_mod.make_session
    monkeypatch.setattr(collect_mod, "make_session",
                        lambda m, p: (_SignallingSession(real(m, p)[0], sig, 2), "cpu"))
    before = listing(tmp_path)
    rc, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "o.onnx",
                         "--batch-size", "8")
    assert_clean_failure(rc, err, code, "interrupted by SIG", tmp_path, before)
    assert signal.Signals(sig).name in err and "could not run" not in err


def test_signal_inside_a_reader_is_an_interruption(tmp_path, cnn_files):
    # Before: the reader's error handler turned it into "data reader raised ...".
    model, _ = cnn_files
    reader = tmp_path / "calib_reader.py"
    reader.write_text(
        "import os, signal\nimport numpy as np\n"
        "def batches():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for i in range(5):\n"
        "        if i == 2:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        yield {'x': rng.normal(size=(8, 3, 6, 6)).astype(np.float32)}\n"
    )
    before = listing(tmp_path)
    rc, _, err = run_cli("recalibrate", model, "--data", f"{reader}:batches", "-o",
                         tmp_path / "o.onnx", "--batch-size", "8")
    after = [p for p in listing(tmp_path) if not p.startswith("__pycache__")]
    assert_clean_failure(rc, err, 130, "interrupted by SIGINT", tmp_path,
                         before + [p for p in after if p not in before])
    assert "reader" not in err and not (tmp_path / "o.onnx").exists()


def test_interrupted_is_not_swallowed_by_except_exception():
    assert not issubclass(ot.Interrupted, Exception) and issubclass(ot.Interrupted, KeyboardInterrupt)


# -- no tracebacks ---------------------------------------------------------------------------------


def test_apply_with_an_npy_as_stats_is_one_error_line(tmp_path, cnn_files):
    # Before: TypeError traceback ('numpy.ndarray' object does not support the context manager).
    model, data = cnn_files
    before = listing(tmp_path)
    rc, _, err = run_cli("apply", model, data, "-o", tmp_path / "o.onnx")
    assert_clean_failure(rc, err, 1, "is not a STATS file", tmp_path, before)


def test_compare_models_with_different_inputs(tmp_path, cnn_files):
    model, data = cnn_files
    other = cnn_model()
    other.graph.input[0].name = "image"
    for node in other.graph.node:
        node.input[:] = ["image" if n == "x" else n for n in node.input]
    onnx.save(other, tmp_path / "other.onnx")
    rc, _, err = run_cli("compare", model, tmp_path / "other.onnx", "--data", data)
    assert rc == 1 and "different inputs" in err and "Traceback" not in err
    assert "x float32" in err and "image float32" in err  # it says what differs


def _many_bn_model(path, count=600):
    """A model whose `inspect` prints far more than a pipe buffer holds."""
    nodes, inits = [], []
    prev = "x"
    for i in range(count):
        for role, value in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)):
            inits.append(numpy_helper.from_array(np.full(2, value, np.float32), f"{role}{i}"))
        nodes.append(helper.make_node("BatchNormalization", [prev, f"s{i}", f"b{i}", f"m{i}", f"v{i}"],
                                      [f"y{i}"], name=f"bn{i}"))
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)


def test_stdout_closed_early_exits_quietly(tmp_path):
    # Before: BrokenPipeError traceback when the reader (`| head -1`) went away.
    _many_bn_model(tmp_path / "many.onnx")
    proc = subprocess.Popen([sys.executable, "-m", "onnx_tools", "inspect", str(tmp_path / "many.onnx")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=60)
    assert first.startswith(b"bn0")
    assert err == "" and rc == 128 + signal.SIGPIPE


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_stdout_is_one_error_line(tmp_path):
    _many_bn_model(tmp_path / "many.onnx", count=3)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "onnx_tools", "inspect", str(tmp_path / "many.onnx")],
                              cwd=ROOT, stdout=full, stderr=subprocess.PIPE, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and "Exception ignored" not in err
    assert err.strip() == "bnref-onnx: error: cannot write to standard output: No space left on device"


# -- collisions among outputs and inputs -------------------------------------------------------------


@pytest.mark.parametrize("case", ["output-is-report", "output-is-data", "report-is-data",
                                  "report-is-model", "stats-is-data", "merge-into-input",
                                  "in-place-report-is-model"])
def test_outputs_never_overwrite_inputs_or_each_other(tmp_path, cnn_files, case):
    # Before: each of these ran, and the later write destroyed the earlier file or the input.
    model, data = cnn_files
    out, stats = tmp_path / "o.onnx", tmp_path / "s.npz"
    if case == "merge-into-input":
        assert run_cli("collect", model, "--data", data, "-o", stats, "--quiet", "--batch-size", "8")[0] == 0
    args = {
        "output-is-report": ["recalibrate", model, "--data", data, "-o", out, "--report", out],
        "output-is-data": ["recalibrate", model, "--data", data, "-o", data],
        "report-is-data": ["recalibrate", model, "--data", data, "-o", out, "--report", data],
        "report-is-model": ["recalibrate", model, "--data", data, "-o", out, "--report", model],
        "stats-is-data": ["collect", model, "--data", data, "-o", data],
        "merge-into-input": ["merge", stats, "-o", stats],
        "in-place-report-is-model": ["recalibrate", model, "--data", data, "--in-place",
                                     "--report", model],
    }[case]
    digests = {p: file_digest(p) for p in (model, data, *([stats] if stats.exists() else []))}
    before = listing(tmp_path)
    rc, _, err = run_cli(*args, "--batch-size", "8") if args[0] != "merge" else run_cli(*args)
    assert_clean_failure(rc, err, 1, "same file" if case == "output-is-report" else "destroy",
                         tmp_path, before)
    assert {p: file_digest(p) for p in digests} == digests


def test_api_refuses_output_equal_to_data(tmp_path, cnn_files):
    model, data = cnn_files
    digest = file_digest(data)
    with pytest.raises(ot.OutputError, match="data"):
        ot.recalibrate(model, data, output=data, batch_size=8)
    assert file_digest(data) == digest


# -- compare ----------------------------------------------------------------------------------------------


def _two_output_model():
    """CNN with a second output: the feature map before pooling."""
    m = cnn_model()
    m.graph.output.append(helper.make_tensor_value_info("r2", TensorProto.FLOAT, None))
    return m


def test_compare_compares_every_output_and_top1_only_for_classifiers(tmp_path):
    # Before: only the first output was compared, and argmax over axis 1 of a feature map was
    # reported as "top-1 agreement".
    a = _two_output_model()
    b = _two_output_model()
    w = numpy_helper.to_array(b.graph.initializer[0]) * 1.01  # perturb w1: both outputs change
    b.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
    x = cnn_data(20)
    res = ot.compare_models(a, b, x, provider="cpu", batch_size=8)
    by_name = {o.output_a: o for o in res.outputs}
    assert set(by_name) == {"y", "r2"}
    from onnx.reference import ReferenceEvaluator

    ya, ra = ReferenceEvaluator(a).run(["y", "r2"], {"x": x})
    yb, rb = ReferenceEvaluator(b).run(["y", "r2"], {"x": x})
    assert by_name["r2"].max_abs_diff == pytest.approx(np.max(np.abs(ra - rb)), rel=1e-4)
    assert by_name["y"].max_abs_diff == pytest.approx(np.max(np.abs(ya - yb)), rel=1e-4)
    assert res.max_abs_diff == max(o.max_abs_diff for o in res.outputs)
    assert by_name["r2"].top1_agreement is None and not by_name["r2"].classifier
    assert by_name["y"].top1_agreement == pytest.approx(np.mean(ya.argmax(1) == yb.argmax(1)))
    assert res.top1_agreement == by_name["y"].top1_agreement


def test_compare_labels_follow_num_samples(tmp_path, cnn_files):
    # Before: --num-samples 16 with 40 labels was refused ("labels hold 40 entries for 16").
    model, data = cnn_files
    labels = tmp_path / "labels.npy"
    lab = np.arange(40) % 5
    np.save(labels, lab)
    code, out, err = run_cli("compare", model, model, "--data", data, "--labels", labels,
                             "--num-samples", "16", "--json")
    assert code == 0, err
    res = json.loads(out)
    from onnx.reference import ReferenceEvaluator

    y = ReferenceEvaluator(cnn_model()).run(None, {"x": cnn_data()[:16]})[0]
    assert res["num_samples"] == 16
    assert res["accuracy_a"] == pytest.approx(np.mean(y.argmax(1) == lab[:16]))


# -- options ----------------------------------------------------------------------------------------------


def test_bessel_with_mean_of_variances_is_refused(tmp_path, cnn_files):
    # Before: accepted and silently ignored.
    model, data = cnn_files
    rc, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "o.onnx",
                         "--estimator", "mean_of_variances", "--bessel")
    assert rc == 1 and "bessel applies only to the population estimator" in err
    with pytest.raises(ValueError, match="bessel"):
        ot.collect(model, data, estimator="mean_of_variances", bessel=True)


def test_unknown_keyword_names_the_function_called(cnn_files):
    # Before: "collect() got an unexpected keyword argument" from inside recalibrate.
    model, data = cnn_files
    with pytest.raises(TypeError, match=r"^recalibrate\(\) got an unexpected keyword argument "
                                        r"'batchsize'; did you mean 'batch_size'\?"):
        ot.recalibrate(model, data, batchsize=8)


@pytest.mark.parametrize(("exc", "base"), [
    (ot.ModelError, ValueError), (ot.DataError, ValueError), (ot.StatsError, ValueError),
    (ot.OptionError, ValueError), (ot.OutputError, OSError), (ot.ProviderError, RuntimeError),
])
def test_api_errors_are_builtin_kinds(exc, base):
    assert issubclass(exc, base) and issubclass(exc, ot.BnrefOnnxError)


def test_api_error_messages_name_no_cli_flag(tmp_path, cnn_files):
    model, data = cnn_files
    with pytest.raises(ValueError) as info:
        ot.recalibrate(model, data, include="no-such-bn")
    assert "--" not in str(info.value)
    with pytest.raises(ValueError) as info:
        ot.recalibrate(model, data, include="(")
    assert "--" not in str(info.value)


# -- the command line itself --------------------------------------------------------------------------------


SUBCOMMANDS = ["inspect", "recalibrate", "collect", "merge", "apply", "compare"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_has_a_description_and_an_example(command):
    code, out, _ = run_cli(command, "--help")
    assert code == 0
    body = out.split("\n\n")
    assert len(body[1].split()) >= 8, "no description paragraph after the usage"
    assert "examples:" in out and f"bnref-onnx {command} " in out.split("examples:")[1]


def test_misspelled_option_prints_that_subcommands_usage_and_a_hint(cnn_files, tmp_path):
    model, data = cnn_files
    code, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "o.onnx", "--batch", "8")
    assert code == 2
    assert err.startswith("usage: bnref-onnx recalibrate")
    assert "unrecognized arguments: --batch 8" in err and "did you mean --batch-size?" in err


def test_no_silent_prefix_matching(cnn_files, tmp_path):
    # Before: `--out X` was taken as `--output X` (argparse's allow_abbrev).
    model, data = cnn_files
    code, _, err = run_cli("recalibrate", model, "--data", data, "--out", tmp_path / "o.onnx")
    assert code == 2 and not (tmp_path / "o.onnx").exists()


# -- notes -----------------------------------------------------------------------------------------------------


def _static_batch_model(path, batch=4):
    m = cnn_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(m, path)


def test_small_static_batch_warning_does_not_advise_batch_size(tmp_path, cnn_files):
    _, data = cnn_files
    _static_batch_model(tmp_path / "s.onnx")
    rc, _, err = run_cli("recalibrate", tmp_path / "s.onnx", "--data", data, "-o", tmp_path / "o.onnx")
    assert rc == 0, err
    warning = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "batch size 4" in warning[0]
    assert "--batch-size" not in warning[0] and "larger batch size" not in warning[0]
    assert "fixed" in warning[0]


def test_notes_are_printed_once(tmp_path, cnn_files):
    # Before: the static-batch and keep-partial notes came twice (as they happened, and at the end).
    _, data = cnn_files
    _static_batch_model(tmp_path / "s.onnx")
    np.save(tmp_path / "d64.npy", cnn_data().astype(np.float64))
    rc, _, err = run_cli("recalibrate", tmp_path / "s.onnx", "--data", tmp_path / "d64.npy",
                         "-o", tmp_path / "o.onnx", "--keep-partial")
    assert rc == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("bnref-onnx: note:")]
    assert len(notes) == len(set(notes)), err
    assert any("static batch dimension" in n for n in notes)
    assert any("float64 -> float32" in n for n in notes)


def test_apply_can_override_a_bessel_collection_with_mean_of_variances(cnn_files):
    model, data = cnn_files
    stats = ot.collect(model, data, batch_size=8, bessel=True, provider="cpu")
    applied = ot.apply_stats(model, stats, estimator="mean_of_variances")
    assert applied.report.meta["estimator"] == "mean_of_variances" and not applied.report.meta["bessel"]
    with pytest.raises(ValueError, match="bessel"):
        ot.apply_stats(model, stats, estimator="mean_of_variances", bessel=True)
