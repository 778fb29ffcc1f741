"""Tests of onnx_tools.data.images: order, decoding, resize/crop, normalization, layout."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from onnx_tools.data import BatchPlan, ImageOptions, open_data
from onnx_tools.errors import DataError
from tests.onnx_tools.data_helpers import TWO_INPUTS, collect, one_input, specs_of

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])

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
    assert any("8x8 taken from input 'x'" in n for n in source.summary.notes)


def test_image_folder_nhwc_is_inferred_and_float16_follows_the_model(image_folder):
    folder, in_order = image_folder
    source = open_data(folder, one_input("N, 8, 8, 3", "float16"), ImageOptions(resize=8))
    batch = np.concatenate([f["x"] for _, f in source.batches(BatchPlan(batch_size=5))])
    assert batch.dtype == np.float16 and batch.shape == (5, 8, 8, 3)
    expected = np.stack([expected_nchw(p).transpose(1, 2, 0) for p in in_order])
    np.testing.assert_allclose(batch.astype(np.float64), expected, atol=5e-3)
    assert any("NHWC" in n for n in source.summary.notes)


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
    assert any("raw pixels" in n for n in raw.summary.notes)


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
    with pytest.raises(DataError, match=r"1 image file\(s\) .*cannot be used: zz_broken\.png"):
        open_data(folder, one_input("N, 3, 8, 8"))  # when opened, not at its batch
