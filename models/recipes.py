"""Default fine-tuning recipes per task: `default` (full quality) and `quick` (tests, demos).

A recipe is a plain dict of hyper-parameters; command-line options override single keys and
the resolved recipe is written into the manifest (training.config).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "image-classification": {
        # Measured on 2 CPU cores: ~0.92 test accuracy on Fashion-MNIST in about 9 minutes.
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
            # Measured next to every run; the manifest says so when fine-tuning does not beat it.
            "baselines": ["linear-probe"],
            "adabn": False,
            # --strategy auto: each candidate depth trains 2 epochs on this many images.
            "auto_train_size": 2000,
            "auto_val_size": 1000,
            "auto_epochs": 2,
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
