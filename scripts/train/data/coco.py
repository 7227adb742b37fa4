"""Object-detection datasets in COCO format: loading and splitting (COCO metrics: scripts/train/metrics.py).

`--data` for object-detection takes either

* a folder holding `train.json` and optionally `val.json` and `test.json` (the layout
  `scripts/make_detection_data.py` writes; `instances_<split>.json` names work too), or
* one COCO json file: its images are split 80/10/10 into train/val/test by a seeded shuffle.

An image's `file_name` is looked up relative to the json's folder, then under `images/` and
`images/<split>/` beside it, so both `images/train/0001.jpg` and bare `0001.jpg` work. Class
names come from the json's `categories`, ordered by category id; val and test must use the same
category names as train. `iscrowd` annotations are skipped. Boxes are COCO `[x, y, w, h]` in
image pixels and become x1,y1,x2,y2 here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..console import log
from . import hash_arrays
from .images import readable_image

SPLITS = ("train", "val", "test")


@dataclass
class DetectionImage:
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 in image pixels
    labels: np.ndarray  # (N,) int64 indices into the dataset's labels


@dataclass
class DetectionSplit:
    images: list[DetectionImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def objects(self) -> int:
        return sum(len(im.labels) for im in self.images)

    def subset(self, idx: list[int] | np.ndarray) -> DetectionSplit:
        return DetectionSplit([self.images[int(i)] for i in idx])


@dataclass
class DetectionDataset:
    name: str
    labels: list[str]
    train: DetectionSplit
    val: DetectionSplit
    test: DetectionSplit
    sha256: str
    description: str = ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--data {path}: cannot read COCO json ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"--data {path}: not a COCO json (needs 'images', 'annotations', 'categories')")
    if not doc.get("categories"):
        raise ValueError(f"--data {path}: no 'categories'; class names come from them")
    return doc


def _resolve_image(json_path: Path, file_name: str, split: str) -> Path:
    base = json_path.parent
    candidates = [base / file_name, base / "images" / file_name, base / "images" / split / file_name]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"{json_path}: image {file_name!r} not found; looked in " + ", ".join(str(c.parent) for c in candidates)
    )


def load_coco(json_path: Path, split: str = "train") -> tuple[list[str], DetectionSplit]:
    """Parse one COCO json into (class names by category id, images with xyxy boxes)."""
    json_path = Path(json_path)
    doc = _read_json(json_path)
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in cats]
    if len(set(names)) != len(names):
        raise ValueError(f"{json_path}: category names are not unique: {names}")
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    per_image: dict[Any, list[tuple[list[float], int]]] = {}
    malformed: list[str] = []
    for a in doc.get("annotations", []):
        if a.get("iscrowd", 0):
            continue
        if a.get("category_id") not in cat_index:
            raise ValueError(f"{json_path}: annotation {a.get('id')} has unknown category_id {a.get('category_id')}")
        box = _box(a.get("bbox"))
        if box is None:
            malformed.append(str(a.get("id")))
            continue
        per_image.setdefault(a.get("image_id"), []).append((box, cat_index[a["category_id"]]))
    if malformed:
        log(
            f"{json_path.name}: skipped {len(malformed)} annotation(s) whose bbox is not 4 finite numbers "
            f"[x, y, width, height] (ids {', '.join(malformed[:10])})"
        )
    split_out = DetectionSplit()
    dropped = 0
    unreadable: list[str] = []
    missing: list[FileNotFoundError] = []
    for im in sorted(doc["images"], key=lambda i: i["id"]):
        try:
            path = _resolve_image(json_path, im["file_name"], split)
        except FileNotFoundError as e:
            missing.append(e)
            unreadable.append(f"{im['file_name']} (not found)")
            continue
        problem = readable_image(path)
        if problem:
            unreadable.append(f"{im['file_name']} ({problem})")
            continue
        if im.get("width") and im.get("height"):
            w, h = int(im["width"]), int(im["height"])
        else:  # some exporters leave the size out: read it from the file's header
            with Image.open(path) as header:
                w, h = header.size
        boxes, labels = [], []
        for (x, y, bw, bh), c in per_image.get(im["id"], []):
            x1, y1 = max(0.0, float(x)), max(0.0, float(y))
            x2, y2 = min(float(w), float(x) + float(bw)), min(float(h), float(y) + float(bh))
            if x2 - x1 < 1 or y2 - y1 < 1:
                dropped += 1
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(c)
        split_out.images.append(
            DetectionImage(
                path=path,
                width=w,
                height=h,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.asarray(labels, dtype=np.int64),
            )
        )
    if dropped:
        log(f"{json_path.name}: skipped {dropped} degenerate box(es) (under 1 pixel after clipping)")
    if missing and len(missing) * 2 > len(doc["images"]):  # most missing: the layout is wrong, say where we looked
        raise FileNotFoundError(f"{len(missing)} of {len(doc['images'])} images not found; first: {missing[0]}")
    if unreadable:
        log(f"{json_path.name}: left out {len(unreadable)} unreadable image(s): " + "; ".join(unreadable[:5]))
    return names, split_out


def _box(bbox: Any) -> list[float] | None:
    """A COCO [x, y, width, height] as 4 finite floats, or None."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        out = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _split_file(folder: Path, split: str) -> Path | None:
    for name in (f"{split}.json", f"instances_{split}.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_detection_data(data: Path, seed: int, train_limit: int | None = None) -> DetectionDataset:
    """Load `--data` (a folder of split jsons, or one COCO json split 80/10/10)."""
    data = Path(data)
    if data.is_dir():
        train_json = _split_file(data, "train")
        if train_json is None:
            raise FileNotFoundError(f"--data {data}: no train.json (or instances_train.json) in the folder")
        labels, train = load_coco(train_json, "train")
        splits: dict[str, DetectionSplit] = {"train": train}
        files = [train_json]
        for split in ("val", "test"):
            path = _split_file(data, split)
            if path is None:
                continue
            names, splits[split] = load_coco(path, split)
            files.append(path)
            if names != labels:
                raise ValueError(f"{path}: categories {names} differ from train's {labels}")
        rng = np.random.default_rng(seed)
        for split in ("val", "test"):
            if split not in splits:  # carve it out of train
                order = rng.permutation(len(splits["train"]))
                k = max(1, len(order) // 10)
                splits[split] = splits["train"].subset(np.sort(order[:k]))
                splits["train"] = splits["train"].subset(np.sort(order[k:]))
        name = data.name
    elif data.is_file():
        labels, everything = load_coco(data, "train")
        files = [data]
        order = np.random.default_rng(seed).permutation(len(everything))
        k = max(1, len(order) // 10)
        splits = {
            "test": everything.subset(np.sort(order[:k])),
            "val": everything.subset(np.sort(order[k : 2 * k])),
            "train": everything.subset(np.sort(order[2 * k :])),
        }
        name = data.stem
    else:
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if len(splits["train"]) == 0 or splits["train"].objects == 0:
        raise ValueError(f"--data {data}: the train split has no annotated objects")
    if train_limit is not None and train_limit < len(splits["train"]):
        splits["train"] = splits["train"].subset(range(train_limit))
    digest = hash_arrays([f.read_bytes().decode("utf-8", "replace") for f in files])
    return DetectionDataset(
        name=name,
        labels=labels,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        sha256=digest,
        description=f"COCO json {', '.join(f.name for f in files)} from {data}",
    )
