"""The class of issue 19's items 1-2: no output of any writing subcommand destroys an input.

For every subcommand that writes (and the Python API's writers), hypothesis draws an output
path from everything that run reads (model, external data, data file, every image of a data
folder, reader script or module, STATS files), reached directly, through a chain of symbolic
links (absolute or relative), through a hard link, or a link to a hard link; or a special
file (FIFO, character device, directory, a dangling link into a missing folder, a link
loop), possibly behind links. Each must be refused before any work (the work itself is
replaced by a tripwire) with one error line, and every input byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnx_tools as ot
from tests.onnx_tools.helpers import cnn_data, cnn_model, run_cli

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
DATA_KINDS = ("npy", "reader_file", "reader_module", "images")
SPECIALS = ("fifo", "device", "directory", "input_folder", "dangling", "loop")
MODULE = "calibmod19p"


class Tripwire(Exception):
    """Raised by the replaced work functions: the run got past its checks."""


def _trip(*args, **kwargs):
    raise Tripwire("work started although the output should have been refused")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every kind of input, once: an external-data model, data of each kind, STATS files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("world")
    onnx.save_model(cnn_model(), root / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    np.save(root / "calib.npy", cnn_data(n=24))
    reader = "import numpy as np\ndef feeds():\n    yield {'x': np.ones((8, 3, 6, 6), np.float32)}\n"
    (root / "reader.py").write_text(reader)
    (root / f"{MODULE}.py").write_text(reader)
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
    for shard in ("0/2", "1/2"):
        stats = ot.collect(root / "model.onnx", root / "calib.npy", batch_size=8,
                           shard=tuple(int(v) for v in shard.split("/")))
        ot.save_stats(stats, root / f"s{shard[0]}.npz")
    ot.save_stats(ot.collect(root / "model.onnx", root / "calib.npy", batch_size=8),
                  root / "full.npz")
    return root


def _data_arg(root: Path, kind: str) -> tuple[str, list[Path]]:
    """The --data argument of a data kind, and the files the run reads because of it."""
    return {
        "npy": (str(root / "calib.npy"), [root / "calib.npy"]),
        "reader_file": (f"{root / 'reader.py'}:feeds", [root / "reader.py"]),
        "reader_module": (f"{MODULE}:feeds", [root / f"{MODULE}.py"]),
        "images": (str(root / "images"), sorted((root / "images").iterdir())),
    }[kind]


#: What each writer reads besides its data (the data's files are added for those with --data).
def _model_side(root: Path, command: str) -> list[Path]:
    model = [root / "model.onnx", root / "weights.bin"]
    return {"merge -o": [root / "s0.npz", root / "s1.npz"],
            "apply -o": [*model, root / "full.npz"],
            "apply --in-place --report": [*model, root / "full.npz"]}.get(command, model)


def _run(command: str, root: Path, data: str, out: str, scratch: Path, loaded) -> str:
    """Run ``command`` writing to ``out``; return its error line(s).

    ``loaded`` is the model, loaded before the links were made (onnx refuses to load a
    model whose external-data file has a second hard link: the API's recalibrate then fails
    on loading, before its output check, and that refusal counts as well).
    """
    model, fresh = root / "model.onnx", str(scratch / "fresh.onnx")
    cli = {
        "recalibrate -o": ["recalibrate", model, "--data", data, "-o", out],
        "recalibrate --report": ["recalibrate", model, "--data", data, "-o", fresh, "--report", out],
        "collect -o": ["collect", model, "--data", data, "-o", out],
        "merge -o": ["merge", root / "s0.npz", root / "s1.npz", "-o", out],
        "apply -o": ["apply", model, root / "full.npz", "-o", out],
        "apply --in-place --report": ["apply", model, root / "full.npz", "--in-place", "--report", out],
    }
    if command in cli:
        rc, _, err = run_cli(*cli[command])
        assert rc == 1, err
        return err
    try:
        if command == "api recalibrate":
            ot.recalibrate(model, data, output=out, batch_size=8)
        else:
            ot.write_model(loaded.model, out, like=loaded)
    except ot.OutputError as exc:
        return f"bnref-onnx: error: {exc}"
    except ot.ModelError as exc:
        assert command == "api recalibrate" and "hard links" in str(exc), exc
        return f"bnref-onnx: error: {exc}"
    raise AssertionError(f"{command} wrote {out}")


@st.composite
def plans(draw, data_kinds):
    """What the output is (an input by index, or a special file) and how it is reached."""
    special = draw(st.sampled_from((None, *SPECIALS)))
    return {
        "special": special,
        "data": draw(st.sampled_from(data_kinds)),
        "pick": draw(st.integers(0, 100)),
        "hard": special is None and draw(st.booleans()),
        "links": draw(st.integers(0, 3)),
        "relative": draw(st.booleans()),
        "dotted": draw(st.booleans()),
    }


def _special(scratch: Path, kind: str, root: Path) -> Path:
    path = scratch / f"special_{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device" and ROOT_USER:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    elif kind == "device":
        os.symlink(os.devnull, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "input_folder":
        return root / "images"
    elif kind == "dangling":
        os.symlink(scratch / "missing" / "out.onnx", path)
    else:  # a loop of two links
        os.symlink(scratch / "loop_b", path)
        os.symlink(path, scratch / "loop_b")
    return path


def _reach(target: Path, plan: dict, scratch: Path) -> str:
    """The output path: ``target`` behind a hard link and/or a chain of links, maybe dotted."""
    if plan["hard"]:
        os.link(target, scratch / "hard")
        target = scratch / "hard"
    for i in range(plan["links"]):
        link = scratch / f"link{i}"
        pointed = os.path.relpath(target, scratch) if plan["relative"] else str(target)
        os.symlink(pointed, link)
        target = link
    if plan["dotted"]:
        return os.path.join(os.path.dirname(target), ".", "sub", "..", os.path.basename(target))
    return str(target)


def _state(root: Path) -> dict[str, str]:
    """Every file under ``root``: its kind, and its bytes' digest for regular files."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for name in names + dirs:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                out[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                out[path] = oct(stat.S_IFMT(mode))
    return out


COMMANDS = {
    "recalibrate -o": DATA_KINDS, "recalibrate --report": DATA_KINDS, "collect -o": DATA_KINDS,
    "api recalibrate": DATA_KINDS, "merge -o": ("npy",), "apply -o": ("npy",),
    "apply --in-place --report": ("npy",), "api write_model": ("npy",),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None)
@given(data=st.data())
def test_no_output_destroys_an_input(world, command, data, monkeypatch):
    import onnx_tools.cli.commands as commands
    import onnx_tools.pipeline as pipeline

    for module, name in ((commands, "recalibrate"), (commands, "collect"), (commands, "merge_stats"),
                         (commands, "apply_stats"), (pipeline, "collect")):
        monkeypatch.setattr(module, name, _trip)
    monkeypatch.chdir(world)  # where a module:function reader is found
    plan = data.draw(plans(COMMANDS[command]), label="plan")
    scratch = Path(tempfile.mkdtemp(prefix="scratch", dir=world))
    loaded = ot.load_model(world / "model.onnx")
    try:
        data_arg, data_files = _data_arg(world, plan["data"])
        if plan["special"] is None:
            reads = _model_side(world, command)
            reads += data_files if COMMANDS[command] == DATA_KINDS else []
            target = reads[plan["pick"] % len(reads)]
        else:
            target = _special(scratch, plan["special"], world)
        out = _reach(target, plan, scratch)
        before = _state(world)
        err = _run(command, world, data_arg, out, scratch, loaded)
        lines = [ln for ln in err.splitlines() if ln.startswith("bnref-onnx: error")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert _state(world) == before, f"{command} -> {out}: an input or special file changed"
    finally:
        shutil.rmtree(scratch)
