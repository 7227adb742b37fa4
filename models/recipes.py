"""Default fine-tuning recipes per task: `default` (full quality) and `quick` (tests, demos).

A recipe is a plain dict of hyper-parameters; command-line options override single keys and
the resolved recipe is written into the manifest (training.config).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "image-classification": {
        # Measured on 2 idle CPU cores: test accuracy 0.9311 (all 10,000 images) in 9 min 17 s wall.
        "default": {
            "image_size": 64,
            "strategy": "partial",
            "trainable_blocks": 8,
            "epochs": 2,
            "batch_size": 64,
            "lr": 0.02,
            "head_lr": 0.1,
            "weight_decay": 4e-5,
            "label_smoothing": 0.1,
            "val_size": 5000,
            "train_limit": None,
            "patience": 2,
            # Small --data sets: at least this many optimizer steps (Fashion-MNIST runs have more).
            "min_steps": 150,
            "max_epochs": 60,
            # Measured next to every run; the manifest says so when fine-tuning does not beat it.
            "baselines": ["linear-probe"],
            "adabn": False,
            # --strategy auto: each candidate depth trains 2 epochs on this many images.
            "auto_train_size": 2000,
            "auto_val_size": 1000,
            "auto_epochs": 2,
        },
        # About 1.5 minutes on 2 CPU cores; ~0.87 test accuracy.
        "quick": {
            "image_size": 64,
            "strategy": "partial",
            "trainable_blocks": 8,
            "epochs": 2,
            "batch_size": 64,
            "lr": 0.02,
            "head_lr": 0.1,
            "weight_decay": 4e-5,
            "label_smoothing": 0.1,
            "val_size": 1000,
            "train_limit": 5000,
            "patience": 2,
            # Small --data sets: at least this many optimizer steps (Fashion-MNIST runs have more).
            "min_steps": 150,
            "max_epochs": 60,
            # Measured next to every run; the manifest says so when fine-tuning does not beat it.
            "baselines": ["linear-probe"],
            "adabn": False,
            # --strategy auto: each candidate depth trains 2 epochs on this many images.
            "auto_train_size": 2000,
            "auto_val_size": 1000,
            "auto_epochs": 2,
        },
    },
    "sentiment": {
        # MiniLM-L6, all 6 blocks trained (word embeddings frozen), one epoch over the ~28.5k
        # cleaned training tweets: ~900 steps, about 15 minutes on 2 idle cores.
        "default": {
            "strategy": "partial",
            "trainable_blocks": 6,
            "max_length": 128,
            "epochs": 1,
            "batch_size": 32,
            "lr": 1e-4,
            "head_lr": 2e-3,
            "weight_decay": 0.01,
            "warmup": 0.06,
            "label_smoothing": 0.0,
            "dropout": 0.1,
            "patience": 1,
            # Small --data sets: at least this many optimizer steps (the quick recipe has 94).
            "min_steps": 90,
            "max_epochs": 30,
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "irreparable": "strip",
            "min_confidence": None,
            "train_limit": None,
            "val_limit": None,
            "test_limit": None,
            "parity_samples": 512,
            "baselines": True,
            "bench_repeats": 5,
            # --quantize int8: training texts whose activations set the fixed int8 scales (chosen on
            # validation: 2,048 texts 0.7954, 512 texts 0.7923; fp32 0.7937, dynamic int8 0.7932).
            "calibration_texts": 2048,
            "adapt_steps": 300,
            "adapt_head_steps": 100,
            "adapt_lr": 5e-5,
            "adapt_texts": 20000,
        },
        # 3,000 training tweets, one epoch; tested on 1,000 held-out tweets of the same test split.
        "quick": {
            "strategy": "partial",
            "trainable_blocks": 6,
            "max_length": 128,
            "epochs": 1,
            "batch_size": 32,
            "lr": 1e-4,
            "head_lr": 2e-3,
            "weight_decay": 0.01,
            "warmup": 0.06,
            "label_smoothing": 0.0,
            "dropout": 0.1,
            "patience": 1,
            # Small --data sets: at least this many optimizer steps (the quick recipe has 94).
            "min_steps": 90,
            "max_epochs": 30,
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "irreparable": "strip",
            "min_confidence": None,
            "train_limit": 3000,
            "val_limit": 300,
            "test_limit": 1000,
            "parity_samples": 256,
            "baselines": False,
            "bench_repeats": 3,
            "calibration_texts": 256,
            "adapt_steps": 60,
            "adapt_head_steps": 30,
            "adapt_lr": 5e-5,
            "adapt_texts": 5000,
        },
    },
    "object-detection": {
        # Generated scenes (scripts/make_detection_data.py); see scripts/train/detection.py.
        # Measured on 2 idle cores: test mAP@0.5 0.966, mAP@[.5:.95] 0.669 in 4 min 23 s wall,
        # demo-data generation included. 8 epochs gave mAP@0.5 0.968, mAP 0.680: not worth it.
        "default": {
            "image_size": 320,
            "strategy": "partial",
            "trainable_blocks": 3,
            "epochs": 5,
            "batch_size": 16,
            "lr": 5e-4,
            "head_lr": 6e-3,
            "weight_decay": 1e-4,
            "neck_width": 64,
            "tower_depth": 1,
            "nms_iou": 0.5,
            "patience": 3,
            # Small --data sets: at least this many optimizer steps (the quick recipe has 124).
            "min_steps": 120,
            "max_epochs": 40,
            "train_limit": None,
            "parity_images": 64,
            "demo_data": {"train": 2000, "val": 300, "test": 300, "seed": 0},
        },
        # About 70 s on 2 idle cores once the demo data is cached; test mAP@0.5 ~0.90.
        "quick": {
            "image_size": 320,
            "strategy": "feature-extraction",
            "trainable_blocks": 3,
            "epochs": 2,
            "batch_size": 16,
            "lr": 5e-4,
            "head_lr": 1e-2,
            "weight_decay": 1e-4,
            "neck_width": 64,
            "tower_depth": 1,
            "nms_iou": 0.5,
            "patience": 2,
            "min_steps": 120,
            "max_epochs": 40,
            "train_limit": None,
            "parity_images": 32,
            "demo_data": {"train": 1000, "val": 100, "test": 300, "seed": 0},
        },
    },
}


def recipe(task: str, name: str) -> dict[str, Any]:
    """A copy of one recipe; raises KeyError naming what exists."""
    try:
        return dict(RECIPES[task][name])
    except KeyError:
        known = {t: sorted(r) for t, r in RECIPES.items()}
        raise KeyError(f"no recipe {name!r} for task {task!r}; known: {known}") from None
