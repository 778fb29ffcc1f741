"""A folder of images as calibration data for a model with one image input (needs pillow).

Images are found recursively (:func:`list_images`), ordered by relative POSIX path, and
decoded per batch, so memory is O(batch). Each image goes through :func:`load_image` (mode,
resize of the shorter side, center crop) and :func:`normalize` (scale, mean, std, layout,
dtype); the options and their defaults are documented on :class:`ImageOptions`. Pillow is
imported only when a folder is opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_tools.data.plan import BatchPlan
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
        mean, std: per-channel constants, one per channel or one for all. ``None`` (default):
            ImageNet's ``(0.485, 0.456, 0.406)`` and ``(0.229, 0.224, 0.225)`` for RGB, their
            averages ``(0.449,)`` and ``(0.226,)`` for ``"L"``.
        layout: ``"NCHW"`` or ``"NHWC"``. ``None`` (default): ``"NHWC"`` when the model's last
            dimension is the channel count (1 or 3) and dimension 1 is not, else ``"NCHW"``.
        extensions: file suffixes taken (case-insensitive); other files are ignored.
        recursive: also take images from subfolders (default ``True``). Order is the sorted
            relative POSIX path: ``cat/1.png < cat/10.png < cat/2.png < dog/1.png``.
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


def list_images(folder: Path, extensions: Sequence[str], recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` with one of ``extensions``, sorted by relative POSIX path."""
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [p for p in candidates if p.suffix.lower() in suffixes and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def load_image(path: Path, size: tuple[int, int], resize: int, mode: str) -> np.ndarray:
    """Decode ``path`` into a ``uint8`` array of shape ``(height, width, channels)``.

    The image is converted to ``mode``, resized with pillow's antialiased bilinear filter so
    that its shorter side is ``resize`` (the longer one ``int(resize * long / short)``), then
    center-cropped to ``size = (height, width)`` with offsets ``round((side - crop) / 2)``, as
    torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` do.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            width, height = image.size
            if width <= height:
                new_w, new_h = resize, int(resize * height / width)
            else:
                new_w, new_h = int(resize * width / height), resize
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
            crop_h, crop_w = size
            top = int(round((new_h - crop_h) / 2.0))
            left = int(round((new_w - crop_w) / 2.0))
            image = image.crop((left, top, left + crop_w, top + crop_h))
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return pixels[:, :, np.newaxis] if pixels.ndim == 2 else pixels


def normalize(
    pixels: np.ndarray,
    scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    layout: str,
    dtype: np.dtype,
) -> np.ndarray:
    """``(pixels * scale - mean) / std`` per channel for a ``(N, H, W, C)`` uint8 batch.

    Computed in float32 (float64 for a float64 input), then transposed to ``layout`` and cast
    to ``dtype``. A ``uint8`` ``dtype`` means the model takes raw pixels: only the layout
    changes.
    """
    if np.dtype(dtype) == np.uint8:
        out = pixels
    else:
        work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        out = pixels.astype(work) * work(scale)
        out -= np.asarray(mean, dtype=work)
        out /= np.asarray(std, dtype=work)
    if layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=dtype)


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
        self.files = list_images(folder, options.extensions, options.recursive)
        self._restart_summary()

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
            self.size = (224, 224)
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

    def _empty_message(self, plan: BatchPlan) -> str:
        if not self.files:
            return f"no images (.jpg, .png, ...) found under {self.description}"
        return super()._empty_message(plan)

    def _load(self, indices: np.ndarray | slice) -> Feed:
        chosen = (
            self.files[indices] if isinstance(indices, slice) else [self.files[i] for i in indices]
        )
        pixels = np.stack([load_image(p, self.size, self.resize, self.mode) for p in chosen])
        batch = normalize(pixels, self.scale, self.mean, self.std, self.layout, self.spec.dtype)
        return {self.spec.name: batch}
