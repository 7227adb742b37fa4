"""Which `python -m scripts.finetune` option each task supports, in one table.

The command line reads this table before it imports torch or reads any data: an option a task
does not support is refused at once (exit status 2) with one line that names the option, the
task and what to use instead. Nothing is silently ignored. tests/test_cli_matrix.py runs every
option against every task and holds each cell to what it says here.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.manifest import TASKS


@dataclass(frozen=True)
class Supported:
    """The task takes the option; with `only`, just these values of it (`why` says why not others)."""

    only: tuple[str, ...] = ()
    why: str = ""


@dataclass(frozen=True)
class Refused:
    """The task does not take the option: `why` not, and what to do `instead`."""

    why: str
    instead: str


YES = Supported()
EVERY_TASK = dict.fromkeys(TASKS, YES)

# Measured, not assumed (2 vCPU): ONNX Runtime's dynamic int8 made MobileNetV2 5 to 13 times
# slower than fp32 and moved its outputs; static (calibrated) int8 was not measured to help.
_INT8_IMAGES = Refused(
    "measured on CPU, ONNX Runtime's int8 made MobileNetV2 5-13x slower than fp32 and shifted its outputs",
    "use fp32 (omit --quantize)",
)
_NO_TOKENS = Refused("images have no token length", "use --image-size to set the input size")

TABLE: dict[str, dict[str, Supported | Refused]] = {
    "--data": EVERY_TASK,
    "--backbone": {
        "image-classification": YES,
        "object-detection": Supported(
            only=("mobilenet_v2",), why="the detector's feature taps are wired into MobileNetV2; omit --backbone"
        ),
        "sentiment": YES,
    },
    "--strategy": EVERY_TASK,
    "--trainable-blocks": EVERY_TASK,
    "--epochs": EVERY_TASK,
    "--batch-size": EVERY_TASK,
    "--lr": EVERY_TASK,
    "--image-size": {
        "image-classification": YES,
        "object-detection": YES,
        "sentiment": Refused("texts have no image size", "use --max-length to set the token budget"),
    },
    "--augment": {
        "image-classification": YES,
        "object-detection": YES,
        "sentiment": Refused("there is no text augmentation", "omit --augment"),
    },
    "--max-length": {
        "image-classification": _NO_TOKENS,
        "object-detection": _NO_TOKENS,
        "sentiment": YES,
    },
    "--name": EVERY_TASK,
    "--registry": EVERY_TASK,
    "--init-from": EVERY_TASK,
    "--quantize": {
        "image-classification": _INT8_IMAGES,
        "object-detection": _INT8_IMAGES,
        "sentiment": YES,
    },
    "--adabn": {
        "image-classification": YES,
        "object-detection": Refused(
            "the detector keeps its backbone's BatchNorm statistics frozen (small batches)", "omit --adabn"
        ),
        "sentiment": Refused("a text encoder has no BatchNorm", "use --adapt-on FILE to adapt it to your texts"),
    },
    "--adapt-on": {
        "image-classification": Refused(
            "masked-LM adaptation is for text", "use --adabn to adapt an image backbone to your images"
        ),
        "object-detection": Refused("there is no unlabelled-data adaptation for detection", "omit --adapt-on"),
        "sentiment": YES,
    },
    "--no-baselines": {
        "image-classification": YES,
        "object-detection": Refused("object-detection measures no baseline, so there is none to skip", "omit it"),
        "sentiment": YES,
    },
    "--checkpoint-dir": EVERY_TASK,
    "--resume": EVERY_TASK,
    "--device": EVERY_TASK,
    "--seed": EVERY_TASK,
    "--quick": EVERY_TASK,
    "--recipe": EVERY_TASK,
    "--parity-tolerance": EVERY_TASK,
}


def refusal(task: str, given: dict[str, object]) -> str | None:
    """The one-line refusal for the first option in `given` (flag -> value) that `task` does not
    support, or None when it supports them all."""
    for flag, value in given.items():
        cell = TABLE[flag][task]
        if isinstance(cell, Refused):
            return f"{flag} is not supported for {task}: {cell.why}; {cell.instead}"
        if cell.only and str(value) not in cell.only:
            return f"{flag} {value} is not supported for {task} (only {', '.join(cell.only)}): {cell.why}"
    return None


def as_markdown(*, only_differences: bool = False) -> str:
    """The table as Markdown; with `only_differences`, only the options some task does not take
    (README shows those; tests/test_readme_commands.py keeps it in step with this table)."""
    rows = ["| option | " + " | ".join(TASKS) + " |", "| --- " * (len(TASKS) + 1) + "|"]
    for flag, cells in TABLE.items():
        if only_differences and all(cell == YES for cell in cells.values()):
            continue
        shown = []
        for task in TASKS:
            cell = cells[task]
            if isinstance(cell, Refused):
                shown.append("no")
            else:
                shown.append("only " + ", ".join(cell.only) if cell.only else "yes")
        rows.append(f"| `{flag}` | " + " | ".join(shown) + " |")
    return "\n".join(rows)
