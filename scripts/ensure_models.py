"""Build a model for every task whose default model has no servable version in the registry.

python -m scripts.ensure_models                 # quick recipes, only where missing (make serve)
python -m scripts.ensure_models --recipe default --force   # full quality (make models)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from models.manifest import TASKS
from models.servable import served_version
from models.versions import default_registry
from scripts import finetune


def main(argv: list[str] | None = None) -> int:
    """Fine-tune (with the chosen recipe) each task that has nothing to serve yet."""
    p = argparse.ArgumentParser(prog="python -m scripts.ensure_models", description=__doc__.splitlines()[0])
    p.add_argument("--registry", default=str(default_registry()))
    p.add_argument("--recipe", default="quick", help="quick (default) or default (full quality)")
    p.add_argument("--force", action="store_true", help="build even where a servable version exists")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS, help="tasks to check")
    args = p.parse_args(argv)
    registry = Path(args.registry)
    todo = []
    for task in args.tasks:
        found = None if args.force else served_version(registry, task)
        if found:
            print(f"[graft] {task}: serving {found} (registry {registry})", file=sys.stderr)
        else:
            todo.append(task)
    for i, task in enumerate(todo, 1):
        print(f"[graft] building {task} with the {args.recipe} recipe ({i}/{len(todo)})...", file=sys.stderr)
        start = time.perf_counter()
        folder = finetune.main([task, "--recipe", args.recipe, "--registry", str(registry)])
        print(f"[graft] {task}: built {folder.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
