"""Augmented training views for detection: the geometry moves the boxes with the pixels.

A view is a flip, then a zoom (one half of the time in: a random crop keeping a share
`Policy.scale` of the area, as `crop_box` draws it; the other half out: the image placed on a
canvas 1/share as large, filled with its mean colour, so objects get smaller), then the
photometric changes of `scripts/train/augment.py` (colour jitter, greyscale, blur, JPEG).

Boxes a crop cuts: a box keeps its clipped part when at least `MIN_VISIBLE` of its area stays in
the crop, and is dropped otherwise. A crop that would cut a box into an ambiguous piece (between
`AMBIGUOUS` and `MIN_VISIBLE` of it visible: an object still recognisable that would count as
background) is redrawn, up to 10 times, then the view keeps the whole image.

`views(level)` says how many views of each training image the frozen-trunk cache holds: view 0
is always the image itself, the others are augmented.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from .augment import Policy, crop_box, photometric

MIN_VISIBLE = 0.6  # share of a cut box's area that must stay in the crop for the box to stay
AMBIGUOUS = 0.25  # a crop keeping between this and MIN_VISIBLE of a box is redrawn
VIEWS = {"none": 1, "light": 2, "strong": 3}  # cached views per training image, the original included


def views(level: str) -> int:
    """How many views of each training image a level caches (the original included)."""
    return VIEWS[level]


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """xyxy boxes of an image `width` pixels wide, mirrored left-right."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def crop_boxes(
    boxes: np.ndarray, labels: np.ndarray, crop: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes in the crop's pixels, clipped; those with under MIN_VISIBLE of their area left are
    dropped. Returns (boxes, labels, visible share of every input box)."""
    x0, y0, x1, y1 = crop
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], x0, x1),
            np.clip(boxes[:, 1], y0, y1),
            np.clip(boxes[:, 2], x0, x1),
            np.clip(boxes[:, 3], y0, y1),
        ],
        axis=1,
    ).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) / np.maximum(area, 1e-6)
    keep = visible >= MIN_VISIBLE
    out = clipped[keep] - np.asarray([x0, y0, x0, y0], dtype=np.float32)
    return out.astype(np.float32), labels[keep], visible


def _crop(img: Image.Image, boxes: np.ndarray, labels: np.ndarray, p: Policy, rng: np.random.Generator):
    for _ in range(10):
        box = crop_box(img.width, img.height, p, rng)
        kept, kept_labels, visible = crop_boxes(boxes, labels, box)
        if not np.any((visible > AMBIGUOUS) & (visible < MIN_VISIBLE)):
            return img.crop(box), kept, kept_labels
    return img, boxes, labels


def _expand(img: Image.Image, boxes: np.ndarray, p: Policy, rng: np.random.Generator):
    share = float(rng.uniform(*p.scale))  # the image's share of the new canvas's area
    w, h = round(img.width / np.sqrt(share)), round(img.height / np.sqrt(share))
    x0, y0 = int(rng.integers(0, w - img.width + 1)), int(rng.integers(0, h - img.height + 1))
    mean = tuple(int(v) for v in np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(0))
    canvas = Image.new("RGB", (w, h), mean)
    canvas.paste(img, (x0, y0))
    return canvas, boxes + np.asarray([x0, y0, x0, y0], dtype=np.float32)


def detection_view(
    img: Image.Image, boxes: np.ndarray, labels: np.ndarray, p: Policy, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """One augmented view of an image and its (N, 4) xyxy boxes and (N,) labels, in the view's pixels."""
    img = img.convert("RGB")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if rng.random() < p.hflip:
        img, boxes = ImageOps.mirror(img), flip_boxes(boxes, img.width)
    if rng.random() < 0.5:
        img, boxes, labels = _crop(img, boxes, labels, p, rng)
    else:
        img, boxes = _expand(img, boxes, p, rng)
    return photometric(img, p, rng), boxes, labels
