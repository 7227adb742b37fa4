"""Image preprocessing, built from the manifest and shared by evaluation, export parity and serving.

Two steps, each in one place:

* `open_image(data, limits)` reads the header of untrusted bytes: format allow-list and a
  decompression-bomb guard on the declared size before any pixel is decoded, and reduced-size
  JPEG decoding (`Image.draft`) when the model needs far fewer pixels than the file holds.
* `ImagePreprocessor(spec)` turns an image of any mode (RGBA, LA, 16-bit grey, CMYK, palette,
  EXIF-rotated) into the model's float32 CHW tensor and a `Geometry` that maps model-input pixels
  back to the original image. `from_bytes` is the serving path: it converts and shrinks a large
  image strip by strip, so a 40-megapixel RGBA upload peaks at about its own decoded size
  (`decode_cost` says how much, for the server's memory budget) instead of five copies of it.

`decode_image(data, limits)` returns the whole upright RGB picture, for training code.

Training evaluates through `ImagePreprocessor` too, so the numbers in the manifest are the
numbers the service reproduces.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

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


# Pillow stores these modes in fewer than 4 bytes a pixel; every other mode takes 4.
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Conversions to RGB of a large image run on horizontal strips of about this many pixels, so that
# the full-size image is never held twice (an RGBA upload would otherwise peak at 5x its size).
STRIP_PIXELS = 1 << 19
STRIP_BYTES = STRIP_PIXELS * 20  # a strip's crop, its RGB conversion and their temporaries
# Decoder state, EXIF, Python objects: measured peaks ran up to 1 MB over the pixels alone.
DECODER_BYTES = 8 << 20
# Pillow's own shortcut when shrinking: a box reduction by an integer factor that leaves at
# least this many times the target size, then the real filter (Image.resize(reducing_gap=...)).
REDUCING_GAP = 3.0
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _to_rgb(img: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white.

    `extrema` is the (min, max) of a 32-bit grey or float image when `img` is one strip of it:
    such images are rescaled by their whole range, not the strip's.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16/32-bit grey or float: PIL's convert("L") clips at 255; rescale the real range instead.
        arr = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = extrema if extrema is not None else (float(arr.min()), float(arr.max()))
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Over opaque white: pasting through the alpha channel is alpha compositing onto white
        # (the same pixels as Image.alpha_composite) without two more full-size RGBA copies.
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)
        return out
    # L, 1, CMYK, YCbCr, LAB, HSV: PIL's own conversions are right for these.
    return img.convert("RGB")


def _reduce_factors(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The integer box reduction Pillow's resize(reducing_gap=REDUCING_GAP) applies first."""
    return (int(size[0] / target[0] / REDUCING_GAP) or 1, int(size[1] / target[1] / REDUCING_GAP) or 1)


def _shrink_to_rgb(img: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """`_to_rgb(img).resize(size, resample, reducing_gap=REDUCING_GAP)`, pixel for pixel, without
    ever holding a second full-size copy of a large image.

    Conversion and the box reduction both work pixel by pixel or block by block, so they run on
    strips whose height is a multiple of the reduction factor; only the reduced image is kept,
    and the final filter runs on it with the box Pillow would use.
    """
    w, h = img.size
    if img.mode == "RGB" or resample == Image.Resampling.NEAREST:
        rgb = _to_rgb(img)  # RGB: no copy; NEAREST: Pillow does not reduce first either
        return rgb if rgb.size == size else rgb.resize(size, resample, reducing_gap=REDUCING_GAP)
    fx, fy = _reduce_factors((w, h), size)
    extrema = img.getextrema() if img.mode in ("I", "F") else None
    rows = max(fy, STRIP_PIXELS // max(1, w) // fy * fy)
    reduced = Image.new("RGB", (-(-w // fx), -(-h // fy)))
    for y in range(0, h, rows):
        strip = _to_rgb(img.crop((0, y, w, min(h, y + rows))), extrema)  # type: ignore[arg-type]
        reduced.paste(strip.reduce((fx, fy)) if (fx, fy) != (1, 1) else strip, (0, y // fy))
    return reduced.resize(size, resample, box=(0, 0, w / fx, h / fy))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation of a loaded image (1, upright, when absent or unreadable)."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: treat as upright, as viewers do
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def open_image(
    data: bytes, limits: DecodeLimits | None = None, *, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Read the header of untrusted image bytes, or raise InvalidInput naming the problem.

    Checks the format against the allow-list and the declared size against the limits before
    any pixel is decoded (a decompression bomb costs nothing). `draft_size` (width, height) lets
    JPEG decoding skip detail the model cannot use: the decoder picks the largest 1/2, 1/4 or 1/8
    scale that still covers that size. The image is not loaded yet; `img.size` and `img.mode` say
    what loading it will hold.
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
    if img.format == "JPEG" and draft_size is not None:
        try:
            img.draft("RGB", draft_size)
        except (OSError, ValueError) as e:
            raise InvalidInput(f"could not read the image header: {e}") from e
    return img


def _load(img: Image.Image) -> int:
    """Decode the pixels (GIF and animated WebP: the first frame); returns the EXIF orientation."""
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"image data is corrupt or truncated: {e}") from e
    return _orientation(img)


def decode_image(
    data: bytes,
    limits: DecodeLimits | None = None,
    *,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode untrusted image bytes to an upright RGB image, or raise InvalidInput naming the problem.

    The whole image, for training and evaluation code that wants the picture itself; serving
    goes through `ImagePreprocessor.from_bytes`, which never holds a full-size RGB copy.
    """
    img = open_image(data, limits, draft_size=draft_size)
    orientation = _load(img)
    try:
        if orientation != 1:
            img = img.transpose(_TRANSPOSE[orientation])
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"image data is corrupt or truncated: {e}") from e


class MemoryHold(Protocol):
    """What `ImagePreprocessor.from_bytes` needs from a memory budget (the server's
    `service.budget.MemoryBudget`): hold `n` bytes for the duration of a `with` block."""

    def hold(self, n: int) -> AbstractContextManager[object]: ...


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

    def _plan(self, w0: int, h0: int) -> tuple[tuple[int, int], Geometry]:
        """Where an upright w0 x h0 image goes: the size it is resized to, and its geometry."""
        tw, th = self.size
        if self.spec.resize == "stretch":
            return self.size, Geometry(w0, h0, tw / w0, th / h0)
        scale = min(tw / w0, th / h0)
        nw, nh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        pad_x, pad_y = (tw - nw) // 2, (th - nh) // 2
        return (nw, nh), Geometry(w0, h0, nw / w0, nh / h0, float(pad_x), float(pad_y))

    def resize(self, img: Image.Image, orientation: int = 1) -> tuple[Image.Image, Geometry]:
        """Resize an image (any mode; `orientation` its EXIF orientation, still to be applied) to
        the model's input size by the manifest's rule, as RGB."""
        transpose = _TRANSPOSE.get(orientation)
        swap = orientation in (5, 6, 7, 8)
        w, h = img.size
        size, geometry = self._plan(*((h, w) if swap else (w, h)))
        # Shrink first, turn upright last: rotating the small image instead of the full one
        # saves a full-size copy (an upright image takes the same path as before).
        out = _shrink_to_rgb(img, (size[1], size[0]) if swap else size, self._resample)
        if transpose is not None:
            out = out.transpose(transpose)
        if self.spec.resize == "stretch":
            return out, geometry
        canvas = Image.new("RGB", self.size, (self.spec.pad_value,) * 3)
        canvas.paste(out, (int(geometry.pad_x), int(geometry.pad_y)))
        return canvas, geometry

    def decode_cost(self, img: Image.Image) -> int:
        """Bytes `from_bytes` holds at its peak for an opened (not yet loaded) image: the decoded
        pixels, the strips being converted, and the reduced copy; what a memory budget reserves."""
        w, h = img.size
        loaded = w * h * _STORAGE_BYTES.get(img.mode, 4)
        if img.mode == "RGB" or self._resample == Image.Resampling.NEAREST:
            converted = 0 if img.mode == "RGB" else w * h * 4
        else:  # strips of at most STRIP_PIXELS; a small image is one strip of its own size
            converted = min(STRIP_BYTES, w * h * (STRIP_BYTES // STRIP_PIXELS))
        reduced = 0
        for size in (self.size, self.size[::-1]):  # either orientation, as EXIF is read on load
            fx, fy = _reduce_factors((w, h), size)
            reduced = max(reduced, -(-w // fx) * -(-h // fy) * 4)
        return loaded + converted + reduced + self.size[0] * self.size[1] * 16 + DECODER_BYTES

    def to_tensor(self, img: Image.Image) -> np.ndarray:
        """An already-resized RGB image to a normalised float32 CHW array."""
        # uint8 straight into one float32 buffer, then the bias in place: the same float32
        # operations in the same order as (x * scale) + bias on a float copy, so the same values,
        # in a third of the time (no float copy of the image, no temporary for the product).
        pixels = np.asarray(img)
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        np.multiply(pixels.transpose(2, 0, 1), self._scale, out=out)
        out += self._bias
        return out

    def __call__(self, img: Image.Image, orientation: int = 1) -> tuple[np.ndarray, Geometry]:
        resized, geometry = self.resize(img, orientation)
        return self.to_tensor(resized), geometry

    def from_bytes(
        self,
        data: bytes,
        limits: DecodeLimits | None = None,
        *,
        draft: bool = True,
        budget: MemoryHold | None = None,
    ) -> tuple[np.ndarray, Geometry]:
        """The whole serving path: untrusted bytes to tensor and geometry.

        `draft`: let JPEG decoding skip detail the model cannot use (classification; detection
        decodes in full). `budget`: hold the decode's peak memory in it while decoding.
        """
        img = open_image(data, limits, draft_size=self.draft_size if draft else None)
        with budget.hold(self.decode_cost(img)) if budget is not None else contextlib.nullcontext():
            orientation = _load(img)
            try:
                return self(img, orientation)
            except (OSError, ValueError, SyntaxError) as e:
                raise InvalidInput(f"image data is corrupt or truncated: {e}") from e

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        """Stack several images into one N x 3 x H x W array (evaluation helper)."""
        out = np.empty((len(images), 3, self.spec.height, self.spec.width), dtype=np.float32)
        for i, img in enumerate(images):
            out[i] = self(img)[0]
        return out
