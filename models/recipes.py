"""Fine-tuning recipes per task: `default` (full quality) and `quick` (tests, demos).

A recipe is a frozen dataclass. The fields every task shares live in `Recipe`; each task adds
its own. `quick` is written as `replace(default, ...)`, so what differs between the two is all
it says. Command-line options replace single fields (`--epochs 3` -> `epochs=3`); the resolved
recipe is written into the manifest (`training.config`).

Plain dataclasses, no torch: the command line reads them before deciding to import training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What every task's recipe holds: what trains, how long, and when to stop early."""

    strategy: str = "partial"  # feature-extraction | partial | full | auto
    trainable_blocks: int  # with partial: how many of the last backbone blocks train
    epochs: int
    batch_size: int
    lr: float  # backbone layers
    head_lr: float  # the new layers (head, neck)
    weight_decay: float
    patience: int  # epochs without a validation gain before stopping
    # Small --data sets: at least this many optimizer steps, by training more epochs (at most
    # max_epochs); the demo data of every shipped recipe already has more.
    min_steps: int = 0
    max_epochs: int = 50
    train_limit: int | None = None
    baselines: bool = True  # measure the task's baselines (linear probe, bag of words) next to the model

    def as_config(self) -> dict[str, Any]:
        """The recipe as the manifest records it (nested dataclasses become dicts)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.as_config() if hasattr(value, "as_config") else value
        return out

    def has(self, name: str) -> bool:
        """Whether this recipe has a field `name` (command-line options map onto fields)."""
        return any(f.name == name for f in fields(self))


@dataclass(frozen=True, kw_only=True)
class ImageClassificationRecipe(Recipe):
    image_size: int = 64  # suits Fashion-MNIST; a --data folder gets its own from its images
    label_smoothing: float = 0.1
    val_size: int
    adabn: bool = False  # re-estimate frozen BatchNorm statistics on the target images first
    # --strategy auto: each candidate freeze depth trains auto_epochs on this many images.
    auto_train_size: int = 2000
    auto_val_size: int = 1000
    auto_epochs: int = 2
    augment: str = "none"  # none | light | strong: see scripts/train/augment.py


@dataclass(frozen=True, kw_only=True)
class SentimentRecipe(Recipe):
    max_length: int = 128
    warmup: float = 0.06  # share of the steps with a rising learning rate
    # Layer-wise learning-rate decay: the top block trains at `lr`, each block below at lr_decay
    # times the one above (1.0: the same lr everywhere). See docs/sentiment.md, "What lifts accuracy".
    lr_decay: float = 1.0
    label_smoothing: float = 0.0
    dropout: float = 0.1
    pooling: str = "mean"  # mean | mean+max (the head reads the mean and the max over real tokens)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    irreparable: str = "strip"  # mojibake that cannot be repaired: strip the junk bytes, or drop the row
    min_confidence: float | None = None
    val_limit: int | None = None
    test_limit: int | None = None
    parity_samples: int
    bench_repeats: int  # --quantize int8: alternating fp32/int8 passes timed
    # --quantize int8: training texts whose activations set the fixed int8 scales.
    calibration_texts: int
    # --adapt-on: masked-LM steps (the first adapt_head_steps train the MLM head alone).
    adapt_steps: int
    adapt_head_steps: int
    adapt_lr: float = 5e-5
    adapt_texts: int


@dataclass(frozen=True)
class DemoScenes:
    """How many generated detection scenes per split (scripts/train/data/detection_demo.py)."""

    train: int
    val: int
    test: int
    seed: int = 0  # how the scenes look (item scales, untinted share) is the generator's TRAIN_STYLE

    def as_config(self) -> dict[str, int]:
        return {"train": self.train, "val": self.val, "test": self.test, "seed": self.seed}


@dataclass(frozen=True, kw_only=True)
class DetectionRecipe(Recipe):
    image_size: int = 320  # input width; the height is 4:5 of it (both multiples of 32)
    neck_width: int = 64
    tower_depth: int = 1
    nms_iou: float = 0.5
    parity_images: int
    demo_data: DemoScenes
    pretrained: bool = True  # False: the same detector from a random backbone (the no-transfer baseline)
    augment: str = "none"  # none | light | strong: see scripts/train/augment.py
    baselines: bool = False  # no baseline is measured for detection


# ---- the shipped recipes ---------------------------------------------------------------------
# Measured on 2 idle CPU cores: test accuracy 0.9311 (all 10,000 images) in 9 min 17 s wall; re-run
# 2026-12-06 (seed 0, shared machine, 1,649 CPU-s): test 0.9270, shifted-test 0.7568.
IMAGE_DEFAULT = ImageClassificationRecipe(
    trainable_blocks=8,
    epochs=2,
    batch_size=64,
    lr=0.02,
    head_lr=0.1,
    weight_decay=4e-5,
    patience=2,
    min_steps=150,
    max_epochs=60,
    val_size=5000,
)
# About 1.5 minutes on 2 CPU cores; ~0.87 test accuracy.
IMAGE_QUICK = replace(IMAGE_DEFAULT, val_size=1000, train_limit=5000)

# MiniLM-L6, all 6 blocks trained (word embeddings frozen), one epoch over the ~28.5k cleaned
# training tweets: ~900 steps, about 15 minutes on 2 idle cores.
SENTIMENT_DEFAULT = SentimentRecipe(
    trainable_blocks=6,
    epochs=1,
    batch_size=32,
    lr=1e-4,
    head_lr=2e-3,
    weight_decay=0.01,
    patience=1,
    min_steps=90,  # the quick recipe has 94
    max_epochs=30,
    parity_samples=512,
    bench_repeats=5,
    # Chosen on validation: 2,048 texts 0.7954, 512 texts 0.7923; fp32 0.7937, dynamic int8 0.7932.
    calibration_texts=2048,
    adapt_steps=300,
    adapt_head_steps=100,
    adapt_texts=20000,
)
# 3,000 training tweets, one epoch; tested on 1,000 held-out tweets of the same test split.
# lr 2e-4: its 94 steps learn more at twice the default's rate (scripts/study_sentiment.py, two
# seeds: +1.0 points test accuracy, +1.8 on test-rerendered; docs/sentiment.md).
SENTIMENT_QUICK = replace(
    SENTIMENT_DEFAULT,
    lr=2e-4,
    train_limit=3000,
    val_limit=300,
    test_limit=1000,
    parity_samples=256,
    baselines=False,
    bench_repeats=3,
    calibration_texts=256,
    adapt_steps=60,
    adapt_head_steps=30,
    adapt_texts=5000,
)

# Generated scenes (scripts/train/data/detection_demo.py); see scripts/train/tasks/detection.py.
# Main's recipe (no augmentation, tinted items only) measured on 2 idle cores: test mAP@0.5 0.966,
# mAP@[.5:.95] 0.669 in 4 min 23 s wall, demo-data generation included; 8 epochs gave 0.968 / 0.680.
# With half the training items untinted (items 14-42%, chosen on validation), light augmentation and 8 epochs
# (chosen on validation; 5 gave test mAP 0.650) (seed 0, docs/generalization_detection.md): test mAP@0.5 0.959,
# mAP 0.667; shifted split mAP@0.5 0.905 (was 0.822), recall 0.872 at the served threshold; 606 CPU-s, 6 min 13 s
# wall on a lightly shared machine, demo data cached.
DETECTION_DEFAULT = DetectionRecipe(
    trainable_blocks=3,
    epochs=8,  # validation mAP@[.5:.95] 0.653 with 5: docs/generalization_detection.md
    batch_size=16,
    lr=5e-4,
    head_lr=6e-3,
    weight_decay=1e-4,
    patience=3,
    min_steps=120,  # the quick recipe has 124
    max_epochs=40,
    parity_images=64,
    demo_data=DemoScenes(train=2000, val=300, test=300),
    augment="light",  # docs/generalization_detection.md
)
# About 70 s on 2 idle cores once the demo data is cached; test mAP@0.5 0.897, mAP 0.492, shifted 0.785 (seed 0).
DETECTION_QUICK = replace(
    DETECTION_DEFAULT,
    strategy="feature-extraction",
    epochs=2,
    head_lr=1e-2,
    patience=2,
    parity_images=32,
    demo_data=DemoScenes(train=1000, val=100, test=300),
    augment="none",  # light cost 3.9 points of test mAP@0.5 in 2 epochs: docs/generalization_detection.md
)

RECIPES: dict[str, dict[str, Recipe]] = {
    "image-classification": {"default": IMAGE_DEFAULT, "quick": IMAGE_QUICK},
    "sentiment": {"default": SENTIMENT_DEFAULT, "quick": SENTIMENT_QUICK},
    "object-detection": {"default": DETECTION_DEFAULT, "quick": DETECTION_QUICK},
}


def recipe(task: str, name: str) -> Recipe:
    """One shipped recipe; raises KeyError naming the ones there are."""
    try:
        return RECIPES[task][name]
    except KeyError:
        known = {t: sorted(r) for t, r in RECIPES.items()}
        raise KeyError(f"no recipe {name!r} for task {task!r}; known: {known}") from None
