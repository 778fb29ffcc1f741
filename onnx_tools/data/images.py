"""A folder of images as calibration data for a model with one image input (needs pillow).

Images are found recursively, hidden files and folders left out with a note
(:func:`~onnx_tools.data.listing.list_images`), ordered by relative POSIX path, and decoded
per batch, so memory is O(batch). Each image goes through
:func:`~onnx_tools.data.pixels.load_image` (mode, bit depth, resize of the shorter side,
center crop) and :func:`~onnx_tools.data.pixels.normalize` (scale, mean, std, layout, dtype);
the options and their defaults are documented on :class:`ImageOptions`. Pillow is imported
only when a folder is opened.

Every file is checked when the folder is opened (:func:`~onnx_tools.data.pixels.probe_image`:
header, PNG CRCs, JPEG end marker; about 0.05 ms per small file), so a truncated or garbage
file, or one whose pixels have no known range (32-bit integer or float), fails before any
batch runs, naming the files; with ``skip_bad_images`` they are left out instead, counted and
named in :attr:`~onnx_tools.data.DataSummary.skipped`. Bit depths and pillow modes: see
:mod:`onnx_tools.data.pixels` (16-bit images are scaled by 65535, not clipped; alpha is
dropped; notes say how many images were concerned).

EXIF orientation is *not* applied by default: pillow does not apply it when it opens a file,
and neither do torchvision's ``ImageFolder``/``pil_loader`` nor most training pipelines, so
the model was most likely trained on images as stored; a note counts the images whose
orientation tag is left unapplied. ``ImageOptions(exif_transpose=True)`` applies it
(``PIL.ImageOps.exif_transpose``) before anything else.

Decoding runs on a pool of threads (``ImageOptions(threads=...)``, by default one per CPU, at
most 8; pillow and NumPy release the GIL), one batch at a time: each image is decoded and
normalized into its slot of the batch (:class:`~onnx_tools.data.pixels.PixelTable`, bit for
bit the batch-wide :func:`~onnx_tools.data.pixels.normalize`), and the batch is yielded when
all its images are done, so batch ``i`` holds exactly the files the batching rules give it,
in order, whatever the threads. The first unreadable file of a batch, in batch order, is the
error. The pool is shut down (pending images cancelled, running ones awaited) when the
iteration ends, fails or is closed. Large JPEGs are decoded reduced by libjpeg when that
keeps 2.5x the resize target (``jpeg_draft``; see :mod:`onnx_tools.data.pixels`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnx_tools.data.identity import image_identity
from onnx_tools.data.listing import list_images
from onnx_tools.data.pixels import BadImage, ImageFacts, PixelTable, load_image, probe_image
from onnx_tools.data.plan import BatchPlan
from onnx_tools.data.prefetch import DecodePool, default_threads
from onnx_tools.data.source import IndexedSource
from onnx_tools.data.spec import Dim, Feed, InputSpec, check_sample_shape
from onnx_tools.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet's statistics averaged over the channels, for grayscale ("L") images.
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)
# The standard ImageNet evaluation resizes to 256 and crops 224: crop = 0.875 * resize.
CROP_FRACTION = 0.875
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: The crop when neither the options nor the model's input give a size.
DEFAULT_SIZE = 224
#: How many bad files an error or a note names (all are counted).
NAMED = 5


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes a model input (defaults follow ImageNet evaluation).

    Each image is decoded with pillow, converted to ``mode``, resized so that its shorter side
    is ``resize`` (bilinear, antialiased, the longer side truncated to an int as torchvision
    does), center-cropped to ``crop`` (top/left offsets rounded as torchvision does), scaled by
    ``scale`` and normalized per channel: ``x = (pixel * scale - mean) / std``. The result is
    cast to the model input's dtype; a ``uint8`` input gets the raw cropped pixels instead.

    Attributes:
        crop: output ``(height, width)`` or one int for a square. ``None`` (default): the
            model's static H, W when it declares them (a note says so), else 224.
        resize: target of the shorter side before cropping. ``None`` (default): ``crop / 0.875``
            rounded, i.e. 256 for a 224 crop, as in the standard ImageNet evaluation.
        mode: pillow mode, ``"RGB"`` or ``"L"``. ``None`` (default): ``"L"`` when the model's
            channel dimension is 1, else ``"RGB"``.
        scale: factor applied to the 0..255 pixel values (default ``1/255``, giving [0, 1]).
            16-bit images are first mapped to that range (``value * 255 / 65535``), so the
            same scale gives them the same [0, 1].
        mean, std: per-channel constants, one per channel or one for all. ``None`` (default):
            ImageNet's ``(0.485, 0.456, 0.406)`` and ``(0.229, 0.224, 0.225)`` for RGB, their
            averages ``(0.449,)`` and ``(0.226,)`` for ``"L"``.
        layout: ``"NCHW"`` or ``"NHWC"``. ``None`` (default): ``"NHWC"`` when the model's last
            dimension is the channel count (1 or 3) and dimension 1 is not, else ``"NCHW"``.
        extensions: file suffixes taken (case-insensitive); other files are ignored.
        recursive: also take images from subfolders (default ``True``). Order is the sorted
            relative POSIX path: ``cat/1.png < cat/10.png < cat/2.png < dog/1.png``. Hidden
            files and folders (``.name``, ``._name``) are always skipped, with a note.
        exif_transpose: apply the EXIF orientation tag before anything else (default
            ``False``: images are read as stored, as pillow and torchvision do).
        skip_bad_images: leave out the files that fail the open-time check, counting them in
            the summary (default ``False``: such a file is an error when the folder is opened).
        threads: threads decoding the images of a batch. ``None`` (default): one per CPU
            this process may use, at most 8; ``1`` decodes on the calling thread. The
            batches are the same bytes whatever the number.
        jpeg_draft: let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 of its size while
            that keeps at least 2.5 times the resize target on both sides (default ``True``;
            within 0.71 of 255 levels on average of the full decode, see
            :mod:`onnx_tools.data.pixels`). ``False``: always decode at full size.
    """

    crop: int | tuple[int, int] | None = None
    resize: int | None = None
    mode: str | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    recursive: bool = True
    exif_transpose: bool = False
    skip_bad_images: bool = False
    threads: int | None = None
    jpeg_draft: bool = True


def infer_layout(dims: Sequence[Dim]) -> str:
    """NHWC when the last dimension looks like channels (1 or 3) and dimension 1 does not."""
    if dims[3] in (1, 3) and dims[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


class ImageFolderSource(IndexedSource):
    """Images under a folder, decoded per batch into the model's single 4-D input."""

    def __init__(self, folder: Path, specs: Sequence[InputSpec], options: ImageOptions) -> None:
        super().__init__(specs, f"{folder}{'/' if not str(folder).endswith('/') else ''}")
        spec = self.spec = self._image_input(specs)
        dims = spec.shape if spec.shape is not None else (None, None, None, None)
        self.layout = options.layout or infer_layout(dims)
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"image layout must be NCHW or NHWC, got {options.layout!r}")
        if options.layout is None and self.layout == "NHWC":
            self._open_notes.append(f"layout NHWC inferred from input {spec.name!r}")
        channel_dim, h_dim, w_dim = (
            (dims[1], dims[2], dims[3]) if self.layout == "NCHW" else (dims[3], dims[1], dims[2])
        )
        self.mode = options.mode or ("L" if channel_dim == 1 else "RGB")
        if self.mode not in ("RGB", "L"):
            raise DataError(f"image mode must be RGB or L, got {self.mode!r}")
        channels = 3 if self.mode == "RGB" else 1
        self._choose_size(options, h_dim, w_dim)
        self._choose_normalization(options, channels)
        sample = (channels, *self.size) if self.layout == "NCHW" else (*self.size, channels)
        check_sample_shape(spec, sample, ("N", *sample))
        self.sample_shape = sample
        self.table = PixelTable(self.scale, self.mean, self.std, self.layout, spec.dtype,
                                channels)
        self.exif_transpose = bool(options.exif_transpose)
        self.jpeg_draft = bool(options.jpeg_draft)
        self.threads = default_threads() if options.threads is None else options.threads
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise DataError(f"image threads must be a positive integer, got {options.threads!r}")
        listing = list_images(folder, options.extensions, options.recursive)
        hidden = listing.hidden_note()
        if hidden:
            self._open_notes.append(hidden)
        self.folder = folder
        self.files = self._check_files(folder, listing.files, options.skip_bad_images)
        self._restart_summary()

    def identity(self) -> dict[str, Any]:
        """Paths, sizes and conversion (:func:`~onnx_tools.data.identity.image_identity`)."""
        return image_identity(self.folder, self.files, [
            self.size, self.resize, self.mode, self.scale, self.mean, self.std, self.layout,
            self.exif_transpose, self.jpeg_draft, self.spec.dtype.str])

    def _check_files(self, folder: Path, files: list[Path], skip: bool) -> list[Path]:
        """Probe every file (fail fast, or skip the bad ones); note what the others hold."""
        good: list[Path] = []
        facts: list[ImageFacts] = []
        bad: list[str] = []
        for path in files:
            try:
                facts.append(probe_image(path))
            except BadImage as exc:
                bad.append(f"{path.relative_to(folder).as_posix()}: {exc}")
                continue
            good.append(path)
        if bad and not skip:
            named = "; ".join(bad[:NAMED]) + ("; ..." if len(bad) > NAMED else "")
            raise DataError(
                f"{len(bad)} image file(s) under {self.description} cannot be used: {named} "
                "(remove them, or leave them out with skip_bad_images=True)"
            )
        if bad:
            self._skipped = bad
            names = ", ".join(b.split(": ", 1)[0] for b in bad[:NAMED])
            more = ", ..." if len(bad) > NAMED else ""
            self._open_notes.append(
                f"skipped {len(bad)} unreadable image(s) (skip_bad_images): {names}{more}"
            )
        self._open_notes.extend(self._facts_notes(facts))
        return good

    def _facts_notes(self, facts: list[ImageFacts]) -> list[str]:
        """Notes on the images that needed more than a plain 8-bit conversion."""
        count = {
            key: sum(getattr(f, key) for f in facts)
            for key in ("alpha", "cmyk", "colour16", "oriented")
        }
        deep = sum(f.depth == 16 for f in facts)
        notes = []
        if deep:
            notes.append(
                f"{deep} 16-bit image(s): values are mapped to the 8-bit range (x 255/65535) "
                "before scale, mean and std, so they land where 8-bit images do"
            )
        if count["colour16"]:
            notes.append(
                f"{count['colour16']} 16-bit colour PNG(s): pillow reads them with 8 bits per "
                "channel (the high byte)"
            )
        if count["alpha"]:
            notes.append(
                f"{count['alpha']} image(s) with an alpha channel: alpha dropped, colour kept "
                "(not composited), as torchvision's loader does"
            )
        if count["cmyk"]:
            notes.append(f"{count['cmyk']} CMYK image(s): converted to RGB by pillow's formula "
                         "(no colour profile)")
        if count["oriented"]:
            notes.append(
                f"{count['oriented']} image(s) with an EXIF orientation tag: "
                + ("applied (exif_transpose)" if self.exif_transpose else
                   "not applied, read as stored (exif_transpose=False, as pillow and "
                   "torchvision do)")
            )
        return notes

    def _image_input(self, specs: Sequence[InputSpec]) -> InputSpec:
        """Check pillow and the model's input (one 4-D float or uint8 input); return it."""
        try:
            import PIL  # noqa: F401 - only to give a clear error when pillow is missing
        except ImportError as exc:
            raise DataError(
                "reading a folder of images needs pillow: pip install 'bnref[images]'"
            ) from exc
        if len(specs) != 1 or (specs[0].shape is not None and len(specs[0].shape) != 4):
            shown = ", ".join(f"{s.name} {s.describe_shape()}" for s in specs)
            raise DataError(
                f"a folder of images feeds a model with one 4-D input; this model has {shown}"
            )
        spec = specs[0]
        if spec.dtype.kind != "f" and spec.dtype != np.uint8:
            raise DataError(
                f"input {spec.name!r} expects {spec.dtype}; images feed float or uint8 inputs"
            )
        if spec.dtype == np.uint8:
            self._open_notes.append(
                f"input {spec.name!r} is uint8: images are fed as raw pixels (no scale/mean/std)"
            )
        return spec

    def _choose_size(self, options: ImageOptions, h_dim: Dim, w_dim: Dim) -> None:
        """Set ``size`` (the crop) and ``resize`` (the shorter side before cropping)."""
        if options.crop is not None:
            crop = options.crop
            self.size = (crop, crop) if isinstance(crop, int) else tuple(crop)
        elif isinstance(h_dim, int) and isinstance(w_dim, int):
            self.size = (h_dim, w_dim)
            self._open_notes.append(
                f"image size {h_dim}x{w_dim} taken from input {self.spec.name!r}'s shape"
            )
        else:
            self.size = (DEFAULT_SIZE, DEFAULT_SIZE)
            self._open_notes.append(
                f"image size {DEFAULT_SIZE}x{DEFAULT_SIZE} (the model's input has dynamic "
                "height/width; set the crop image option)"
            )
        if len(self.size) != 2 or min(self.size) < 1:
            raise DataError(f"image crop must be positive (height, width), got {options.crop!r}")
        self.resize = options.resize or int(round(max(self.size) / CROP_FRACTION))
        if self.resize < max(self.size):
            raise DataError(
                f"image resize {self.resize} is smaller than the crop {self.size[0]}x"
                f"{self.size[1]}: the shorter side must be at least the larger crop side"
            )

    def _choose_normalization(self, options: ImageOptions, channels: int) -> None:
        """Set ``scale``, ``mean`` and ``std`` (ImageNet's by default)."""
        default_mean, default_std = (
            (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)
        )
        self.scale = float(options.scale)
        self.mean = tuple(options.mean if options.mean is not None else default_mean)
        self.std = tuple(options.std if options.std is not None else default_std)
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise DataError(
                    f"image {label} has {len(values)} values; {self.mode} images have "
                    f"{channels} channel(s)"
                )
        if any(s == 0 for s in self.std):
            raise DataError(f"image std must be non-zero, got {self.std}")

    def _length(self) -> int:
        return len(self.files)

    def _empty_message(self, plan: BatchPlan, dropped: int) -> str:
        if not self.files:
            skipped = f" ({len(self._skipped)} skipped as unreadable)" if self._skipped else ""
            return f"no images (.jpg, .png, ...) found under {self.description}{skipped}"
        return super()._empty_message(plan, dropped)

    def _load(self, indices: np.ndarray | slice) -> Feed:
        with DecodePool(1) as pool:
            return self._decode(indices, pool)

    def _generate(self, plan: BatchPlan) -> Iterator[tuple[int, Feed]]:
        with DecodePool(self.threads) as pool:  # closed with the iteration: no thread outlives it
            for index, rows in self._batch_rows(plan):
                yield index, self._decode(rows, pool)

    def _decode(self, rows: np.ndarray | slice, pool: DecodePool) -> Feed:
        """The images at ``rows``, in that order, decoded on ``pool`` into one batch."""
        chosen = self.files[rows] if isinstance(rows, slice) else [self.files[i] for i in rows]
        batch = np.empty((len(chosen), *self.sample_shape), dtype=self.spec.dtype)

        def one(k: int, path: Path) -> None:
            pixels = load_image(path, self.size, self.resize, self.mode, self.exif_transpose,
                                self.jpeg_draft)
            self.table.write(batch[k], pixels)

        pool.run(one, chosen)
        return {self.spec.name: batch}
