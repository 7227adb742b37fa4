"""Image preprocessing, built from the manifest and shared by evaluation, export parity and serving.

Two steps, each in one place:

* `decode_image(data, limits)` turns untrusted bytes into an RGB PIL image: format allow-list,
  a decompression-bomb guard on the declared size before any pixel is decoded, EXIF orientation,
  odd modes (RGBA, LA, 16-bit grey, CMYK, palette) converted correctly, and reduced-size JPEG
  decoding (`Image.draft`) when the model needs far fewer pixels than the file holds.
* `ImagePreprocessor(spec)(image)` turns an RGB image into the model's float32 CHW tensor and
  a `Geometry` that maps model-input pixels back to the original image.

Training evaluates through `ImagePreprocessor` too, so the numbers in the manifest are the
numbers the service reproduces.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInput
from .manifest import ImagePreprocessing

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})


@dataclass(frozen=True)
class DecodeLimits:
    """Limits applied to untrusted image bytes before and during decoding."""

    max_pixels: int = 40_000_000
    max_side: int = 20_000
    formats: frozenset[str] = ALLOWED_FORMATS


@dataclass(frozen=True)
class Geometry:
    """Where the original image landed inside the model input.

    A point (x, y) in model-input pixels maps to ((x - pad_x) / scale_x, (y - pad_y) / scale_y)
    in original pixels.
    """

    orig_width: int
    orig_height: int
    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map N x 4 xyxy boxes from model-input pixels to original-image pixels, clipped."""
        out = np.asarray(boxes, dtype=np.float32).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale_y
        # Fancy indexing returns copies, so clip and assign back (np.clip(..., out=view) would not).
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, self.orig_width)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, self.orig_height)
        return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16/32-bit grey or float: PIL's convert("L") clips at 255; rescale the real range instead.
        arr = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: PIL's own conversions are right for these.
    return img.convert("RGB")


def decode_image(
    data: bytes,
    limits: DecodeLimits | None = None,
    *,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode untrusted image bytes to an RGB image, or raise InvalidInput naming the problem.

    `draft_size` (width, height) lets JPEG decoding skip detail the model cannot use: the
    decoder picks the largest 1/2, 1/4 or 1/8 scale that still covers that size.
    """
    limits = limits or DecodeLimits()
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=sorted(limits.formats))
    except UnidentifiedImageError as e:
        raise InvalidInput(
            f"could not read the image: not a supported format (allowed: {', '.join(sorted(limits.formats))})",
            status_code=415,
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(f"image is too large to decode safely: {e}", status_code=413) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"could not read the image header: {e}") from e

    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has an empty size ({width}x{height})")
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise InvalidInput(
            f"image is {width}x{height} pixels; the limit is {limits.max_pixels / 1e6:g} megapixels "
            f"and {limits.max_side} pixels a side",
            status_code=413,
        )
    try:
        if img.format == "JPEG" and draft_size is not None:
            img.draft("RGB", draft_size)
        # GIF and animated WebP: Image.open already points at the first frame.
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except InvalidInput:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"image data is corrupt or truncated: {e}") from e


class ImagePreprocessor:
    """The eval/serving transform for one artifact: resize, normalise, HWC->CHW float32."""

    def __init__(self, spec: ImagePreprocessing) -> None:
        self.spec = spec
        self.size = (spec.width, spec.height)
        self._resample = _RESAMPLE[spec.interpolation]
        std = np.asarray(spec.std, dtype=np.float32)
        # (x/255 - mean)/std == x * scale + bias, computed once.
        self._scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
        self._bias = (-np.asarray(spec.mean, dtype=np.float32) / std).reshape(3, 1, 1)

    @property
    def draft_size(self) -> tuple[int, int]:
        return self.size

    def decode(self, data: bytes, limits: DecodeLimits | None = None) -> Image.Image:
        """Decode request bytes the way this model wants them (JPEG draft at the model's size)."""
        return decode_image(data, limits, draft_size=self.draft_size)

    def resize(self, img: Image.Image) -> tuple[Image.Image, Geometry]:
        """Resize an RGB image to the model's input size by the manifest's rule."""
        img = _to_rgb(img)
        w0, h0 = img.size
        tw, th = self.size
        if self.spec.resize == "stretch":
            out = img if img.size == self.size else img.resize(self.size, self._resample, reducing_gap=3.0)
            return out, Geometry(w0, h0, tw / w0, th / h0)
        scale = min(tw / w0, th / h0)
        nw, nh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        resized = img if (nw, nh) == (w0, h0) else img.resize((nw, nh), self._resample, reducing_gap=3.0)
        pad_x, pad_y = (tw - nw) // 2, (th - nh) // 2
        canvas = Image.new("RGB", self.size, (self.spec.pad_value,) * 3)
        canvas.paste(resized, (pad_x, pad_y))
        return canvas, Geometry(w0, h0, nw / w0, nh / h0, float(pad_x), float(pad_y))

    def to_tensor(self, img: Image.Image) -> np.ndarray:
        """An already-resized RGB image to a normalised float32 CHW array."""
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        return arr * self._scale + self._bias

    def __call__(self, img: Image.Image) -> tuple[np.ndarray, Geometry]:
        resized, geometry = self.resize(img)
        return self.to_tensor(resized), geometry

    def from_bytes(self, data: bytes, limits: DecodeLimits | None = None) -> tuple[np.ndarray, Geometry]:
        """The whole serving path: untrusted bytes to tensor and geometry."""
        return self(self.decode(data, limits))

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        """Stack several images into one N x 3 x H x W array (evaluation helper)."""
        out = np.empty((len(images), 3, self.spec.height, self.spec.width), dtype=np.float32)
        for i, img in enumerate(images):
            out[i] = self(img)[0]
        return out
