"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (or $GRAFT_FASHION_MNIST):
the image-classification demo data, and the items pasted into the detection demo scenes."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FOLDERS = (os.environ.get("GRAFT_FASHION_MNIST", ""), "/usr/share/datasets/fashion-mnist")


def find() -> Path:
    """The folder holding the four *-ubyte.gz files, or an error saying how to get them."""
    for d in FOLDERS:
        if d and (Path(d) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(d)
    raise FileNotFoundError(
        "Fashion-MNIST not found. Install the Debian package (apt-get install -y dataset-fashion-mnist), "
        "set GRAFT_FASHION_MNIST to a folder with the four *-ubyte.gz files, or pass --data IMAGE_FOLDER."
    )


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N int64) of the official `train` (60,000) or `test` (10,000) split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    d = find()
    x = _idx(d / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y = _idx(d / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return x, y
