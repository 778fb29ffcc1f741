"""One image file to pixels: which pillow modes are taken, the open-time check, decoding.

Pillow modes (:func:`pixel_depth`)
----------------------------------
- 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``RGBX``, ``LA``, ``PA``, ``CMYK``,
  ``YCbCr``, ``HSV``) are converted to the source's mode (``RGB`` or ``L``) by pillow's
  ``convert``: a palette is looked up; an alpha channel is dropped and the colour kept (not
  composited onto a background), as torchvision's ``pil_loader`` does; CMYK uses pillow's
  formula, without a colour profile.
- 16-bit grayscale (``I;16``, ``I;16B``, ...; ``I`` from a PNG, as older pillow opens them):
  pillow's ``convert("L")`` would clip every value above 255 (a white image), so they are
  decoded as floats and mapped to the 8-bit range, ``value * 255 / 65535``, before the usual
  ``scale``, mean and std: with the default ``scale = 1/255`` a 16-bit image lands in the same
  [0, 1] as an 8-bit one (``value / 65535``). A ``uint8`` model input gets that rounded.
- 16-bit colour PNGs are opened by pillow as 8-bit ``RGB``/``RGBA`` (the high byte of each
  sample): the range is right, the precision 1/255.
- ``I`` (32-bit integer, not from a PNG) and ``F`` (32-bit float) have no known range and are
  refused, as are modes pillow cannot turn into RGB (``LAB``, ``La``, ...).

The open-time check (:func:`probe_image`) costs a header read per file, plus: PNG, pillow's
``verify()`` (chunk CRCs, no decompression); JPEG, a look at the file's last bytes for the
end-of-image marker (a file without it, truncated or with a trailer, is decoded once to
decide); any other format is decoded once. About 0.05 ms per small JPEG or PNG.

JPEG draft (:func:`load_image` with ``draft=True``)
---------------------------------------------------
libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size (DCT scaling, pillow's
``Image.draft``), several times faster for large photos. The resize rule stays the same: the
target size is computed from the full-resolution size, and the reduced image, whose extent is
mapped exactly (pillow's ``box``), is resized to it with the same filter. DCT scaling is not
the same low-pass as an antialiased resize from full resolution, so a reduction is taken only
while the reduced image keeps at least :data:`DRAFT_MARGIN` (2.5) times the target on both
sides; a 500x375 photo resized to 256 is never reduced, a 4032x3024 one is decoded at 1/4.
Measured on real photos (resize targets 20 to 300) and on 2 to 12 MP 1/f-noise photos (crop
224): mean absolute difference from the full decode at most 0.71 of 255 levels (0.46 at the
default 224 crop), largest single difference 8 levels, mean signed difference below 0.05
levels, pixel standard deviation within 0.25 %. (Drafting down to the target itself, with no
margin, gave mean differences of 1.4 to 3.1 levels; a margin of 2, up to 1.36.) Images
turned by ``exif_transpose`` and non-JPEG files are never reduced.

One image at a time (:class:`PixelTable`)
-----------------------------------------
:func:`normalize` is elementwise, so for 8-bit pixels its result is a table of 256 values per
channel; :class:`PixelTable` computes that table with :func:`normalize` itself and writes
each image into its slot of the batch with one lookup per value, bit for bit what
:func:`normalize` gives the whole batch (float pixels of 16-bit images go through
:func:`normalize` itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_tools.errors import DataError

EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr",
                   "HSV")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
#: 16-bit values to the 8-bit range, so that ``scale`` means the same for every image.
SIXTEEN_TO_EIGHT = 255.0 / 65535.0
EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"
#: A JPEG is decoded reduced only while it keeps this many times the resize target.
DRAFT_MARGIN = 2.5


class BadImage(Exception):
    """A file that cannot be used as an image; ``str(exc)`` says why."""


@dataclass(frozen=True)
class ImageFacts:
    """What :func:`probe_image` learnt of one file (for the notes of the folder)."""

    depth: int  # 8 or 16 (as decoded)
    alpha: bool  # an alpha channel or transparency, dropped
    cmyk: bool
    colour16: bool  # a 16-bit colour PNG that pillow reads as 8 bits per channel
    oriented: bool  # an EXIF orientation other than 1 (normal)


def pixel_depth(mode: str, image_format: str | None) -> int:
    """8 or 16 for a pillow ``mode`` taken here; :class:`BadImage` for the others."""
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and image_format == "PNG"):
        return 16
    if mode in EIGHT_BIT_MODES:
        return 8
    if mode in ("I", "F"):
        kind = "integer" if mode == "I" else "float"
        raise BadImage(
            f"32-bit {kind} pixels (pillow mode {mode}) have no known range; save the image "
            "with 8 or 16 bits per sample"
        )
    raise BadImage(f"pillow mode {mode!r} is not converted to RGB or L here")


def _png_colour16(path: Path) -> bool:
    """Whether a PNG's header declares 16-bit colour (colour types 2, 4 and 6)."""
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[24] == 16 and head[25] in (2, 4, 6)


def _jpeg_complete(path: Path) -> bool:
    """Whether a JPEG ends with its end-of-image marker (padding aside)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        tail = f.read()
    return tail.rstrip(b"\0\r\n\t ").endswith(JPEG_END)


def probe_image(path: Path) -> ImageFacts:
    """Check cheaply that ``path`` is an image that will decode (see the module docstring).

    Raises :class:`BadImage` saying why not.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image_format, mode = image.format, image.mode
            depth = pixel_depth(mode, image_format)
            alpha = mode in ALPHA_MODES or "transparency" in image.info
            # a PNG's eXIf chunk after the pixels is only read by load(), which verify() forbids
            exif = image_format != "PNG" or "exif" in image.info
            orientation = image.getexif().get(EXIF_ORIENTATION, 1) if exif else 1
            if image_format == "PNG":
                image.verify()
            elif image_format != "JPEG" or not _jpeg_complete(path):
                image.load()
        colour16 = image_format == "PNG" and _png_colour16(path)
    except BadImage:
        raise
    except Exception as exc:  # pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise BadImage(f"{type(exc).__name__}: {exc}") from exc
    return ImageFacts(depth, alpha, mode == "CMYK", colour16, orientation not in (1, None))


def load_image(
    path: Path, size: tuple[int, int], resize: int, mode: str, exif_transpose: bool = False,
    draft: bool = False,
) -> np.ndarray:
    """Decode ``path`` into ``(height, width, channels)`` pixels on the 8-bit scale.

    ``uint8`` for 8-bit images; ``float32`` for 16-bit ones (``value * 255 / 65535``, not
    rounded; a gray image repeated into RGB when ``mode`` is ``"RGB"``). With
    ``exif_transpose`` the EXIF orientation is applied first
    (``PIL.ImageOps.exif_transpose``). The image is then resized with pillow's antialiased
    bilinear filter so that its shorter side is ``resize`` (the longer one
    ``int(resize * long / short)``) and center-cropped to ``size = (height, width)`` with
    offsets ``round((side - crop) / 2)``, as torchvision's ``Resize(resize)`` +
    ``CenterCrop(size)`` do. With ``draft`` a large JPEG may be decoded reduced first (see
    the module docstring: within 0.71 of 255 levels on average).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            depth = pixel_depth(image.mode, image.format)
            full = image.size  # as stored: the resize rule never sees a reduced size
            box = _draft(image, resize, exif_transpose) if draft else None
            if exif_transpose:
                image = ImageOps.exif_transpose(image)  # never reduced when it turns
                full = image.size if box is None else full
            target = "F" if depth == 16 else mode
            if image.mode != target:  # convert() to the same mode would only copy it
                image = image.convert(target)
            pixels = np.asarray(_resize_and_crop(image, size, resize, full, box))
    except BadImage as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if depth == 16:
        pixels = pixels.astype(np.float32) * np.float32(SIXTEEN_TO_EIGHT)
        if mode == "RGB":
            pixels = np.repeat(pixels, 3, axis=2)
    return pixels


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """``(width, height)`` with the shorter side ``resize``, the longer truncated to an int."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def _draft(image, resize: int, exif_transpose: bool) -> tuple[float, float, float, float] | None:
    """Decode a JPEG reduced when it keeps DRAFT_MARGIN x the target; the full image's box."""
    if image.format != "JPEG" or (
        exif_transpose and image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    ):
        return None
    width, height = image.size
    want_w, want_h = (math.ceil(side * DRAFT_MARGIN) for side in resized_size(width, height, resize))
    if min(width // want_w, height // want_h) < 2:
        return None  # no reduction possible: the file is decoded exactly as without draft
    drafted = image.draft(image.mode, (want_w, want_h))
    return None if drafted is None or image.size == (width, height) else drafted[1]


def _resize_and_crop(image, size: tuple[int, int], resize: int, full: tuple[int, int],
                     box: tuple[float, float, float, float] | None = None):
    from PIL import Image

    new_w, new_h = resized_size(*full, resize)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, box=box)
    crop_h, crop_w = size
    top = int(round((new_h - crop_h) / 2.0))
    left = int(round((new_w - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def normalize(
    pixels: np.ndarray,
    scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    layout: str,
    dtype: np.dtype,
) -> np.ndarray:
    """``(pixels * scale - mean) / std`` per channel for a ``(N, H, W, C)`` batch.

    ``pixels`` are on the 8-bit scale (``uint8``, or ``float32`` when a 16-bit image is in
    the batch). Computed in float32 (float64 for a float64 input), then transposed to
    ``layout`` and cast to ``dtype``. A ``uint8`` ``dtype`` means the model takes raw pixels:
    only the layout changes (float pixels are rounded).
    """
    if np.dtype(dtype) == np.uint8:
        out = pixels
        if out.dtype != np.uint8:
            out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    else:
        work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        out = pixels.astype(work) * work(scale)
        out -= np.asarray(mean, dtype=work)
        out /= np.asarray(std, dtype=work)
    if layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=dtype)


class PixelTable:
    """:func:`normalize` for one image at a time, bit for bit (see the module docstring)."""

    def __init__(self, scale: float, mean: Sequence[float], std: Sequence[float], layout: str,
                 dtype: np.dtype, channels: int) -> None:
        self.args = (scale, tuple(mean), tuple(std), layout, np.dtype(dtype))
        self.layout = layout
        levels = np.repeat(np.arange(256, dtype=np.uint8)[:, np.newaxis], channels, axis=1)
        table = normalize(levels[np.newaxis, np.newaxis], *self.args)  # a 1 x 256 "image"
        by_channel = table[0, :, 0, :] if layout == "NCHW" else table[0, 0].T
        self.by_channel = np.ascontiguousarray(by_channel)  # (C, 256): channel c, value v

    def write(self, out: np.ndarray, pixels: np.ndarray) -> None:
        """Write one image's ``(H, W, C)`` pixels into ``out``, its slot of the batch."""
        if pixels.dtype != np.uint8:  # 16-bit images: the arithmetic itself
            out[...] = normalize(pixels[np.newaxis], *self.args)[0]
            return
        for c, values in enumerate(self.by_channel):
            target = out[c] if self.layout == "NCHW" else out[..., c]
            np.take(values, pixels[..., c], out=target, mode="clip")
