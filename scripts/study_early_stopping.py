"""Early stopping on a small training set: the rule in scripts/train/fit.py against the one before it.

100 Fashion-MNIST training images (the quick recipe otherwise) get the small-data schedule: 60
one-cycle epochs of 2 steps, early stopping after 15 epochs without a validation gain. The rule
before: every such epoch counted, and the validation dip around the learning-rate peak often
ended the run there. The rule now: they count once the rate is down to half its peak. The old
rule is reproduced by letting `fit` read a constant learning rate (every epoch then counts).

    python -m scripts.study_early_stopping --seeds 0 1 2 3 4

Prints one JSON row per run: epochs trained, best epoch, test accuracy and macro-F1 of the
exported model, accuracy on the shifted test split, seconds. A run whose export is refused (its
parity check failed) is reported as such.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from models.artifact import load_artifact
from models.errors import ParityError
from models.recipes import IMAGE_QUICK

RECIPE = replace(IMAGE_QUICK, train_limit=100, val_size=200, baselines=False)


def run(rule: str, seed: int) -> dict[str, Any]:
    import scripts.train.fit as fit_module
    from scripts.train.pipeline import run_recipe
    from scripts.train.task import Options

    reading = fit_module.learning_rate
    if rule == "before":
        fit_module.learning_rate = lambda trainer: 1.0  # a constant rate: every epoch counts
    started = time.time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            options = Options(
                task="image-classification",
                registry=Path(tmp),
                name=f"early-stop-{rule}",
                recipe_name="quick",
                seed=seed,
                given=frozenset(),
            )
            m = load_artifact(run_recipe(options, RECIPE)).manifest
    except ParityError as e:
        return {"rule": rule, "seed": seed, "refused": str(e), "s": round(time.time() - started)}
    finally:
        fit_module.learning_rate = reading
    history = m.training.history
    shifted = m.metrics.shifted
    return {
        "rule": rule,
        "seed": seed,
        "epochs": len(history),
        "best_epoch": int(max(history, key=lambda h: h["val_accuracy"])["epoch"]),
        "test_accuracy": m.metrics.values["accuracy"],
        "test_macro_f1": m.metrics.values["macro_f1"],
        "shifted_accuracy": shifted.values["accuracy"] if shifted is not None else None,
        "s": round(time.time() - started),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.study_early_stopping", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--rules", nargs="+", choices=["now", "before"], default=["now", "before"])
    args = p.parse_args(argv)
    for seed in args.seeds:
        for rule in args.rules:
            print(json.dumps(run(rule, seed)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
