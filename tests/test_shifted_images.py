"""The shifted test split generator and the augmented training views of the image recipes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.manifest import ImagePreprocessing
from models.preprocess import ImagePreprocessor
from scripts.train.augment import policy
from scripts.train.data.images import ImageSplit, augmented_views
from scripts.train.data.shifted_images import PHOTO_SHIFTS, SHIFTS, shift_image, shifted_arrays, shifted_images
from scripts.train.views import view_count


def _items(n: int = 40, seed: int = 0) -> ImageSplit:
    """Fashion-MNIST-like items: a bright blob on black, 28 x 28 grey."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(3, 10, size=2)
        x[i, y0 : y0 + 14, x0 : x0 + 12] = rng.integers(120, 255)
        x[i, y0 + 4 : y0 + 8, x0 + 2 : x0 + 10] = 30  # some inner detail
    return ImageSplit(labels=np.arange(n) % 10, arrays=x)


def test_shifted_split_is_deterministic_same_shape_and_differs_from_the_source() -> None:
    split = _items()
    a, kinds_a = shifted_arrays(split, seed=3)
    b, kinds_b = shifted_arrays(split, seed=3)
    assert a.shape == (40, 28, 28, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and kinds_a == kinds_b
    c, _ = shifted_arrays(split, seed=4)
    assert not np.array_equal(a, c), "another seed gives another split"
    source = np.repeat(split.arrays[..., None], 3, axis=-1).astype(np.int16)
    changed = np.abs(a.astype(np.int16) - source).reshape(40, -1).max(axis=1)
    assert (changed > 0).all(), "every image is re-rendered"
    assert set(kinds_a) <= set(SHIFTS) and len(set(kinds_a)) >= 4, Counter(kinds_a)


def test_an_image_shift_does_not_depend_on_the_others() -> None:
    split = _items()
    whole, kinds = shifted_arrays(split, seed=3)
    part, part_kinds = shifted_arrays(split.subset(np.arange(10)), seed=3)
    assert np.array_equal(whole[:10], part) and kinds[:10] == part_kinds


@pytest.mark.parametrize("kind", SHIFTS)
def test_each_shift_keeps_the_size_and_changes_the_pixels(kind: str) -> None:
    img = Image.fromarray(_items(1).arrays[0])
    out = shift_image(img, kind, np.random.default_rng(0))
    assert out.size == img.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))
    if kind == "inverted":
        assert np.asarray(out)[0, 0, 0] == 255  # the black background turned white


def test_photos_get_only_the_shifts_that_apply_to_photos(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(12):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    split = ImageSplit(labels=np.zeros(12, dtype=np.int64), paths=paths)
    pairs = list(shifted_images(split, seed=0))
    assert all(k in PHOTO_SHIFTS for _, k in pairs)
    assert all(img.size == (50, 40) for img, _ in pairs)


def test_augmented_views_are_seeded_model_sized_and_change_the_pixels() -> None:
    split = _items(6)
    pre = ImagePreprocessor(ImagePreprocessing(height=64, width=64))
    light = policy("light")
    assert light is not None

    def views(seed: int) -> np.ndarray:
        return np.concatenate([x for _, x in augmented_views(split, pre, light, 3, seed, chunk=4)], axis=1)

    a = views(0)
    assert a.shape == (3, 6, 3, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a, views(0)), "the same seed gives the same views"
    assert not np.array_equal(a, views(1))
    clean = pre.batch([split.image(i) for i in range(6)])
    for v in range(3):
        assert not np.allclose(a[v], clean, atol=1e-3), "a view is not the clean image"
    assert not np.array_equal(a[0], a[1]), "views of one image differ"


def test_view_count_is_one_per_epoch_within_the_memory_budget() -> None:
    assert view_count(100, 4096, epochs=60) == 60  # a small set: a fresh view every epoch
    assert view_count(5_000, 4096, epochs=2) == 2
    assert view_count(55_000, 4096, epochs=2) == 1  # the default recipe: the image budget binds
    assert view_count(20_000, 4096, epochs=10, images=10**6, memory=100 << 20) == 1  # memory binds
    assert view_count(20_000, 4096, epochs=10, images=10**6, memory=400 << 20) == 5
    assert view_count(10**7, 4096, epochs=5) == 1  # never less than one


def test_the_trainer_draws_one_cached_view_per_image_and_epoch() -> None:
    from dataclasses import replace

    import torch
    from torch import nn

    from models.recipes import IMAGE_QUICK
    from scripts.train.fit import Streams
    from scripts.train.tasks.image_classification import image_trainer

    torch.manual_seed(0)
    n, v = 40, 3
    feats = torch.randn(v, n, 4, 2, 2)
    y = np.arange(n) % 2
    top = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    recipe = replace(IMAGE_QUICK, batch_size=16)
    trainer = image_trainer(top, top[-1], feats, y, feats[0], y, recipe, 2, views=True)
    batches = trainer.batches(Streams.seeded(0))
    assert len(batches) == 3
    which, idx = torch.cat(batches, dim=1)
    assert sorted(idx.tolist()) == list(range(n)), "every image once an epoch"
    assert set(which.tolist()) == set(range(v)), "drawn from all the views"
    assert torch.equal(torch.cat(trainer.batches(Streams.seeded(0)), dim=1), torch.stack((which, idx)))
    loss, count, _ = trainer.loss(batches[0])
    assert count == 16 and torch.isfinite(loss)


def test_shifted_metrics_run_the_session_on_every_rendered_image() -> None:
    from scripts.train.data.shifted_images import shifted_metrics

    split = _items(30)
    pre = ImagePreprocessor(ImagePreprocessing(height=32, width=32))
    seen: list[np.ndarray] = []

    class Session:  # predicts class 1 for a bright top-left corner (inverted, some textured), else class 0
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            x = feeds["input"]
            seen.append(x.copy())
            bright = x[:, 0, 0, 0] > 0
            return [np.stack([~bright, bright], axis=1).astype(np.float32)]

    m = shifted_metrics(Session(), split, pre, [str(i) for i in range(10)], batch=8)
    assert m.split == "shifted-test" and m.samples == 30
    assert sum(len(x) for x in seen) == 30 and seen[0].shape == (8, 3, 32, 32)
    arrays, kinds = shifted_arrays(split)
    bright = np.array([pre(Image.fromarray(a))[0][0, 0, 0] > 0 for a in arrays])
    assert bright[np.asarray(kinds) == "inverted"].all()
    expected = np.mean(bright.astype(int) == split.labels)
    assert m.values["accuracy"] == pytest.approx(expected, abs=1e-5)
    assert {f"accuracy_{k}" for k in kinds} <= set(m.values)
