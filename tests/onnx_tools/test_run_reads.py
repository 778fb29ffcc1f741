"""What a run reads is gathered once: the CLI parses the model once, folders are walked once.

Both were done twice or more before: the CLI's output check parsed the model for its
external-data files and the API parsed it again; :meth:`RunReads.find` walked every input
folder again for each output (and for the external data a model write checks after the work).
"""

from __future__ import annotations

import os
import traceback

import numpy as np
import onnx
import pytest

from onnx_tools.reads import RunReads
from tests.onnx_tools.helpers import cnn_model, file_digest, run_cli, write_cnn_files


@pytest.mark.parametrize("command", ["recalibrate", "collect", "apply"])
def test_cli_parses_the_model_once(tmp_path, monkeypatch, command):
    model = tmp_path / "ext.onnx"
    onnx.save_model(cnn_model(), model, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    _, data = write_cnn_files(tmp_path)
    stats = tmp_path / "s.npz"
    assert run_cli("collect", model, "--data", data, "-o", stats, "--batch-size", "8",
                   "--quiet")[0] == 0
    loads = []
    real = onnx.load_model
    monkeypatch.setattr(onnx, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(onnx, "load_model", onnx.load)
    source = stats if command == "apply" else None
    args = [command, model, *([source] if source else ["--data", data, "--batch-size", "8"]),
            "-o", tmp_path / ("out.npz" if command == "collect" else "out.onnx"), "--quiet"]
    rc, _, err = run_cli(*args)
    assert rc == 0, err
    assert [os.fspath(p) for p in loads if os.fspath(p) == os.fspath(model)] == [str(model)]


def test_find_walks_each_input_folder_once(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"x")
    os.link(folder / "3.png", tmp_path / "hard")
    reads = RunReads.of(data=folder)
    walks = []
    real = os.walk
    monkeypatch.setattr(os, "walk", lambda *a, **k: walks.append(a[0]) or real(*a, **k))
    found = reads.find(tmp_path / "hard")
    assert found is not None and found.path == str(folder / "3.png")
    assert reads.find(tmp_path / "other") is None  # missing: nothing to look up
    (tmp_path / "other").write_bytes(b"y")
    assert reads.find(tmp_path / "other") is None
    assert len(walks) == 1
    reads.add_file("labels", tmp_path / "other")  # the account grows: looked at again
    assert reads.find(tmp_path / "other").what == "labels"
    assert len(walks) == 2


def test_cli_in_place_on_an_image_folder_walks_it_once(tmp_path, monkeypatch):
    """The CLI's checked in-place target is what the API writes: not checked (walked) again."""
    from PIL import Image

    model = tmp_path / "ext.onnx"
    onnx.save_model(cnn_model(), model, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    walks = []
    real = os.walk

    def walk(*args, **kwargs):
        walks.append(traceback.extract_stack(limit=2)[0].filename)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "walk", walk)
    before = file_digest(model)
    rc, _, err = run_cli("recalibrate", model, "--data", folder, "--in-place", "--batch-size", "4",
                         "--quiet")
    assert rc == 0, err
    assert file_digest(model) != before
    assert sum(name.endswith(os.path.join("onnx_tools", "reads.py")) for name in walks) == 1


def test_api_in_place_takes_only_the_checked_path_of_its_own_model(tmp_path, monkeypatch):
    """An in-place OutputPath of another file is refused before any work, as a plain path is."""
    import onnx_tools as ot
    import onnx_tools.pipeline as pipeline

    model, data = write_cnn_files(tmp_path)
    other = tmp_path / "other.onnx"
    onnx.save(cnn_model(seed=1), other)
    checked = ot.check_output(other, in_place=True)

    def work(*args, **kwargs):
        raise RuntimeError("work started")

    monkeypatch.setattr(pipeline, "collect", work)
    with pytest.raises(ot.OptionError, match="not both"):
        ot.recalibrate(model, data, output=checked, in_place=True, batch_size=8)
    own = ot.check_output(model, in_place=True, input_path=model)
    with pytest.raises(RuntimeError, match="work started"):  # its own file: accepted
        ot.recalibrate(model, data, output=own, in_place=True, batch_size=8)
