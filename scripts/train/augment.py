"""Training-time image augmentation: the levels `--augment none|light|strong` name, in one place.

A `Policy` says how much of each change a level applies. `photometric` changes what the pixels
look like (colour jitter, greyscale, blur, JPEG re-encoding) and works for every image task;
geometry (flips, crops, scale) depends on the task, because detection boxes must follow it:
`classification_view` is the image recipes' whole view, the detection task moves its boxes with
the same `Policy` fields. Everything draws from the numpy Generator it is given, so a seed fixes
the views.

PIL only, no torch: the data code calls it before anything becomes a tensor.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps


@dataclass(frozen=True)
class Policy:
    """How strongly one level changes an image. Probabilities are per image."""

    hflip: float  # probability of a left-right flip
    scale: tuple[float, float]  # area kept by a random crop (classification) / zoom range (detection)
    ratio: tuple[float, float]  # aspect ratio range of that crop
    brightness: float  # factor drawn from [1 - x, 1 + x]
    contrast: float
    saturation: float
    greyscale: float  # probability
    blur: float  # probability of a Gaussian blur with radius up to blur_radius
    blur_radius: float
    jpeg: float  # probability of re-encoding as JPEG with a quality in jpeg_quality
    jpeg_quality: tuple[int, int]

    def describe(self) -> str:
        """One line for the manifest's training notes."""
        return ", ".join(f"{k} {v}" for k, v in asdict(self).items())


LEVELS: dict[str, Policy | None] = {
    "none": None,
    "light": Policy(
        hflip=0.5,
        scale=(0.6, 1.0),
        ratio=(0.85, 1.18),
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        greyscale=0.1,
        blur=0.1,
        blur_radius=1.0,
        jpeg=0.2,
        jpeg_quality=(50, 95),
    ),
    "strong": Policy(
        hflip=0.5,
        scale=(0.35, 1.0),
        ratio=(0.75, 1.33),
        brightness=0.4,
        contrast=0.4,
        saturation=0.5,
        greyscale=0.3,
        blur=0.3,
        blur_radius=1.8,
        jpeg=0.4,
        jpeg_quality=(25, 90),
    ),
}


def policy(level: str) -> Policy | None:
    """The policy a level names (None for "none"); raises ValueError naming the levels."""
    try:
        return LEVELS[level]
    except KeyError:
        raise ValueError(f"unknown augmentation level {level!r}; known: {', '.join(LEVELS)}") from None


def _factor(rng: np.random.Generator, amount: float) -> float:
    return float(rng.uniform(1 - amount, 1 + amount))


def photometric(img: Image.Image, p: Policy, rng: np.random.Generator) -> Image.Image:
    """Colour jitter (in a random order), greyscale, blur and JPEG re-encoding; RGB in, RGB out."""
    img = img.convert("RGB")
    jitters = [
        (ImageEnhance.Brightness, p.brightness),
        (ImageEnhance.Contrast, p.contrast),
        (ImageEnhance.Color, p.saturation),
    ]
    for k in rng.permutation(len(jitters)):
        enhancer, amount = jitters[int(k)]
        if amount > 0:
            img = enhancer(img).enhance(_factor(rng, amount))
    if rng.random() < p.greyscale:
        img = ImageOps.grayscale(img).convert("RGB")
    if rng.random() < p.blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, p.blur_radius))))
    if rng.random() < p.jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(p.jpeg_quality[0], p.jpeg_quality[1] + 1)))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


def crop_box(width: int, height: int, p: Policy, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random crop keeping a share `p.scale` of the area at an aspect in `p.ratio` (random
    resized crop); the whole image when no such crop fits in 10 tries."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*p.scale)
        aspect = float(np.exp(rng.uniform(np.log(p.ratio[0]), np.log(p.ratio[1]))))
        w = round(np.sqrt(target * aspect))
        h = round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    return 0, 0, width, height


def classification_view(img: Image.Image, p: Policy, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One augmented training view for a classifier: random resized crop to `size` (width,
    height), a flip, then the photometric changes."""
    img = img.convert("RGB")
    img = img.resize(size, Image.BILINEAR, box=crop_box(img.width, img.height, p, rng))
    if rng.random() < p.hflip:
        img = ImageOps.mirror(img)
    return photometric(img, p, rng)
