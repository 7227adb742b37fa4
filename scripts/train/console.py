"""What a fine-tune tells the person running it: status lines and progress bars on stderr.

stdout is kept for the one line a script reads back: the new artifact's folder, printed last.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def log(msg: str) -> None:
    """One status line on stderr."""
    print(f"[graft] {msg}", file=sys.stderr, flush=True)


def progress(it: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm bar on stderr; in logs (no TTY) it updates every 10 s instead of redrawing."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    yield from tqdm(
        it,
        desc=desc,
        total=total,
        unit=unit,
        dynamic_ncols=True,
        mininterval=0.2 if tty else 10.0,
        disable=os.environ.get("GRAFT_NO_PROGRESS") == "1",
    )


@contextmanager
def timed(label: str, into: dict[str, float] | None = None) -> Iterator[dict[str, float]]:
    """Time a block, log it, and record the seconds under `label` in `into` when given."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
        if into is not None:
            into[label.replace(" ", "_")] = round(out["seconds"], 1)
        log(f"{label}: {out['seconds']:.1f} s")
