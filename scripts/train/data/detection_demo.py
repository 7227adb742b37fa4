"""The object-detection demo dataset: Fashion-MNIST items pasted onto real photos, as COCO.

`ensure_demo_data` is what a detection fine-tune without --data uses; `python -m
scripts.make_detection_data` writes a copy anywhere.

No detection dataset ships offline, so graft makes one. Each scene is a random crop of a real
photo (scikit-image's `skimage.data` and scikit-learn's sample images) at a random size and aspect
(240 to 480 pixels wide, width/height 0.6 to 1.8: the service's letterbox inversion gets exercised),
with 1 to 6 Fashion-MNIST items pasted at 14% to 42% of the shorter side. An item is pasted through
a mask taken from its own intensity, keeps its texture and is tinted a random saturated colour, so
it stands out from the photo by shape and edges but not by a fixed colour: the detector has to
learn what the items look like. Boxes are tight around the pasted mask.

Five of the ten Fashion-MNIST classes are used, one per visually distinct group: T-shirt/top,
Trouser, Sandal, Bag, Ankle boot. The other five are near-duplicates of these at 28x28 pixels
(Pullover, Coat and Shirt look like T-shirt/top; Sneaker like Ankle boot; Dress like Coat), and
with them per-class AP would measure Fashion-MNIST's own label ambiguity rather than detection.

Train and val scenes are drawn in `TRAIN_STYLE` (the one place it is defined): half of their items
pasted untinted, grey as Fashion-MNIST really is, so the detector cannot lean on saturated colour,
at 14% to 42% of the shorter side. The test split keeps the first generator's scenes (every item
tinted, 14% to 42%), so test figures compare across generator versions.

The shifted split measures what training never saw: every item untinted, at 10% to 55% of the
shorter side, on backgrounds no training or validation scene uses: the two test-only photos, five
more photos kept for it alone (skimage's page, text, colorwheel, logo, horse), and synthetic
textures (smooth colour noise, stripes, checks) in 40% of its scenes. Nothing in training, model
selection or the threshold choice reads it.

Two selection splits, made only on request (`DemoSpec.selection`), are validation counterparts
of test and shifted for choosing data settings without reading either: val_tinted (drawn like
test) and val_shifted (drawn like shifted), both from validation items on training photos.

Splits never share items: train scenes use Fashion-MNIST train images 0-49,999, val scenes (and
the selection splits) 50,000-59,999, test and shifted scenes the official t10k images. Two photos
(sklearn's china.jpg and skimage's coffee) appear only in test and shifted scenes.

Deterministic: scene i of a split is drawn from its own generator seeded by (seed, split, i),
so the same command writes byte-identical files, and a smaller split is a prefix of a larger one.

Layout written under --out:

    train.json  val.json  test.json  shifted.json   COCO: images, annotations (bbox x,y,w,h), categories
    images/{train,val,test,shifted}/000000.jpg     file_name in the json is relative to the json's folder
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..console import progress
from . import fashion_mnist

CLASSES = ("T-shirt/top", "Trouser", "Sandal", "Bag", "Ankle boot")
_FASHION_INDEX = {"T-shirt/top": 0, "Trouser": 1, "Sandal": 5, "Bag": 8, "Ankle boot": 9}
SPLITS = ("train", "val", "test", "shifted")  # selection splits (SELECTION_STYLE) come on request
_SPLIT_ID = {"train": 0, "val": 1, "test": 2, "shifted": 3, "val_tinted": 4, "val_shifted": 5}
TEST_ONLY_BACKGROUNDS = ("china", "coffee")
SHIFTED_ONLY_BACKGROUNDS = ("page", "text", "colorwheel", "logo", "horse")
GENERATOR_VERSION = 2  # bump when scenes change, so cached copies are rebuilt

MIN_SIDE, MAX_SIDE = 180, 480
MAX_ITEMS = 6
MAX_OVERLAP = 0.2  # intersection / area of the smaller box, between any two items


@dataclass(frozen=True)
class SceneStyle:
    """How one split's scenes look."""

    item_fraction: tuple[float, float]  # item canvas side as a fraction of the image's shorter side
    untinted: float = 0.0  # share of items pasted grey instead of tinted
    textures: float = 0.0  # share of scenes on a synthetic texture instead of a photo


# The one definition of each split's look. TRAIN_STYLE is the training and validation scenes' (both
# demo recipes use it): chosen among four candidates (items 10-50% or 14-42%, untinted 0.35 or 0.5)
# on the selection splits below, by a rule written down first (docs/generalization_detection.md).
TRAIN_STYLE = SceneStyle((0.14, 0.42), untinted=0.5)
TEST_STYLE = SceneStyle((0.14, 0.42))  # the first generator's scenes, kept for the test split
SHIFTED_STYLE = SceneStyle((0.10, 0.55), untinted=1.0, textures=0.4)
# Selection splits: validation counterparts of test and shifted, drawn the same way but from the
# validation items and the training photos, for comparing data settings without looking at test
# or shifted. Generated only when asked (`DemoSpec.selection`); training never reads them.
SELECTION_STYLE = {"val_tinted": TEST_STYLE, "val_shifted": SHIFTED_STYLE}
# Which Fashion-MNIST item pool each split draws from.
_ITEM_POOL = {"train": "train", "test": "test", "shifted": "test"} | {k: "val" for k in ("val", *SELECTION_STYLE)}


@dataclass(frozen=True)
class DemoSpec:
    """What to generate; `key()` names a cached copy."""

    train: int = 2000
    val: int = 300
    test: int = 300
    seed: int = 0
    shifted: int | None = None  # None: as many as test
    train_style: SceneStyle = TRAIN_STYLE  # train and val scenes
    selection: int = 0  # scenes in each selection split (val_tinted, val_shifted); 0: none

    def counts(self) -> dict[str, int]:
        shifted = self.test if self.shifted is None else self.shifted
        counts = {"train": self.train, "val": self.val, "test": self.test, "shifted": shifted}
        return counts | ({k: self.selection for k in SELECTION_STYLE} if self.selection else {})

    def style(self, split: str) -> SceneStyle:
        if split == "test":
            return TEST_STYLE
        if split == "shifted":
            return SHIFTED_STYLE
        return SELECTION_STYLE.get(split, self.train_style)

    def key(self) -> str:
        raw = json.dumps(
            {"v": GENERATOR_VERSION, **self.counts(), "seed": self.seed, "style": asdict(self.train_style)},
            sort_keys=True,
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:10]


@functools.cache
def load_backgrounds() -> dict[str, np.ndarray]:
    """Real photos that load offline, as uint8 RGB arrays, by name (cached: do not modify them)."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        photos[name] = getattr(sd, name)()
    left, _right, _ = sd.stereo_motorcycle()
    photos["motorcycle"] = left
    for name in ("camera", "brick", "grass", "gravel", "moon", "coins", "clock", "cell", "page", "text", "horse"):
        grey = getattr(sd, name)()
        grey = grey.astype(np.uint8) * 255 if grey.dtype == bool else grey  # horse is boolean
        photos[name] = np.repeat(grey[..., None], 3, axis=2)
    photos["colorwheel"] = sd.colorwheel()
    logo = sd.logo().astype(np.float32)  # RGBA: its transparent parts become white
    photos["logo"] = logo[..., :3] * (logo[..., 3:] / 255) + 255 * (1 - logo[..., 3:] / 255)
    samples = load_sample_images()
    for path, img in zip(samples.filenames, samples.images, strict=True):
        photos[Path(path).stem] = img
    return {k: np.ascontiguousarray(v[..., :3]).astype(np.uint8) for k, v in sorted(photos.items())}


@functools.cache
def load_items(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N,28,28) and class indices into CLASSES for one split's item pool (cached)."""
    x, y = fashion_mnist.load("test" if split == "test" else "train")
    if split != "test":
        part = slice(0, 50_000) if split == "train" else slice(50_000, 60_000)
        x, y = x[part], y[part]
    to_class = {f: c for c, f in enumerate(_FASHION_INDEX[n] for n in CLASSES)}
    keep = np.isin(y, list(to_class))
    return x[keep], np.asarray([to_class[int(v)] for v in y[keep]], dtype=np.int64)


def _background(rng: np.random.Generator, photo: np.ndarray, width: int, height: int) -> np.ndarray:
    """A random crop of `photo` with the scene's aspect, resized to width x height, maybe mirrored."""
    ph, pw = photo.shape[:2]
    aspect = width / height
    cw_max = min(pw, ph * aspect)
    cw = cw_max * rng.uniform(0.4, 1.0)
    ch = cw / aspect
    x0 = rng.uniform(0, pw - cw)
    y0 = rng.uniform(0, ph - ch)
    crop = Image.fromarray(photo).resize(
        (width, height), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=2.0
    )
    out = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out * rng.uniform(0.75, 1.15)


def photo_pool(split: str) -> list[np.ndarray]:
    """The photos one split's scenes are drawn on."""
    photos = load_backgrounds()
    if split == "shifted":
        names = TEST_ONLY_BACKGROUNDS + SHIFTED_ONLY_BACKGROUNDS
    elif split == "test":
        names = tuple(k for k in photos if k not in SHIFTED_ONLY_BACKGROUNDS)
    else:
        names = tuple(k for k in photos if k not in TEST_ONLY_BACKGROUNDS + SHIFTED_ONLY_BACKGROUNDS)
    return [photos[k] for k in names]


def texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A synthetic background (float32 HxWx3): smooth colour noise, stripes or checks."""
    kind = int(rng.integers(3))
    if kind == 0:
        coarse = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(8, 40)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    if kind == 1:
        w = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    else:
        v = -xs * np.sin(angle) + ys * np.cos(angle)
        w = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    return (w[..., None] * a + (1 - w[..., None]) * b).astype(np.float32)


def _item_layer(item: np.ndarray, side: int, tint: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """An item resized to side x side: RGB colour (tinted and textured; grey when `tint` is
    None) and an alpha mask in [0, 1]."""
    img = Image.fromarray(item)
    grey = np.asarray(img.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    # Fashion-MNIST backgrounds are 0 with faint noise; anything above ~4% is the item.
    mask = (item > 10).astype(np.uint8) * 255
    alpha = np.asarray(Image.fromarray(mask).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    if tint is None:  # as Fashion-MNIST draws it: the intensity itself
        return np.repeat(grey[..., None] * 255.0, 3, axis=2), alpha
    colour = tint[None, None, :] * (0.35 + 0.65 * grey[..., None])
    return colour, alpha


def item_box(item: np.ndarray, side: int, x0: int, y0: int) -> tuple[float, float, float, float] | None:
    """The tight box (x1, y1, x2, y2) an item pasted at (x0, y0) with canvas `side` will have."""
    _, alpha = _item_layer(item, side, np.zeros(3, np.float32))
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) == 0:
        return None
    return float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1)


def paste_item(
    canvas: np.ndarray, item: np.ndarray, x0: int, y0: int, side: int, tint: np.ndarray | None, opacity: float = 1.0
) -> None:
    """Paste an item (tinted, or grey when `tint` is None) into a float32 HxWx3 canvas in place,
    through its own intensity mask."""
    colour, alpha = _item_layer(item, side, tint)
    region = canvas[y0 : y0 + side, x0 : x0 + side]
    a = alpha[..., None] * opacity
    canvas[y0 : y0 + side, x0 : x0 + side] = a * colour + (1 - a) * region


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def make_scene(
    rng: np.random.Generator,
    photos: list[np.ndarray],
    items: np.ndarray,
    item_classes: np.ndarray,
    style: SceneStyle = TEST_STYLE,
) -> tuple[np.ndarray, list[tuple[int, tuple[float, float, float, float]]]]:
    """One scene: uint8 HxWx3 image and [(class index, (x1, y1, x2, y2))] boxes."""
    width = int(rng.integers(240, 481))
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.8))))
    height = int(np.clip(round(width / aspect), MIN_SIDE, MAX_SIDE))
    if style.textures and rng.random() < style.textures:
        canvas = texture(rng, width, height)
    else:
        canvas = _background(rng, photos[int(rng.integers(len(photos)))], width, height)
    boxes: list[tuple[int, tuple[float, float, float, float]]] = []
    for _ in range(int(rng.integers(1, MAX_ITEMS + 1))):
        cls = int(rng.integers(len(CLASSES)))
        pool = np.flatnonzero(item_classes == cls)
        item = items[pool[int(rng.integers(len(pool)))]]
        side = round(rng.uniform(*style.item_fraction) * min(width, height))
        hue, sat, val = rng.random(), rng.uniform(0.25, 1.0), rng.uniform(0.55, 1.0)
        tint: np.ndarray | None = np.asarray(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0
        if style.untinted and rng.random() < style.untinted:
            tint = None
        rel = item_box(item, side, 0, 0)
        if rel is None:
            continue
        for _try in range(20):
            x0 = int(rng.integers(0, width - side + 1))
            y0 = int(rng.integers(0, height - side + 1))
            box = (x0 + rel[0], y0 + rel[1], x0 + rel[2], y0 + rel[3])
            if all(_overlap(box, b) <= MAX_OVERLAP for _, b in boxes):
                break
        else:
            continue
        # A little of the photo shows through.
        paste_item(canvas, item, x0, y0, side, tint, opacity=float(rng.uniform(0.8, 1.0)))
        boxes.append((cls, box))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), boxes


def generate(out: Path, spec: DemoSpec, *, show_progress: bool = True) -> Path:
    """Write the splits under `out` (see the module docstring); returns `out`."""
    out = Path(out)
    categories = [{"id": i + 1, "name": n, "supercategory": "fashion"} for i, n in enumerate(CLASSES)]
    for split, count in spec.counts().items():
        items, item_classes = load_items(_ITEM_POOL[split])
        pool, style = photo_pool(split), spec.style(split)
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        indices = range(count)
        if show_progress:
            indices = progress(indices, f"scenes {split}", total=count, unit="img")
        for i in indices:
            rng = np.random.default_rng([spec.seed, _SPLIT_ID[split], i])
            pixels, boxes = make_scene(rng, pool, items, item_classes, style)
            file_name = f"images/{split}/{i:06d}.jpg"
            Image.fromarray(pixels).save(out / file_name, format="JPEG", quality=92)
            images.append({"id": i + 1, "file_name": file_name, "width": pixels.shape[1], "height": pixels.shape[0]})
            for cls, (x1, y1, x2, y2) in boxes:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": cls + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
        doc = {
            "info": {
                "description": "graft detection demo: Fashion-MNIST items on real photos",
                "version": str(GENERATOR_VERSION),
                "generator": "scripts/make_detection_data.py",
                "seed": spec.seed,
                "split": split,
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (out / f"{split}.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return out


def ensure_demo_data(root: Path, spec: DemoSpec) -> Path:
    """A cached copy of the demo dataset under `root`, generated on first use."""
    folder = Path(root) / f"detection-demo-{spec.key()}"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, spec)
    (tmp / ".complete").write_text(json.dumps(spec.counts()) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
