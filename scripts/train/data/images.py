"""Image-classification datasets: Fashion-MNIST from the Debian package, or a user's ImageFolder.

Every image reaches the model through `models.preprocess.ImagePreprocessor`, the same code the
service runs, so evaluation measures exactly what will be served.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.errors import InvalidInput
from models.preprocess import DecodeLimits, ImagePreprocessor, decode_image

from ..augment import Policy, classification_view
from ..console import log, progress
from . import fashion_mnist, hash_arrays

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


@dataclass
class ImageSplit:
    """Either in-memory uint8 arrays (N,H,W) / (N,H,W,3), or image file paths."""

    labels: np.ndarray
    arrays: np.ndarray | None = None
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> ImageSplit:
        return ImageSplit(
            labels=self.labels[idx],
            arrays=self.arrays[idx] if self.arrays is not None else None,
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
        )

    def image(self, i: int) -> Image.Image:
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i])
        assert self.paths is not None
        return Image.open(self.paths[i])

    def encoded(self, i: int) -> bytes:
        """The i-th image as file bytes (arrays are PNG-encoded, which is lossless)."""
        if self.paths is not None:
            return self.paths[i].read_bytes()
        import io

        buf = io.BytesIO()
        self.image(i).save(buf, format="PNG")
        return buf.getvalue()


@dataclass
class ImageDataset:
    name: str
    labels: list[str]
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    sha256: str
    description: str = ""


def stratified_split(labels: np.ndarray, n_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, holdout) with `n_holdout` items drawn per class in proportion."""
    rng = np.random.default_rng(seed)
    frac = n_holdout / len(labels)
    keep, hold = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round(len(idx) * frac)
        hold.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


def load_fashion_mnist(val_size: int, seed: int, train_limit: int | None = None) -> ImageDataset:
    """Fashion-MNIST: the train split less a stratified validation hold-out, the official test split."""
    x_train, y_train = fashion_mnist.load("train")
    x_test, y_test = fashion_mnist.load("test")
    digest = hash_arrays(x_train, y_train, x_test, y_test)
    full = ImageSplit(labels=y_train, arrays=x_train)
    keep, hold = stratified_split(y_train, val_size, seed)
    train, val = full.subset(keep), full.subset(hold)
    if train_limit is not None and train_limit < len(train):
        keep2, _ = stratified_split(train.labels, len(train) - train_limit, seed + 1)
        train = train.subset(keep2)
    return ImageDataset(
        name="fashion-mnist",
        labels=list(fashion_mnist.LABELS),
        train=train,
        val=val,
        test=ImageSplit(labels=y_test, arrays=x_test),
        sha256=digest,
        description="Fashion-MNIST (Debian dataset-fashion-mnist): 28x28 grey, train split less a "
        f"stratified validation hold-out of {val_size}; test = the official 10,000 test images",
    )


def readable_image(path: Path) -> str | None:
    """None when the serving decoder reads the file, else why not. JPEGs are decoded at a
    reduced scale (the whole compressed stream is still read, so truncation shows)."""
    try:
        decode_image(path.read_bytes(), DecodeLimits(), draft_size=(32, 32))
    except (InvalidInput, OSError) as e:
        return str(e)
    return None


def input_size_for(paths: list[Path], *, lo: int = 64, hi: int = 224, sample: int = 256) -> tuple[int, int]:
    """A model input size for a folder of images, and the median short side it came from.

    The recipes' 64 px suits Fashion-MNIST's 28 px items; photos and scans lose what matters at
    64 px. The median short side of (up to `sample` of) the training images, rounded to a
    multiple of 32 and kept within [lo, hi] (224: what ImageNet backbones were trained at).
    """
    step = max(1, len(paths) // sample)
    sides = []
    for p in paths[::step]:
        try:
            with Image.open(p) as im:  # the header only
                sides.append(min(im.size))
        except OSError:
            continue
    median = int(np.median(sides)) if sides else lo
    return min(hi, max(lo, 32 * round(median / 32))), median


def _scan_class_folders(root: Path, skipped: list[str]) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names, image paths and labels under root/<class>/...; hidden files are ignored and
    files the serving decoder cannot read are left out and listed in `skipped`."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for ci, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file() or p.name.startswith("."):
                continue
            problem = readable_image(p)
            if problem:
                skipped.append(f"{p.relative_to(root)} ({problem})")
                continue
            paths.append(p)
            labels.append(ci)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def load_image_folder(root: Path, val_size: int, seed: int, train_limit: int | None = None) -> ImageDataset:
    """`root/{train,val,test}/<class>/*.jpg`, or `root/<class>/*.jpg` split 80/10/10 (stratified)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a directory")
    skipped: list[str] = []
    if (root / "train").is_dir():
        classes, tr_paths, tr_y = _scan_class_folders(root / "train", skipped)
        splits = {}
        for split in ("val", "test"):
            if (root / split).is_dir():
                c2, p2, y2 = _scan_class_folders(root / split, skipped)
                remap = np.asarray([classes.index(c) if c in classes else -1 for c in c2])
                if (remap < 0).any():
                    raise ValueError(f"{root / split} has classes missing from train: {set(c2) - set(classes)}")
                splits[split] = ImageSplit(labels=remap[y2] if len(y2) else y2, paths=p2)
        train = ImageSplit(labels=tr_y, paths=tr_paths)
        if "val" not in splits:
            keep, hold = stratified_split(train.labels, min(val_size, len(train) // 10 or 1), seed)
            train, splits["val"] = train.subset(keep), train.subset(hold)
        if "test" not in splits:
            keep, hold = stratified_split(train.labels, max(1, len(train) // 10), seed + 2)
            train, splits["test"] = train.subset(keep), train.subset(hold)
        val, test = splits["val"], splits["test"]
    else:
        classes, paths, y = _scan_class_folders(root, skipped)
        full = ImageSplit(labels=y, paths=paths)
        rest, test_idx = stratified_split(y, max(1, len(y) // 10), seed + 2)
        test = full.subset(test_idx)
        rest_split = full.subset(rest)
        keep, hold = stratified_split(rest_split.labels, max(1, min(val_size, len(rest) // 9)), seed)
        train, val = rest_split.subset(keep), rest_split.subset(hold)
    if skipped:
        log(f"left out {len(skipped)} unreadable image file(s): " + "; ".join(skipped[:5]))
    if len(classes) < 2:
        raise ValueError(f"--data {root}: need at least 2 class folders, found {classes}")
    if len(train) == 0:
        raise ValueError(f"--data {root}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    if train_limit is not None and train_limit < len(train):
        keep2, _ = stratified_split(train.labels, len(train) - train_limit, seed + 1)
        train = train.subset(keep2)
    names = [str(p.relative_to(root)) for s in (train, val, test) for p in (s.paths or [])]
    sizes = [p.stat().st_size for s in (train, val, test) for p in (s.paths or [])]
    return ImageDataset(
        name=root.name,
        labels=classes,
        train=train,
        val=val,
        test=test,
        sha256=hash_arrays(names, sizes),
        description=f"ImageFolder {root}"
        + (f"; {len(skipped)} unreadable file(s) left out: {'; '.join(skipped[:20])}" if skipped else ""),
    )


def to_tensors(split: ImageSplit, pre: ImagePreprocessor, desc: str) -> np.ndarray:
    """Run every image of a split through the serving preprocessing (N x 3 x H x W float32)."""
    out = np.empty((len(split), 3, pre.spec.height, pre.spec.width), dtype=np.float32)
    limits = DecodeLimits()
    for i in progress(range(len(split)), desc, total=len(split), unit="img"):
        if split.paths is not None:
            out[i] = pre.from_bytes(split.paths[i].read_bytes(), limits)[0]
        else:
            out[i] = pre(split.image(i))[0]
    return out


def upright(split: ImageSplit, i: int) -> Image.Image:
    """The i-th image whole: an array as it is, a file decoded upright (EXIF applied) as RGB."""
    if split.paths is None:
        return split.image(i)
    return decode_image(split.paths[i].read_bytes(), DecodeLimits())


def augmented_views(
    split: ImageSplit, pre: ImagePreprocessor, policy: Policy, views: int, seed: int, chunk: int = 256
) -> Iterator[tuple[int, np.ndarray]]:
    """`views` augmented training views of every image, chunk by chunk: (first index, an array
    views x n x 3 x H x W), so that only features, never all the views, need to be kept.

    A view is cut from the whole image, so the random resized crop happens at the resize to the
    model's input size (Fashion-MNIST: 28 px -> 64 px), then flipped and changed in colour,
    blur and JPEG quality (`augment.classification_view`); it then takes the serving
    preprocessing's normalisation. Deterministic given the split, the policy and the seed.
    """
    rng = np.random.default_rng([seed, 20])
    size = (pre.spec.width, pre.spec.height)
    for start in range(0, len(split), chunk):
        n = min(chunk, len(split) - start)
        out = np.empty((views, n, 3, pre.spec.height, pre.spec.width), dtype=np.float32)
        for j in range(n):
            img = upright(split, start + j)
            for v in range(views):
                out[v, j] = pre(classification_view(img, policy, rng, size))[0]
        yield start, out
