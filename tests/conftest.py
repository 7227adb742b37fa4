"""Shared fixtures: one registry per test session, filled by the real fine-tune script's
quick recipes, and real `bentoml serve` processes on loopback."""

from __future__ import annotations

import csv
import gzip
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRAFT_NO_PROGRESS", "1")
# Servers under test run one worker unless a test asks for more: several tests read one worker's
# batching counters or kill its one process. The default (auto: one per CPU) runs in
# test_deploy's serving-install test, and two workers in test_lifecycle.
os.environ.setdefault("GRAFT_WORKERS", "1")

FASHION = Path(os.environ.get("GRAFT_FASHION_MNIST") or "/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's model registry. GRAFT_TEST_REGISTRY reuses a pre-built one (local runs)."""
    reuse = os.environ.get("GRAFT_TEST_REGISTRY")
    if reuse:
        path = Path(reuse)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("registry")


def _build(registry: Path, task: str, *extra: str) -> Path:
    """The artifact of `task` the registry serves, built with --quick if there is none, or if it
    predates checkpoint.safetensors (tests fine-tune from it with --init-from)."""
    from models.servable import served_version
    from scripts.finetune import main

    existing = served_version(registry, task)
    if existing and (registry / task / existing / "checkpoint.safetensors").is_file():
        return registry / task / existing
    return main([task, "--quick", "--registry", str(registry), *extra])


@pytest.fixture(scope="session")
def image_artifact(registry: Path) -> Path:
    return _build(registry, "image-classification")


@pytest.fixture(scope="session")
def sentiment_artifact(registry: Path) -> Path:
    return _build(registry, "sentiment")


@pytest.fixture(scope="session")
def detection_artifact(registry: Path) -> Path:
    return _build(registry, "object-detection")


@pytest.fixture(scope="session")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """The official Fashion-MNIST test split (10,000 images, labels)."""
    x = np.frombuffer(gzip.open(FASHION / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    y = np.frombuffer(gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return x.reshape(-1, 28, 28), y.astype(np.int64)


@dataclass(frozen=True)
class TinyData:
    """Datasets small enough that a fine-tune on them takes seconds (CLI and README tests)."""

    images: Path  # ImageFolder: 3 classes x 16 images, PNG and JPEG, 40 px
    coco: Path  # a folder with train.json, val.json, test.json and images/
    coco_json: Path  # one COCO json whose images the loader splits 80/10/10
    texts: Path  # CSV with text and label columns, 60 tweets
    unlabelled: Path  # .txt, one text a line


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, fashion_test) -> TinyData:
    from scripts.train.data.detection_demo import DemoSpec, generate
    from scripts.train.data.text import load_text_dataset

    root = tmp_path_factory.mktemp("tiny")
    x, y = fashion_test
    for cid, name in {1: "trouser", 7: "sneaker", 8: "bag"}.items():
        (root / "images" / name).mkdir(parents=True)
        for n, i in enumerate((y == cid).nonzero()[0][:16]):
            fmt = "JPEG" if n % 2 else "PNG"
            img = Image.fromarray(x[i]).resize((40, 40))
            (root / "images" / name / f"{n:02d}.{fmt.lower()}").write_bytes(encode(img, fmt))
    coco = generate(root / "coco", DemoSpec(train=16, val=4, test=4, seed=5), show_progress=False)
    shelf = generate(root / "shelf", DemoSpec(train=20, val=0, test=0, seed=6), show_progress=False)
    (shelf / "train.json").rename(shelf / "instances.json")
    for split in ("val", "test"):
        (shelf / f"{split}.json").unlink()
    corpus = load_text_dataset(None, seed=0)
    with (root / "reviews.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(
            (t, corpus.labels[c]) for t, c in zip(corpus.train.texts[:60], corpus.train.labels[:60], strict=True)
        )
    (root / "unlabelled.txt").write_text("\n".join(corpus.train.texts[100:140]) + "\n", encoding="utf-8")
    return TinyData(root / "images", coco, shelf / "instances.json", root / "reviews.csv", root / "unlabelled.txt")


def publish_copy(artifact: Path, registry: Path) -> Path:
    """Copy an artifact into another registry under its own name and version."""
    dst = registry / artifact.parent.name / artifact.name
    shutil.copytree(artifact, dst)
    return dst


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def copy_artifact(tmp_path: Path):
    """Copy an artifact into a fresh registry so a test can tamper with it."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / "reg" / src.parent.name / src.name
        shutil.copytree(src, dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def server(
    registry: Path, image_artifact: Path, sentiment_artifact: Path, detection_artifact: Path
) -> Iterator[object]:
    """One real `bentoml serve` over the session registry, shared by read-only HTTP tests."""
    from scripts.server_process import BentoServer

    with BentoServer(registry) as srv:
        yield srv
