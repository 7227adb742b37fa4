"""The tasks graft fine-tunes, one module each (a `Task` subclass, see scripts/train/task.py).

`task_class(name)` imports only the module asked for: a sentiment run never loads torchvision's
detection code, and the command line can refuse an option before importing any of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..task import Task

MODULES = {
    "image-classification": "scripts.train.tasks.image_classification",
    "object-detection": "scripts.train.tasks.detection",
    "sentiment": "scripts.train.tasks.sentiment",
}


def task_class(name: str) -> type[Task]:
    """The Task subclass for a task name (the module's `TASK`)."""
    if name not in MODULES:
        raise SystemExit(f"unknown task {name!r}; graft fine-tunes {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).TASK
