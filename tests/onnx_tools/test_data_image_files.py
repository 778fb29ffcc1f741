"""Tests of onnx_tools.data images as users have them (issue 13): bit depths, modes, EXIF,
hidden and broken files, the default size note.

Every file is written by the test itself (pillow, or PNG bytes put together with zlib/struct),
and the expected values come from the pixel arrays written, never from the loader's code.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import onnx
import pytest

from onnx_tools.data import ImageOptions, open_data
from onnx_tools.errors import DataError
from tests.onnx_tools.data_helpers import collect, one_input

Image = pytest.importorskip("PIL.Image")

GRAY = (0.449, 0.226)
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def png_bytes(pixels: np.ndarray, bit_depth: int, color_type: int) -> bytes:
    """A PNG written by hand: ``pixels`` (H, W[, C]) as big-endian samples, filter 0."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    height, width = pixels.shape[:2]
    sample = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\0" + row.astype(sample).tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def folder_with(tmp_path, files: dict[str, bytes | Image.Image]):
    folder = tmp_path / "imgs"
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path)
    return folder


def only_feed(folder, dims="N, 1, 5, 5", options=None, dtype="float"):
    options = options or ImageOptions(crop=5, resize=5)  # resize 5: the identity here
    source = open_data(folder, one_input(dims, dtype), options)
    ((_, feed),) = collect(source, batch_size=source.num_samples)
    return source, feed["x"]


# --------------------------------------------------------------------------- bit depths


def test_16_bit_gray_png_is_scaled_by_its_bit_depth_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (5, 5)).astype(np.uint16)
    folder = folder_with(tmp_path, {"a.png": png_bytes(values, 16, 0)})
    assert Image.open(folder / "a.png").mode == "I;16"  # what pillow makes of it
    source, x = only_feed(folder)
    expected = (values / 65535.0 - GRAY[0]) / GRAY[1]  # the same [0, 1] as 8-bit / 255
    np.testing.assert_allclose(x[0, 0], expected, atol=1e-5)
    assert any("16-bit" in n and "65535" in n for n in source.summary.notes)
    # an RGB model repeats the gray channel; a uint8 model gets the 8-bit equivalent
    _, rgb = only_feed(folder, "N, 3, 5, 5")
    for c in range(3):
        np.testing.assert_allclose(rgb[0, c], (values / 65535.0 - MEAN[c]) / STD[c], atol=1e-5)
    _, raw = only_feed(folder, "N, 5, 5, 1", dtype="uint8")
    np.testing.assert_array_equal(raw[0, :, :, 0], np.rint(values * (255 / 65535)))


def test_16_bit_tiffs_and_the_scale_option(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (5, 5)).astype(np.uint16)
    folder = folder_with(tmp_path, {
        "le.tif": Image.fromarray(values), "be.tif": Image.fromarray(values.astype(">u2")),
    })
    assert {Image.open(p).mode for p in folder.iterdir()} == {"I;16", "I;16B"}
    # scale applies to the 8-bit range for every image: scale=1, mean 0, std 1 -> 0..255
    options = ImageOptions(crop=5, resize=5, scale=1.0, mean=(0.0,), std=(1.0,))
    _, x = only_feed(folder, options=options)
    for k in range(2):
        np.testing.assert_allclose(x[k, 0], values * (255 / 65535), rtol=1e-6)


def test_16_bit_rgb_png_comes_in_as_8_bit_high_bytes(tmp_path):
    rng = np.random.default_rng(2)
    values = rng.integers(0, 65536, (5, 5, 3)).astype(np.uint16)
    folder = folder_with(tmp_path, {"c.png": png_bytes(values, 16, 2)})
    source, x = only_feed(folder, "N, 3, 5, 5")
    got = x[0].transpose(1, 2, 0) * STD + MEAN  # back to [0, 1]
    np.testing.assert_allclose(got, values / 65535.0, atol=1.5 / 255)  # not white, not wrong
    assert any("16-bit colour" in n for n in source.summary.notes)


@pytest.mark.parametrize(("array", "why"), [
    (np.arange(25, dtype=np.int32).reshape(5, 5) * 1000, "32-bit integer"),
    (np.linspace(0, 1, 25, dtype=np.float32).reshape(5, 5), "32-bit float"),
])
def test_modes_without_a_known_range_are_refused_naming_the_file(tmp_path, array, why):
    folder = folder_with(tmp_path, {"ok.png": Image.fromarray(np.zeros((5, 5), np.uint8)),
                                    "deep.tif": Image.fromarray(array)})
    with pytest.raises(DataError, match=rf"deep\.tif.*{why}.*skip_bad_images"):
        open_data(folder, one_input("N, 1, 5, 5"))


def test_palette_alpha_bilevel_and_cmyk_images_convert_correctly(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(6)
    rgba = np.dstack([rgb, rng.integers(0, 256, (5, 5), dtype=np.uint8)])
    bits = rng.integers(0, 2, (5, 5)).astype(bool)
    folder = folder_with(tmp_path, {
        "1p.png": palette, "2rgba.png": Image.fromarray(rgba, "RGBA"),
        "3la.png": Image.fromarray(rgba[:, :, 2:], "LA"), "4bits.png": Image.fromarray(bits),
        "5cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
    })
    source, x = only_feed(folder, "N, 3, 5, 5")
    pixels = np.rint((x.transpose(0, 2, 3, 1) * STD + MEAN) * 255)
    np.testing.assert_array_equal(pixels[0], np.asarray(palette.convert("RGB")))
    np.testing.assert_array_equal(pixels[1], rgb)  # alpha dropped, colour kept (torchvision)
    np.testing.assert_array_equal(pixels[2], np.repeat(rgba[:, :, 2:3], 3, axis=2))
    np.testing.assert_array_equal(pixels[3], np.repeat(bits[:, :, None] * 255, 3, axis=2))
    np.testing.assert_array_equal(pixels[4], rgb)  # pillow's CMYK round trip is exact
    notes = " ".join(source.summary.notes)
    assert "2 image(s) with an alpha channel" in notes and "CMYK" in notes


# --------------------------------------------------------------------------- EXIF orientation


def test_exif_orientation_is_not_applied_unless_asked(tmp_path):
    stored = np.zeros((6, 6, 3), np.uint8)
    stored[:, :3] = 255  # left half white: rotated 90 degrees it becomes the top or bottom half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    folder = tmp_path / "e"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "e.jpg", exif=exif, quality=100)
    plain = open_data(folder, one_input("N, 3, 6, 6"), ImageOptions(resize=6))
    x = collect(plain, batch_size=1)[0][1]["x"][0]
    assert x[:, :, 0].mean() > x[:, :, -1].mean() + 1  # as stored: white on the left
    assert any("EXIF orientation" in n and "exif_transpose" in n for n in plain.summary.notes)
    turned = open_data(folder, one_input("N, 3, 6, 6"),
                       ImageOptions(resize=6, exif_transpose=True))
    y = collect(turned, batch_size=1)[0][1]["x"][0]
    assert y[:, 0].mean() > y[:, -1].mean() + 1  # as displayed: white on top
    assert not any("not applied" in n for n in turned.summary.notes)


# --------------------------------------------------------------------------- folders


def gray(value: int) -> Image.Image:
    return Image.fromarray(np.full((5, 5), value, np.uint8))


def test_hidden_files_and_folders_and_appledouble_are_skipped_with_one_note(tmp_path):
    folder = folder_with(tmp_path, {
        "a.png": gray(10), "sub/b.png": gray(20), ".hidden.png": gray(30),
        "._a.png": b"\x00\x05\x16\x07AppleDouble junk", ".cache/c.png": gray(40),
        "sub/.d.png": gray(50), "sub/._b.png": b"junk",
    })
    source, x = only_feed(folder)
    assert source.num_samples == 2
    np.testing.assert_allclose(x[:, 0, 0, 0] * GRAY[1] + GRAY[0], [10 / 255, 20 / 255],
                               atol=1e-6)
    hidden = [n for n in source.summary.notes if "hidden" in n]
    assert hidden == ["skipped 4 hidden image file(s) and 1 hidden folder(s) (names starting "
                      "with '.', e.g. macOS '._*' files)"]
    assert source.summary.num_skipped == 0


def test_broken_images_fail_when_the_folder_is_opened(tmp_path):
    good = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 50, 3), np.uint8))
    folder = folder_with(tmp_path, {"a.jpg": good, "b.png": good})
    jpeg, png = (folder / "a.jpg").read_bytes(), (folder / "b.png").read_bytes()
    (folder / "c_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "d_truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "e_garbage.png").write_bytes(b"this is not a png")
    (folder / "f_empty.jpg").write_bytes(b"")
    (folder / "g_trailer.jpg").write_bytes(jpeg + b"trailing bytes after EOI")  # valid
    with pytest.raises(DataError) as info:
        open_data(folder, one_input("N, 3, 8, 8"))
    message = str(info.value)
    assert "4 image file(s)" in message and "skip_bad_images" in message and "--" not in message
    for name in ("c_truncated.jpg", "d_truncated.png", "e_garbage.png", "f_empty.jpg"):
        assert name in message
    source = open_data(folder, one_input("N, 3, 8, 8"), ImageOptions(skip_bad_images=True))
    assert source.num_samples == 3
    summary = source.summary
    assert summary.num_skipped == 4 and len(summary.skipped) == 4
    assert summary.skipped[0].startswith("c_truncated.jpg: ")
    assert any("skipped 4 unreadable image(s)" in n for n in summary.notes)
    assert len(collect(source, batch_size=3)) == 1
    assert collect(source, batch_size=3) and source.summary.num_skipped == 4  # every run


def test_opening_checks_512_jpegs_without_decoding_them(tmp_path, monkeypatch):
    """The open-time check reads headers and end markers; decoding waits for the batches.

    (Counted, not timed: timings live in benchmarks/. Decoding every file twice would double
    the cost of an image-folder run.)
    """
    from PIL import ImageFile

    rng = np.random.default_rng(5)
    folder = tmp_path / "many"
    folder.mkdir()
    base = rng.integers(0, 256, (64, 64, 3), np.uint8)
    for k in range(512):
        Image.fromarray(np.roll(base, k, axis=0)).save(folder / f"{k:03d}.jpg", quality=90)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: decoded.append(self.filename) or real_load(self))
    source = open_data(folder, one_input("N, 3, 32, 32"))
    assert source.num_samples == 512 and decoded == []
    assert len(collect(source, batch_size=64)) == 8 and len(set(decoded)) == 512  # all, later


def test_skipped_images_reach_the_report(tmp_path):
    from tests.onnx_tools.helpers import cnn_model, run_cli

    rng = np.random.default_rng(7)
    folder = folder_with(tmp_path, {f"{k}.png": Image.fromarray(
        rng.integers(0, 256, (9, 9, 3), np.uint8)) for k in range(8)})
    (folder / "broken.png").write_bytes(b"not a png")
    model = tmp_path / "m.onnx"
    onnx.save(cnn_model(), model)
    report = tmp_path / "r.json"
    rc, _, err = run_cli("recalibrate", model, "--data", folder, "-o", tmp_path / "o.onnx",
                         "--batch-size", "4", "--skip-bad-images", "--report", report, "--quiet")
    assert rc == 0, err
    meta = json.loads(report.read_text())["meta"]
    assert meta["skipped_images"]["count"] == 1
    assert meta["skipped_images"]["first"][0].startswith("broken.png: ")
    assert meta["num_samples"] == 8


def test_dynamic_height_and_width_note_the_default_size(tmp_path):
    folder = folder_with(tmp_path, {"a.png": gray(1)})
    source = open_data(folder, one_input("N, 1, H, W"))
    assert source.size == (224, 224)
    assert ("image size 224x224 (the model's input has dynamic height/width; set "
            "image_options.crop)") in source.summary.notes  # --image-crop from the CLI


def test_cli_flags_reach_the_image_options(tmp_path):
    import onnx

    from tests.onnx_tools.helpers import cnn_model, run_cli

    rng = np.random.default_rng(6)
    files = {f"{k}.png": Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8))
             for k in range(8)}
    folder = folder_with(tmp_path, {**files, "broken.png": b"garbage"})
    onnx.save(cnn_model(), tmp_path / "m.onnx")
    code, _, err = run_cli("recalibrate", tmp_path / "m.onnx", "--data", folder, "-o",
                           tmp_path / "o.onnx", "--batch-size", "4", "--provider", "cpu")
    assert code == 1 and "broken.png" in err
    code, _, err = run_cli("recalibrate", tmp_path / "m.onnx", "--data", folder, "-o",
                           tmp_path / "o.onnx", "--batch-size", "4", "--provider", "cpu",
                           "--skip-bad-images", "--image-exif-transpose")
    assert code == 0, err
    assert "skipped 1 unreadable image(s)" in err


@pytest.mark.parametrize("command", ["recalibrate", "collect"])
def test_cli_decode_flags_reach_the_image_options(command):
    from onnx_tools.cli import build_parser
    from onnx_tools.cli.commands import _image_options

    base = [command, "m.onnx", "--data", "images/"]
    base += ["-o", "o.onnx"] if command == "recalibrate" else ["-o", "s.json"]
    parser = build_parser()
    assert _image_options(parser.parse_args(base)) is None  # defaults: ImageOptions()'s own
    opts = _image_options(parser.parse_args([*base, "--decode-threads", "3", "--no-jpeg-draft"]))
    assert (opts.threads, opts.jpeg_draft) == (3, False)
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--decode-threads", "0"])
