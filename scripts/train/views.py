"""Augmentation with a frozen trunk: cached features of several augmented views per image.

The image recipes train only the layers after a frozen prefix (the trunk) and feed them the
trunk's outputs, computed once. Augmentation changes the pixels, so each augmented view must go
through the trunk too; doing that for every batch of every epoch would undo the cache. Instead
`K` augmented views of every training image go through the trunk once, up front, and are cached
beside the clean image's features; each epoch then draws, per image, one of the `1 + K` cached
views. Training steps cost what they cost without augmentation; the price is `K` more trunk
passes over the training set, and `K` times its features in memory.

`K` is the number of epochs (a new view of every image each epoch: what running the trunk per
batch would give; 100 images over 60 epochs cost about 25 CPU-s), bounded by two budgets that
bind for a large training set such as the default recipe's 55,000 images: the augmented images
that go through the trunk (measured: about 4 ms of CPU a view with MobileNetV2's first 11 blocks
at 64 px, of which drawing the view is about 0.25 ms) and the host memory their features take.
See docs/generalization_images.md for what it buys.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from models.preprocess import ImagePreprocessor

from .augment import Policy, policy
from .console import progress
from .data.images import ImageSplit, augmented_views
from .device import module_device
from .nets.backbones import channels_last

# At most this many augmented images through the trunk (about one extra pass over the default
# recipe's training set: roughly 4 minutes of CPU) and this much host memory for their features.
VIEW_BUDGET_IMAGES = 60_000
VIEW_BUDGET_BYTES = 640 << 20
CHUNK = 256  # images whose views go through the trunk together


def view_count(
    n_images: int,
    feature_bytes: int,
    epochs: int,
    images: int = VIEW_BUDGET_IMAGES,
    memory: int = VIEW_BUDGET_BYTES,
) -> int:
    """How many augmented views per image to cache: one per epoch, within the budgets (at least 1)."""
    n = max(1, n_images)
    return max(1, min(epochs, images // n, memory // (n * max(1, feature_bytes))))


@torch.no_grad()
def view_features(
    trunk: nn.Module,
    clean: torch.Tensor,
    split: ImageSplit,
    pre: ImagePreprocessor,
    policy: Policy,
    views: int,
    seed: int,
) -> tuple[torch.Tensor, str]:
    """(1 + views) x N x ... trunk features: the clean images' (`clean`, given) first, then `views`
    augmented views of each image (see `data.images.augmented_views`); and a note saying what it
    did and what it cost, for the manifest."""
    wall, cpu = time.perf_counter(), time.process_time()
    trunk.eval()
    device = module_device(trunk)
    out = torch.empty((1 + views, *clean.shape), dtype=clean.dtype)
    out[0] = clean
    chunks = augmented_views(split, pre, policy, views, seed, chunk=CHUNK)
    total = math.ceil(len(split) / CHUNK)
    for start, x in progress(chunks, f"trunk over {views} augmented view(s)", total=total, unit="chunk"):
        n = x.shape[1]
        flat = torch.from_numpy(np.ascontiguousarray(x.reshape(views * n, *x.shape[2:])))
        feats = trunk(channels_last(flat.to(device))).cpu()
        out[1:, start : start + n] = feats.reshape(views, n, *feats.shape[1:])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    note = (
        f"{views} augmented view(s) of each of the {len(split):,} training images ({policy.describe()}) went once "
        f"through the frozen trunk and are cached beside the clean image's features; each epoch draws one of the "
        f"{1 + views} per image. Cost: {wall:.1f} s ({cpu:.1f} CPU-s), "
        f"{out[1:].numel() * out.element_size() / 2**20:.0f} MiB of cached features"
    )
    return out, note


def augmented_features(trunk: nn.Module, clean: torch.Tensor, task: Any) -> tuple[torch.Tensor, int, str]:
    """An image-classification task's training features with its recipe's augmentation: the
    (1 + views) x N x ... cache, the number of views, and the training note."""
    r, split = task.recipe, task.data.train
    level = policy(r.augment)
    assert level is not None, "no augmentation to cache"
    views = view_count(len(split), clean[0].numel() * clean.element_size(), r.epochs)
    out, note = view_features(trunk, clean, split, task.pre, level, views, task.options.seed)
    return out, views, f"augmentation {r.augment} at the resize to {r.image_size} px: {note}"
