"""issue 19 items 7 and 12: global flags in either position; CLI messages in CLI terms.

``--quiet``/``--debug`` placed before the command (as ``--help`` shows them) used to be
undone by the subcommand parser's defaults. Each message below used to name an API argument,
suggest a flag the command lacks, or blame the wrong thing.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
from PIL import Image

import onnx_tools as ot
from onnx_tools.cli.parser import build_parser
from tests.onnx_tools.helpers import assert_clean_failure, file_digest, listing, run_cli

SUBCOMMANDS = ["inspect", "recalibrate", "collect", "merge", "apply", "compare"]


def _argv(command: str, model, data, folder) -> list:
    """A successful run of ``command`` (merge and apply read the STATS file ``s.npz``)."""
    return {
        "inspect": ["inspect", model],
        "recalibrate": ["recalibrate", model, "--data", data, "-o", folder / "o.onnx",
                        "--batch-size", "8"],
        "collect": ["collect", model, "--data", data, "-o", folder / "s2.npz",
                    "--batch-size", "8"],
        "merge": ["merge", folder / "s.npz", "-o", folder / "m.npz"],
        "apply": ["apply", model, folder / "s.npz", "-o", folder / "o.onnx"],
        "compare": ["compare", model, model, "--data", data],
    }[command]


@pytest.mark.parametrize("command", SUBCOMMANDS)
@pytest.mark.parametrize("where", ["before", "after"])
def test_global_flags_parse_in_either_position(command, where, tmp_path):
    argv = [str(a) for a in _argv(command, "m.onnx", "x.npy", tmp_path)]
    flags = ["--quiet", "--debug"]
    args = build_parser().parse_args(flags + argv if where == "before" else argv + flags)
    assert args.quiet is True and args.debug is True
    args = build_parser().parse_args(argv)
    assert args.quiet is False and args.debug is False


@pytest.mark.parametrize("command", SUBCOMMANDS)
@pytest.mark.parametrize("where", ["before", "after"])
def test_global_flags_act_in_either_position(command, where, tmp_path, cnn_files):
    model, data = cnn_files
    assert run_cli("collect", model, "--data", data, "-o", tmp_path / "s.npz", "-q",
                   "--batch-size", "8")[0] == 0
    argv = _argv(command, model, data, tmp_path)
    place = (lambda flag, a: [flag, *a]) if where == "before" else (lambda flag, a: [*a, flag])
    code, out, err = run_cli(*place("--quiet", argv))
    assert code == 0, err
    assert "note:" not in err
    if command not in ("inspect", "compare"):  # their output is the result itself
        assert out == ""
    # --debug: a failure shows its traceback.
    broken = [tmp_path / "missing" if a in (model, tmp_path / "s.npz") else a for a in argv]
    code, _, err = run_cli(*place("--debug", broken))
    assert code == 1 and "Traceback" in err, err


# -- item 12: messages name flags, suggest only what the command has, blame the right thing ----


def _api_arguments() -> set[str]:
    names = set()
    for func in (ot.collect, ot.recalibrate, ot.apply_stats, ot.compare_models):
        names |= {n for n, p in inspect.signature(func).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and "_" in n}
    return names | {"min_batch_size", "skip_bad_images", "image_options"}


def _assert_cli_terms(err: str) -> None:
    for name in _api_arguments():
        assert not re.search(rf"(?<![-\w]){name}(?![-\w])", err), f"API name {name!r} in: {err}"


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(("case", "needle"), [
    ("partial-dropped", "--keep-partial"),
    ("too-few-samples", "--keep-partial"),
    ("seed-without-shuffle", "--seed has no effect without --shuffle"),
    ("image-scale-zero", "--image-scale must be a finite number > 0"),
    ("image-mean-nan", "--image-mean must be finite numbers, got (nan, 0.0, 0.0)"),
    ("image-layout", "--image-layout NHWC does not fit input 'x' (N, 3, 6, 6)"),
    ("collect-onto-model", "would destroy the input model"),
    ("apply-calibration-data", "is not a STATS file: it holds x"),
    ("labels-npz", "--labels"),
    ("labels-float", "--labels must be a 1-D array of integer class labels, got 1-D float64"),
    ("include-none", "the --include/--exclude patterns select none"),
    ("include-invalid", "invalid --include/--exclude regular expression"),
    ("provider-cuda", "--provider cuda: "),
])
def test_cli_messages(tmp_path, cnn_files, images, case, needle):
    model, data = cnn_files
    out = tmp_path / "o.onnx"
    np.savez(tmp_path / "calib.npz", x=np.load(data))
    np.savez(tmp_path / "labels.npz", a=np.arange(40) % 5, b=np.arange(40))
    np.save(tmp_path / "labels_f.npy", np.zeros(40))
    rec = ["recalibrate", model, "-o", out]
    args = {
        "partial-dropped": [*rec, "--data", data, "--batch-size", "16"],
        "too-few-samples": [*rec, "--data", data],
        "seed-without-shuffle": [*rec, "--data", data, "--seed", "3"],
        "image-scale-zero": [*rec, "--data", images, "--image-scale", "0"],
        "image-mean-nan": [*rec, "--data", images, "--image-mean", "nan,0,0"],
        "image-layout": [*rec, "--data", images, "--image-layout", "NHWC"],
        "collect-onto-model": ["collect", model, "--data", data, "-o", model],
        "apply-calibration-data": ["apply", model, tmp_path / "calib.npz", "-o", out],
        "labels-npz": ["compare", model, model, "--data", data, "--labels",
                       tmp_path / "labels.npz"],
        "labels-float": ["compare", model, model, "--data", data, "--labels",
                         tmp_path / "labels_f.npy"],
        "include-none": [*rec, "--data", data, "--include", "nothing-matches"],
        "include-invalid": [*rec, "--data", data, "--include", "("],
        "provider-cuda": [*rec, "--data", data, "--provider", "cuda", "--batch-size", "8"],
    }[case]
    if case == "provider-cuda":
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("CUDA is built in here")
    digest, before = file_digest(model), listing(tmp_path)
    code, _, err = run_cli(*args)
    _assert_cli_terms(err)
    assert "--in-place" not in err or case != "collect-onto-model"
    if case == "partial-dropped":  # a note on a run that succeeds
        assert code == 0 and needle in err, err
        return
    assert_clean_failure(code, err, 1, needle, tmp_path, before, model, digest)


def test_api_messages_keep_api_terms(cnn_files, tmp_path):
    model, data = cnn_files
    with pytest.raises(ot.DataError) as info:
        ot.recalibrate(model, data)  # 40 samples, batches of 64
    assert "keep_partial=True" in str(info.value) and "--" not in str(info.value)
    with pytest.raises(ot.OptionError, match=r"^seed has no effect without shuffle"):
        ot.collect(model, data, seed=1)
    np.savez(tmp_path / "calib.npz", x=np.load(data))
    with pytest.raises(ot.StatsError) as info:
        ot.apply_stats(model, tmp_path / "calib.npz")
    assert "the data of collect or recalibrate" in str(info.value)


def test_labels_npz_with_one_array_is_read(tmp_path, cnn_files):
    model, data = cnn_files
    np.savez(tmp_path / "labels.npz", labels=np.arange(40) % 5)
    code, out, err = run_cli("compare", model, model, "--data", data, "--labels",
                             tmp_path / "labels.npz")
    assert code == 0, err
    assert "accuracy A" in out

